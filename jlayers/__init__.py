"""jlayers: neural-network layers as pure JAX functions with hand-derived backward passes.

Every op here has a ``jax.custom_vjp`` rule written by hand and an autodiff twin of the same
signature in :mod:`jlayers.reference`; the test suite proves the two agree. Layer objects and
:class:`Sequential` compose the ops into models whose every backward pass is manual, or, with
``impl="autodiff"``, the same model on the twins.
"""

from jlayers import reference
from jlayers._platform import formulation
from jlayers.activation import relu
from jlayers.batch_norm import batch_norm, batch_norm_inference
from jlayers.conv import conv2d
from jlayers.dropout import dropout
from jlayers.layers import (AvgPool2d, BatchNorm, Conv2d, Dropout, Flatten, Layer, Linear,
                            MaxPool2d, ReLU)
from jlayers.linear import linear
from jlayers.loss import softmax_cross_entropy
from jlayers.models import Sequential, grad_differences, max_grad_difference
from jlayers.pool import avg_pool2d, max_pool2d

__version__ = "0.1.0"

__all__ = [
    # ops (manual backward passes)
    "avg_pool2d",
    "batch_norm",
    "batch_norm_inference",
    "conv2d",
    "dropout",
    "linear",
    "max_pool2d",
    "relu",
    "softmax_cross_entropy",
    # autodiff twins
    "reference",
    # per-platform formulations
    "formulation",
    # layers and models
    "AvgPool2d",
    "BatchNorm",
    "Conv2d",
    "Dropout",
    "Flatten",
    "Layer",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "Sequential",
    "grad_differences",
    "max_grad_difference",
]
