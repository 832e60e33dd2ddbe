"""jlayers: neural-network layers as pure JAX functions with hand-derived backward passes.

Every op here has a ``jax.custom_vjp`` rule written by hand and an autodiff twin of the same
signature in :mod:`jlayers.reference`; the test suite proves the two agree.
"""

from jlayers.activation import relu
from jlayers.linear import linear

__version__ = "0.1.0"

__all__ = [
    "linear",
    "relu",
]
