"""Dense and convolution layers: :class:`Linear` and :class:`Conv2d`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jlayers import _checks
from jlayers.conv import conv2d_op
from jlayers.layers import base
from jlayers.layers.base import Initializer, Layer
from jlayers.linear import linear_op

default_kernel_init = initializers.lecun_normal()


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
    _checks.flag("Linear", "use_bias", self.use_bias)
    _checks.initializer("Linear", "kernel_init", self.kernel_init)
    _checks.initializer("Linear", "bias_init", self.bias_init)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    shape = _checks.shape_of("Linear", input_shape, min_rank=1)
    k_key, b_key = jax.random.split(key)
    params = {"kernel": self.kernel_init(k_key, (shape[-1], self.features), self.param_dtype)}
    if self.use_bias:
      params["bias"] = self.bias_init(b_key, (self.features,), self.param_dtype)
    return params, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("Linear", train, impl)
    kernel, *bias = base.entries(self, params, "params",
                                 ("kernel", "bias") if self.use_bias else ("kernel",))
    y = linear_op.select(impl)(base.compute_dtype(self, x), kernel, *bias,
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
    _checks.flag("Conv2d", "use_bias", self.use_bias)
    _checks.layout("Conv2d", self.layout)
    _checks.initializer("Conv2d", "kernel_init", self.kernel_init)
    _checks.initializer("Conv2d", "bias_init", self.bias_init)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    shape = _checks.shape_of("Conv2d", input_shape, rank=4)
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
    _checks.static_call("Conv2d", train, impl)
    kernel, *bias = base.entries(self, params, "params",
                                 ("kernel", "bias") if self.use_bias else ("kernel",))
    y = conv2d_op.select(impl)(
        base.compute_dtype(self, x), kernel, *bias, stride=self.stride,
        padding=self.padding, dilation=self.dilation, groups=self.groups, layout=self.layout,
        precision=self.precision)
    return y, state
