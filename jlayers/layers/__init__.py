"""Layer objects over the ops: configuration in a frozen dataclass, arrays in plain dicts.

Every layer follows the protocol of :class:`Layer` (:mod:`jlayers.layers.base`)::

  params, state = layer.init(key, input_shape)              # input_shape includes the batch
  y, state = layer.apply(params, state, x, key=None, train=False, impl="manual")

``impl="manual"`` runs the hand-written ``custom_vjp`` rules, ``impl="autodiff"`` the reference
twins: each layer imports the op it runs (``linear_op`` from :mod:`jlayers.linear`) and picks
one of the two with ``op.select(impl)``. Shapes are inferred from ``input_shape``;
initialisers default as in Flax (LeCun normal kernels, zero biases, unit scales) and are any
``jax.nn.initializers``-style callable (:data:`Initializer`).

The modules, by kind: :mod:`~jlayers.layers.dense` (``Linear``, ``GatedMLP``, ``Conv2d``),
:mod:`~jlayers.layers.normalization` (``BatchNorm``, ``LayerNorm``, ``RMSNorm``,
``GroupNorm``), :mod:`~jlayers.layers.stateless` (activations, ``Flatten``, pooling,
``Dropout``) and :mod:`~jlayers.layers.sequence` (``Embedding``, ``MultiHeadAttention``).

Examples:
  >>> import jax, jax.numpy as jnp, jlayers
  >>> layer = jlayers.Linear(3)
  >>> params, state = layer.init(jax.random.key(0), (2, 5))
  >>> jax.tree_util.tree_map(jnp.shape, params)
  {'bias': (3,), 'kernel': (5, 3)}
  >>> layer.apply(params, state, jnp.ones((2, 5)))[0].shape
  (2, 3)
"""

from jlayers.layers.base import Initializer, Layer
from jlayers.layers.dense import Conv2d, GatedMLP, Linear
from jlayers.layers.normalization import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from jlayers.layers.sequence import Embedding, MultiHeadAttention
from jlayers.layers.stateless import (GELU, AvgPool2d, Dropout, Flatten, MaxPool2d, ReLU,
                                      SiLU)

__all__ = ["AvgPool2d", "BatchNorm", "Conv2d", "Dropout", "Embedding", "Flatten", "GELU",
           "GatedMLP", "GroupNorm", "Initializer", "Layer", "LayerNorm", "Linear", "MaxPool2d",
           "MultiHeadAttention", "RMSNorm", "ReLU", "SiLU"]
