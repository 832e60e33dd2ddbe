"""jlayers: neural-network layers as pure JAX functions with hand-derived backward passes.

Every op here has a ``jax.custom_vjp`` rule written by hand and an autodiff twin of the same
signature in :mod:`jlayers.reference`; the test suite proves the two agree. Each op's module
declares the pair as one :class:`Op` (``linear_op`` in :mod:`jlayers.linear`). Layer objects
and :class:`Sequential` compose the ops into models whose every backward pass is manual, or,
with ``impl="autodiff"``, the same model on the twins.

An op is added with its module, its grid (``jlayers/grids/``) and one line below.
"""

# The ops, one line each (each module declares its op when imported), first.
from jlayers.linear import linear
from jlayers.activation import gelu, relu, silu
from jlayers.dropout import dropout
from jlayers.batch_norm import batch_norm, batch_norm_inference
from jlayers.conv import conv2d
from jlayers.pool import avg_pool2d, max_pool2d
from jlayers.loss import softmax_cross_entropy_with_integer_labels
from jlayers.loss_soft_labels import softmax_cross_entropy
from jlayers.normalization import group_norm, layer_norm, rms_norm
from jlayers.softmax import log_softmax, softmax
from jlayers.embedding import embedding
from jlayers.attention import dot_product_attention
from jlayers.rotary import rotary_embedding
from jlayers.gated import geglu, swiglu
from jlayers.linear_cross_entropy import linear_cross_entropy

from jlayers import _ops, checkpoints, layers, partitioning, reference, testing  # noqa: E402
from jlayers._ops import Op, op, register_op, registered_ops, unregister_op
from jlayers._platform import formulation
from jlayers.layers import (GELU, AvgPool2d, BatchNorm, Conv2d, Dropout, Embedding, Flatten,
                            GatedMLP, GroupNorm, Layer, LayerNorm, Linear, MaxPool2d,
                            MultiHeadAttention, ReLU, RMSNorm, SiLU)
from jlayers.models import Composite, Remat, Residual, Scope, Sequential
from jlayers.parallel import DataParallel, ModelParallel
from jlayers.generation import Generation, filter_logits, generate, sample_logits
from jlayers.testing import grad_differences, max_grad_difference
from jlayers.transformer import DecoderBlock, TransformerLM, llama3_frequencies, transformer_block

__version__ = "0.6.0"

__all__ = [
    # the ops (manual backward passes), one per declared Op
    *_ops.builtin_ops(),
    # autodiff twins
    "reference",
    # per-platform formulations
    "formulation",
    # checking rules against autodiff
    "testing",
    "grad_differences",
    "max_grad_difference",
    # the op table, for users' own ops
    "Op",
    "op",
    "register_op",
    "registered_ops",
    "unregister_op",
    # layers and models
    "layers",
    "AvgPool2d",
    "BatchNorm",
    "Composite",
    "Conv2d",
    "DataParallel",
    "ModelParallel",
    "partitioning",
    "Dropout",
    "Embedding",
    "Flatten",
    "GELU",
    "GatedMLP",
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
    "DecoderBlock",
    "llama3_frequencies",
    "transformer_block",
    # generation with the key/value cache
    "Generation",
    "filter_logits",
    "generate",
    "sample_logits",
    # Hugging Face checkpoints
    "checkpoints",
]
