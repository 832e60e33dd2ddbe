"""Layers without params or state: activations, :class:`Flatten`, pooling and
:class:`Dropout`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax.numpy as jnp

from jlayers import _checks
from jlayers.activation import gelu_op, relu_op, silu_op
from jlayers.dropout import dropout_op
from jlayers.layers import base
from jlayers.layers.base import Layer
from jlayers.pool import avg_pool2d_op, max_pool2d_op


@dataclasses.dataclass(frozen=True)
class ReLU(Layer):
  """Elementwise ``max(x, 0)`` (gradient 0 at 0). No params, no state."""

  kind: ClassVar[str] = "relu"

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("ReLU", train, impl)
    return relu_op.select(impl)(x), state


@dataclasses.dataclass(frozen=True)
class GELU(Layer):
  """Elementwise GELU, see :func:`jlayers.gelu`: the tanh form by default (``jax.nn.gelu``'s),
  the exact erf form with ``approximate=False`` (PyTorch's). No params, no state."""

  kind: ClassVar[str] = "gelu"
  approximate: bool = True

  def __post_init__(self):
    _checks.flag("GELU", "approximate", self.approximate)

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("GELU", train, impl)
    return gelu_op.select(impl)(x, approximate=self.approximate), state


@dataclasses.dataclass(frozen=True)
class SiLU(Layer):
  """Elementwise ``x σ(x)``, see :func:`jlayers.silu`. No params, no state."""

  kind: ClassVar[str] = "silu"

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("SiLU", train, impl)
    return silu_op.select(impl)(x), state


@dataclasses.dataclass(frozen=True)
class Flatten(Layer):
  """Reshapes ``float[N, ...]`` to ``float[N, prod(...)]``, keeping the leading batch axis."""

  kind: ClassVar[str] = "flatten"

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    _checks.shape_of("Flatten", input_shape, min_rank=1)
    return {}, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("Flatten", train, impl)
    x = _checks.as_array("Flatten", "x", x)
    _checks.min_rank("Flatten", "x", x, 1, "(N, ...)")
    return x.reshape(x.shape[0], math.prod(x.shape[1:])), state


@dataclasses.dataclass(frozen=True)
class _Pool2d(Layer):
  window: int | tuple[int, int]
  _: dataclasses.KW_ONLY
  stride: int | tuple[int, int] | None = None
  padding: Any = "VALID"
  ceil_mode: bool = False
  layout: str = "NHWC"

  def __post_init__(self):
    where = type(self).__name__
    base.set_field(self, "window", _checks.positive_ints(where, "window", self.window, 2))
    if self.stride is not None:
      base.set_field(self, "stride", _checks.positive_ints(where, "stride", self.stride, 2))
    base.set_field(self, "padding", _checks.padding(where, self.padding))
    base.set_field(self, "ceil_mode", _checks.flag(where, "ceil_mode", self.ceil_mode))
    _checks.layout(where, self.layout)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    _checks.shape_of(type(self).__name__, input_shape, rank=4)
    return {}, {}

  def _pool_kwargs(self):
    return {"stride": self.stride, "padding": self.padding, "ceil_mode": self.ceil_mode,
            "layout": self.layout}


@dataclasses.dataclass(frozen=True)
class MaxPool2d(_Pool2d):
  """Max pooling over ``window`` (stride defaults to the window), see :func:`jlayers.max_pool2d`.
  No params, no state."""

  kind: ClassVar[str] = "max_pool2d"
  dilation: int | tuple[int, int] = dataclasses.field(default=1, kw_only=True)

  def __post_init__(self):
    super().__post_init__()
    base.set_field(self, "dilation",
                   _checks.positive_ints("MaxPool2d", "dilation", self.dilation, 2))

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("MaxPool2d", train, impl)
    y = max_pool2d_op.select(impl)(x, self.window, dilation=self.dilation,
                                     **self._pool_kwargs())
    return y, state


@dataclasses.dataclass(frozen=True)
class AvgPool2d(_Pool2d):
  """Average pooling over ``window`` (stride defaults to the window), see
  :func:`jlayers.avg_pool2d`. No params, no state."""

  kind: ClassVar[str] = "avg_pool2d"
  count_include_pad: bool = dataclasses.field(default=True, kw_only=True)

  def __post_init__(self):
    super().__post_init__()
    base.set_field(self, "count_include_pad",
                   _checks.flag("AvgPool2d", "count_include_pad", self.count_include_pad))

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("AvgPool2d", train, impl)
    y = avg_pool2d_op.select(impl)(x, self.window, count_include_pad=self.count_include_pad,
                                     **self._pool_kwargs())
    return y, state


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
    base.set_field(self, "rate", _checks.real("Dropout", "rate", self.rate, 0.0, 1.0))
    dims = self.broadcast_dims
    if not isinstance(dims, Sequence) or isinstance(dims, str) or not all(
        map(_checks.is_int, dims)):
      raise TypeError(f"Dropout: broadcast_dims must be a sequence of ints, got {dims!r}")
    base.set_field(self, "broadcast_dims", tuple(dims))

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("Dropout", train, impl)
    if not train:
      return x, state
    if key is None:
      raise ValueError("Dropout: train=True needs a PRNG key, pass key=jax.random.key(...) "
                       "to apply (or train=False for evaluation)")
    y = dropout_op.select(impl)(x, key, rate=self.rate, broadcast_dims=self.broadcast_dims)
    return y, state
