"""Autodiff twins of every op: same signatures and checks, plain jnp forwards, no custom rules.

``jax.grad`` of these is what the manual rules in :mod:`jlayers` are proven against.
"""

from jlayers.activation import relu_reference as relu
from jlayers.linear import linear_reference as linear

__all__ = [
    "linear",
    "relu",
]
