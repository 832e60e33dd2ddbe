"""Layer objects over the ops: configuration in a frozen dataclass, arrays in plain dicts.

Every layer follows the protocol of :class:`jlayers.layers.Layer`::

  params, state = layer.init(key, input_shape)              # input_shape includes the batch
  y, state = layer.apply(params, state, x, key=None, train=False, impl="manual")

``impl="manual"`` runs the hand-written ``custom_vjp`` rules, ``impl="autodiff"`` the reference
twins; both are looked up in the op table (:func:`jlayers.op`) when ``apply`` is traced.
Shapes are inferred from ``input_shape``; initialisers default as in Flax (LeCun normal
kernels, zero biases, unit batch-norm scale) and are any ``jax.nn.initializers``-style
callable.

Examples:
  >>> import jax, jax.numpy as jnp, jlayers
  >>> layer = jlayers.Linear(3)
  >>> params, state = layer.init(jax.random.key(0), (2, 5))
  >>> jax.tree_util.tree_map(jnp.shape, params)
  {'bias': (3,), 'kernel': (5, 3)}
  >>> layer.apply(params, state, jnp.ones((2, 5)))[0].shape
  (2, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jlayers import _checks
from jlayers import _impl
from jlayers import _layer_base as base
from jlayers._layer_base import Layer
from jlayers._normalization_layers import GroupNorm, LayerNorm, RMSNorm
from jlayers._parameter_free import GELU, AvgPool2d, Flatten, MaxPool2d, ReLU, SiLU
from jlayers._sequence_layers import Embedding, MultiHeadAttention

Initializer = Any
default_kernel_init = initializers.lecun_normal()

__all__ = ["AvgPool2d", "BatchNorm", "Conv2d", "Dropout", "Embedding", "Flatten", "GELU",
           "GroupNorm", "Layer", "LayerNorm", "Linear", "MaxPool2d", "MultiHeadAttention",
           "RMSNorm", "ReLU", "SiLU"]


@dataclasses.dataclass(frozen=True)
class Linear(Layer):
  """Fully connected layer ``y = x @ kernel + bias`` over the last axis.

  Params: ``{"kernel": float[in, features], "bias": float[features]}`` (no ``"bias"`` when
  ``use_bias=False``) in ``param_dtype``; no state. ``in`` is ``input_shape[-1]``. With
  ``dtype`` set, ``x`` is cast to it and the product runs in it (the params are cast inside
  :func:`jlayers.linear`, their gradients come back in ``param_dtype``); ``None`` computes in
  ``x``'s dtype. ``precision`` goes to :func:`jlayers.linear`.
  """

  kind: ClassVar[str] = "linear"
  features: int
  _: dataclasses.KW_ONLY
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = initializers.zeros

  def __post_init__(self):
    _checks.positive_int("Linear", "features", self.features)
    base.check_dtypes(self)
    base.set_field(self, "precision", _checks.precision("Linear", self.precision))
    base.flag("Linear", "use_bias", self.use_bias)
    base.initializer("Linear", "kernel_init", self.kernel_init)
    base.initializer("Linear", "bias_init", self.bias_init)

  def init(self, key, input_shape, *, dtype=jnp.float32):
    shape = base.shape_of("Linear", input_shape, min_rank=1)
    k_key, b_key = jax.random.split(key)
    params = {"kernel": self.kernel_init(k_key, (shape[-1], self.features), self.param_dtype)}
    if self.use_bias:
      params["bias"] = self.bias_init(b_key, (self.features,), self.param_dtype)
    return params, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("Linear", train, impl)
    kernel, *bias = base.entries(self, params, "params",
                                 ("kernel", "bias") if self.use_bias else ("kernel",))
    y = _impl.op("linear", impl)(base.compute_dtype(self, x), kernel, *bias,
                                 precision=self.precision)
    return y, state


@dataclasses.dataclass(frozen=True)
class Conv2d(Layer):
  """2-D convolution, see :func:`jlayers.conv2d` for ``stride``, ``padding``, ``dilation``,
  ``groups`` and ``layout``.

  Params: ``{"kernel": float[kh, kw, in/groups, features] (HWIO) for NHWC or
  float[features, in/groups, kh, kw] (OIHW) for NCHW, "bias": float[features]}``; no state.
  ``kernel_init`` is always called with the HWIO shape (so that its fan-in is
  ``kh·kw·in/groups``) and the result is transposed for NCHW. Params are in ``param_dtype``;
  ``dtype`` and ``precision`` work as for :class:`Linear`.
  """

  kind: ClassVar[str] = "conv2d"
  features: int
  kernel_size: int | tuple[int, int]
  _: dataclasses.KW_ONLY
  stride: int | tuple[int, int] = 1
  padding: Any = "SAME"
  dilation: int | tuple[int, int] = 1
  groups: int = 1
  use_bias: bool = True
  layout: str = "NHWC"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = initializers.zeros

  def __post_init__(self):
    _checks.positive_int("Conv2d", "features", self.features)
    base.check_dtypes(self)
    base.set_field(self, "precision", _checks.precision("Conv2d", self.precision))
    for name in ("kernel_size", "stride", "dilation"):
      base.set_field(self, name, _checks.positive_ints("Conv2d", name, getattr(self, name), 2))
    base.set_field(self, "padding", _checks.padding("Conv2d", self.padding))
    _checks.positive_int("Conv2d", "groups", self.groups)
    if self.features % self.groups:
      raise ValueError(f"Conv2d: groups={self.groups} must divide features={self.features}")
    base.flag("Conv2d", "use_bias", self.use_bias)
    _checks.layout("Conv2d", self.layout)
    base.initializer("Conv2d", "kernel_init", self.kernel_init)
    base.initializer("Conv2d", "bias_init", self.bias_init)

  def init(self, key, input_shape, *, dtype=jnp.float32):
    shape = base.shape_of("Conv2d", input_shape, rank=4)
    channels = shape[-1] if self.layout == "NHWC" else shape[1]
    if channels % self.groups:
      raise ValueError(f"Conv2d: groups={self.groups} must divide the input channels "
                       f"({channels}) of input_shape {shape} ({self.layout})")
    k_key, b_key = jax.random.split(key)
    kernel = self.kernel_init(
        k_key, (*self.kernel_size, channels // self.groups, self.features), self.param_dtype)
    if self.layout == "NCHW":
      kernel = jnp.transpose(kernel, (3, 2, 0, 1))
    params = {"kernel": kernel}
    if self.use_bias:
      params["bias"] = self.bias_init(b_key, (self.features,), self.param_dtype)
    return params, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("Conv2d", train, impl)
    kernel, *bias = base.entries(self, params, "params",
                                 ("kernel", "bias") if self.use_bias else ("kernel",))
    y = _impl.op("conv2d", impl)(
        base.compute_dtype(self, x), kernel, *bias, stride=self.stride,
        padding=self.padding, dilation=self.dilation, groups=self.groups, layout=self.layout,
        precision=self.precision)
    return y, state


@dataclasses.dataclass(frozen=True)
class BatchNorm(Layer):
  r"""Batch normalisation over every axis but ``axis``, with running statistics.

  With ``train=True`` the batch statistics normalise ``x`` (and are differentiated through)
  and the running statistics are updated as

  .. math::
    \mathrm{mean} \leftarrow m · \mathrm{mean} + (1 - m) · μ_B, \qquad
    \mathrm{var} \leftarrow m · \mathrm{var} + (1 - m) · σ^2_B

  with ``m = momentum`` (0.99 by default, as in Flax; PyTorch's ``momentum`` is ``1 - m``)
  and ``σ²_B`` the biased batch variance. The update is under ``stop_gradient``. With
  ``train=False`` the running statistics normalise ``x`` and the state is returned unchanged.

  Params: ``{"scale": float[C], "offset": float[C]}`` in ``param_dtype``. State:
  ``{"mean": float[C], "var": float[C]}`` starting at 0 and 1, in ``param_dtype`` or float32
  if that is narrower. With ``dtype`` set, ``x`` is cast to it (statistics are computed in at
  least float32 either way). ``axis_name`` averages the batch statistics over a mapped axis
  (``jax.pmap``/``shard_map``); under a ``jit`` whose batch is sharded over a device mesh the
  plain statistics already cover the global batch.
  """

  kind: ClassVar[str] = "batch_norm"
  _: dataclasses.KW_ONLY
  momentum: float = 0.99
  eps: float = 1e-5
  axis: int = -1
  axis_name: Any = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Initializer = initializers.ones
  offset_init: Initializer = initializers.zeros

  def __post_init__(self):
    base.check_dtypes(self)
    base.set_field(self, "momentum", base.real("BatchNorm", "momentum", self.momentum, 0.0, 1.0))
    base.set_field(self, "eps", base.real("BatchNorm", "eps", self.eps, 0.0, float("inf"),
                                          lo_open=True, hi_open=True))
    if not _checks.is_int(self.axis):
      raise TypeError(f"BatchNorm: axis must be an int, got {type(self.axis).__name__}")
    _checks.axis_name("BatchNorm", self.axis_name)
    base.initializer("BatchNorm", "scale_init", self.scale_init)
    base.initializer("BatchNorm", "offset_init", self.offset_init)

  def init(self, key, input_shape, *, dtype=jnp.float32):
    shape = base.shape_of("BatchNorm", input_shape, min_rank=1)
    channels = shape[_checks.axis_index("BatchNorm", "axis", self.axis, len(shape))]
    s_key, o_key = jax.random.split(key)
    params = {"scale": self.scale_init(s_key, (channels,), self.param_dtype),
              "offset": self.offset_init(o_key, (channels,), self.param_dtype)}
    stats = _checks.at_least_float32(self.param_dtype)
    return params, {"mean": jnp.zeros((channels,), stats), "var": jnp.ones((channels,), stats)}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("BatchNorm", train, impl)
    x = base.compute_dtype(self, x)
    scale, offset = base.entries(self, params, "params", ("scale", "offset"))
    mean, var = base.entries(self, state, "state", ("mean", "var"))
    if not train:
      y = _impl.op("batch_norm_inference", impl)(
          x, scale, offset, mean, var, axis=self.axis,
          eps=self.eps)
      return y, state
    y, batch_mean, batch_var = _impl.op("batch_norm", impl)(
        x, scale, offset, axis=self.axis, eps=self.eps,
        axis_name=self.axis_name)
    axis = _checks.axis_index("BatchNorm", "axis", self.axis, x.ndim)
    if math.prod(s for i, s in enumerate(x.shape) if i != axis) == 0:
      return y, state  # an empty batch has no statistics: the running ones stay as they were
    m = self.momentum
    new_state = {
        name: m * old + (1.0 - m) * jax.lax.stop_gradient(batch).astype(old.dtype)
        for name, old, batch in (("mean", mean, batch_mean), ("var", var, batch_var))}
    return y, new_state


@dataclasses.dataclass(frozen=True)
class Dropout(Layer):
  """Inverted dropout, active only with ``train=True`` (which then needs ``key``).

  ``rate`` is the probability of DROPPING an element, ``0 <= rate <= 1``; ``broadcast_dims``
  share one mask value along those axes (e.g. ``(1, 2)`` drops whole NHWC channels). No params,
  no state. Inside :class:`jlayers.Sequential` every dropout layer gets its own key.
  """

  kind: ClassVar[str] = "dropout"
  rate: float
  _: dataclasses.KW_ONLY
  broadcast_dims: tuple[int, ...] = ()

  def __post_init__(self):
    base.set_field(self, "rate", base.real("Dropout", "rate", self.rate, 0.0, 1.0))
    dims = self.broadcast_dims
    if not isinstance(dims, Sequence) or isinstance(dims, str) or not all(
        map(_checks.is_int, dims)):
      raise TypeError(f"Dropout: broadcast_dims must be a sequence of ints, got {dims!r}")
    base.set_field(self, "broadcast_dims", tuple(dims))

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("Dropout", train, impl)
    if not train:
      return x, state
    if key is None:
      raise ValueError("Dropout: train=True needs a PRNG key, pass key=jax.random.key(...) "
                       "to apply (or train=False for evaluation)")
    y = _impl.op("dropout", impl)(x, key, rate=self.rate, broadcast_dims=self.broadcast_dims)
    return y, state
