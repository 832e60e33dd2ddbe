"""Autodiff twins of every op: same signatures and checks, plain jnp forwards, no custom rules.

``jax.grad`` of these is what the manual rules in :mod:`jlayers` are proven against.
"""

from jlayers.activation import gelu_reference as gelu
from jlayers.activation import relu_reference as relu
from jlayers.activation import silu_reference as silu
from jlayers.attention import dot_product_attention_reference as dot_product_attention
from jlayers.batch_norm import batch_norm_inference_reference as batch_norm_inference
from jlayers.batch_norm import batch_norm_reference as batch_norm
from jlayers.conv import conv2d_reference as conv2d
from jlayers.dropout import dropout_reference as dropout
from jlayers.embedding import embedding_reference as embedding
from jlayers.linear import linear_reference as linear
from jlayers.loss import softmax_cross_entropy_reference as softmax_cross_entropy
from jlayers.loss import (
    softmax_cross_entropy_with_integer_labels_reference as
    softmax_cross_entropy_with_integer_labels)
from jlayers.normalization import group_norm_reference as group_norm
from jlayers.normalization import layer_norm_reference as layer_norm
from jlayers.normalization import rms_norm_reference as rms_norm
from jlayers.pool import avg_pool2d_reference as avg_pool2d
from jlayers.pool import max_pool2d_reference as max_pool2d
from jlayers.softmax import log_softmax_reference as log_softmax
from jlayers.softmax import softmax_reference as softmax

__all__ = [
    "avg_pool2d",
    "batch_norm",
    "batch_norm_inference",
    "conv2d",
    "dot_product_attention",
    "dropout",
    "embedding",
    "gelu",
    "group_norm",
    "layer_norm",
    "linear",
    "log_softmax",
    "max_pool2d",
    "relu",
    "rms_norm",
    "silu",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
