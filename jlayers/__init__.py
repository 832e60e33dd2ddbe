"""jlayers: neural-network layers as pure JAX functions with hand-derived backward passes.

Every op here has a ``jax.custom_vjp`` rule written by hand and an autodiff twin of the same
signature in :mod:`jlayers.reference`; the test suite proves the two agree. Layer objects and
:class:`Sequential` compose the ops into models whose every backward pass is manual, or, with
``impl="autodiff"``, the same model on the twins.
"""

from jlayers import reference, testing
from jlayers._platform import formulation
from jlayers.activation import gelu, relu, silu
from jlayers.attention import dot_product_attention
from jlayers.batch_norm import batch_norm, batch_norm_inference
from jlayers.conv import conv2d
from jlayers.dropout import dropout
from jlayers.embedding import embedding
from jlayers.layers import (GELU, AvgPool2d, BatchNorm, Conv2d, Dropout, Embedding, Flatten,
                            GroupNorm, Layer, LayerNorm, Linear, MaxPool2d, MultiHeadAttention,
                            ReLU, RMSNorm, SiLU)
from jlayers.linear import linear
from jlayers.loss import softmax_cross_entropy, softmax_cross_entropy_with_integer_labels
from jlayers.normalization import group_norm, layer_norm, rms_norm
from jlayers.parallel import DataParallel
from jlayers.models import (Composite, Remat, Residual, Scope, Sequential, grad_differences,
                            max_grad_difference)
from jlayers.pool import avg_pool2d, max_pool2d
from jlayers.softmax import log_softmax, softmax
from jlayers.transformer import TransformerLM, transformer_block

from jlayers._impl import op, register_op, registered_ops

__version__ = "0.2.0"

for _name, _manual, _reference in (
    ("linear", linear, reference.linear),
    ("relu", relu, reference.relu),
    ("gelu", gelu, reference.gelu),
    ("silu", silu, reference.silu),
    ("dropout", dropout, reference.dropout),
    ("batch_norm", batch_norm, reference.batch_norm),
    ("batch_norm_inference", batch_norm_inference, reference.batch_norm_inference),
    ("conv2d", conv2d, reference.conv2d),
    ("max_pool2d", max_pool2d, reference.max_pool2d),
    ("avg_pool2d", avg_pool2d, reference.avg_pool2d),
    ("softmax_cross_entropy_with_integer_labels", softmax_cross_entropy_with_integer_labels,
     reference.softmax_cross_entropy_with_integer_labels),
    ("softmax_cross_entropy", softmax_cross_entropy, reference.softmax_cross_entropy),
    ("layer_norm", layer_norm, reference.layer_norm),
    ("rms_norm", rms_norm, reference.rms_norm),
    ("group_norm", group_norm, reference.group_norm),
    ("softmax", softmax, reference.softmax),
    ("log_softmax", log_softmax, reference.log_softmax),
    ("embedding", embedding, reference.embedding),
    ("dot_product_attention", dot_product_attention, reference.dot_product_attention),
):
  register_op(_name, _manual, _reference)
del _name, _manual, _reference

__all__ = [
    # ops (manual backward passes)
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
    # autodiff twins
    "reference",
    # per-platform formulations
    "formulation",
    # checking rules against autodiff
    "testing",
    # the op table
    "op",
    "register_op",
    "registered_ops",
    # layers and models
    "AvgPool2d",
    "BatchNorm",
    "Composite",
    "Conv2d",
    "DataParallel",
    "Dropout",
    "Embedding",
    "Flatten",
    "GELU",
    "GroupNorm",
    "Layer",
    "LayerNorm",
    "Linear",
    "MaxPool2d",
    "MultiHeadAttention",
    "RMSNorm",
    "ReLU",
    "Remat",
    "Residual",
    "Scope",
    "Sequential",
    "SiLU",
    "TransformerLM",
    "grad_differences",
    "max_grad_difference",
    "transformer_block",
]
