"""jlayers: neural-network layers as pure JAX functions with hand-derived backward passes.

Every op here has a ``jax.custom_vjp`` rule written by hand and an autodiff twin of the same
signature in :mod:`jlayers.reference`; the test suite proves the two agree.
"""

from jlayers import reference
from jlayers.activation import relu
from jlayers.batch_norm import batch_norm, batch_norm_inference
from jlayers.dropout import dropout
from jlayers.linear import linear
from jlayers.loss import softmax_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "batch_norm",
    "batch_norm_inference",
    "dropout",
    "linear",
    "reference",
    "relu",
    "softmax_cross_entropy",
]
