"""Autodiff twins of every op: same signatures and checks, plain jnp forwards, no custom rules.

``jax.grad`` of these is what the manual rules in :mod:`jlayers` are proven against.
"""

from jlayers.activation import gelu_reference as gelu
from jlayers.activation import relu_reference as relu
from jlayers.activation import silu_reference as silu
from jlayers.batch_norm import batch_norm_inference_reference as batch_norm_inference
from jlayers.batch_norm import batch_norm_reference as batch_norm
from jlayers.conv import conv2d_reference as conv2d
from jlayers.dropout import dropout_reference as dropout
from jlayers.linear import linear_reference as linear
from jlayers.loss import softmax_cross_entropy_reference as softmax_cross_entropy
from jlayers.loss import (
    softmax_cross_entropy_with_integer_labels_reference as
    softmax_cross_entropy_with_integer_labels)
from jlayers.pool import avg_pool2d_reference as avg_pool2d
from jlayers.pool import max_pool2d_reference as max_pool2d

__all__ = [
    "avg_pool2d",
    "batch_norm",
    "batch_norm_inference",
    "conv2d",
    "dropout",
    "gelu",
    "linear",
    "max_pool2d",
    "relu",
    "silu",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
