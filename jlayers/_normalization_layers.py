"""Layer, RMS and group normalisation layers (re-exported by :mod:`jlayers.layers`).

Each holds its configuration; params are ``{"scale": ..., "offset": ...}`` (those in use) in
``param_dtype``, shaped like the normalised axes (layer and RMS norm) or the channels (group
norm); no state. With ``dtype`` set, ``x`` is cast to it first; statistics are computed in at
least float32 either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jlayers import _checks
from jlayers import _impl
from jlayers import _layer_base as base
from jlayers._layer_base import Layer

Initializer = Any


def _axes_field(where, value):
  """``axis`` as given (an int or a tuple of ints), checked without knowing the rank."""
  if _checks.is_int(value):
    return int(value)
  if isinstance(value, (tuple, list)) and value and all(map(_checks.is_int, value)):
    return tuple(int(a) for a in value)
  raise TypeError(f"{where}: axis must be an int or a non-empty tuple of ints, got {value!r}")


class _Norm(Layer):
  """Shared ``init`` and params handling of the three normalisation layers."""

  def _param_shape(self, shape) -> tuple[int, ...]:
    raise NotImplementedError

  def _param_names(self) -> tuple[str, ...]:
    return tuple(n for n, used in (("scale", self.use_scale),
                                   ("offset", getattr(self, "use_offset", False))) if used)

  def init(self, key, input_shape, *, dtype=jnp.float32):
    where = type(self).__name__
    shape = base.shape_of(where, input_shape, min_rank=1)
    pshape = self._param_shape(shape)
    s_key, o_key = jax.random.split(key)
    params = {}
    if self.use_scale:
      params["scale"] = self.scale_init(s_key, pshape, self.param_dtype)
    if getattr(self, "use_offset", False):
      params["offset"] = self.offset_init(o_key, pshape, self.param_dtype)
    return params, {}

  def _params(self, params):
    got = dict(zip(self._param_names(), base.entries(self, params, "params",
                                                      self._param_names())))
    return got.get("scale"), got.get("offset")

  def _check_fields(self):
    where = type(self).__name__
    base.check_dtypes(self)
    base.set_field(self, "eps", base.real(where, "eps", self.eps, 0.0, float("inf"),
                                          lo_open=True, hi_open=True))
    for name in ("use_scale", "use_offset"):
      if hasattr(self, name):
        base.flag(where, name, getattr(self, name))
    for name in ("scale_init", "offset_init"):
      if hasattr(self, name):
        base.initializer(where, name, getattr(self, name))


class _AxesNorm(_Norm):
  """Layer and RMS norm: ``axis`` an int or a tuple, params shaped like those axes."""

  def __post_init__(self):
    base.set_field(self, "axis", _axes_field(type(self).__name__, self.axis))
    self._check_fields()

  def _param_shape(self, shape):
    axes = _checks.axes(type(self).__name__, "axis", self.axis, len(shape))
    return tuple(shape[a] for a in axes)


@dataclasses.dataclass(frozen=True)
class LayerNorm(_AxesNorm):
  """Layer normalisation over ``axis`` (the features; an int or a tuple of axes), see
  :func:`jlayers.layer_norm`. Params: ``scale`` (ones) and ``offset`` (zeros), shaped like
  ``x``'s normalised axes, each dropped with ``use_scale=False`` / ``use_offset=False``."""

  kind: ClassVar[str] = "layer_norm"
  _: dataclasses.KW_ONLY
  axis: Any = -1
  eps: float = 1e-5
  use_scale: bool = True
  use_offset: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Initializer = initializers.ones
  offset_init: Initializer = initializers.zeros

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("LayerNorm", train, impl)
    scale, offset = self._params(params)
    y = _impl.op("layer_norm", impl)(base.compute_dtype(self, x), scale, offset, axis=self.axis,
                                     eps=self.eps)
    return y, state


@dataclasses.dataclass(frozen=True)
class RMSNorm(_AxesNorm):
  """Root-mean-square normalisation over ``axis``, see :func:`jlayers.rms_norm`. Params:
  ``scale`` (ones) shaped like the normalised axes, dropped with ``use_scale=False``."""

  kind: ClassVar[str] = "rms_norm"
  _: dataclasses.KW_ONLY
  axis: Any = -1
  eps: float = 1e-6
  use_scale: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Initializer = initializers.ones

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("RMSNorm", train, impl)
    scale, _ = self._params(params)
    y = _impl.op("rms_norm", impl)(base.compute_dtype(self, x), scale, axis=self.axis,
                                   eps=self.eps)
    return y, state


@dataclasses.dataclass(frozen=True)
class GroupNorm(_Norm):
  """Group normalisation with ``groups`` groups of channels on ``axis`` (last: NHWC), see
  :func:`jlayers.group_norm`. Params: ``scale`` (ones) and ``offset`` (zeros), one per
  channel."""

  kind: ClassVar[str] = "group_norm"
  groups: int
  _: dataclasses.KW_ONLY
  axis: int = -1
  eps: float = 1e-5
  use_scale: bool = True
  use_offset: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Initializer = initializers.ones
  offset_init: Initializer = initializers.zeros

  def __post_init__(self):
    _checks.positive_int("GroupNorm", "groups", self.groups)
    if not _checks.is_int(self.axis):
      raise TypeError(f"GroupNorm: axis must be an int, got {type(self.axis).__name__}")
    self._check_fields()

  def _param_shape(self, shape):
    channels = shape[_checks.axis_index("GroupNorm", "axis", self.axis, len(shape))]
    if channels % self.groups:
      raise ValueError(f"GroupNorm: groups={self.groups} must divide the {channels} channels "
                       f"of input_shape {shape}")
    return (channels,)

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("GroupNorm", train, impl)
    scale, offset = self._params(params)
    y = _impl.op("group_norm", impl)(base.compute_dtype(self, x), scale, offset,
                                     groups=self.groups, axis=self.axis, eps=self.eps)
    return y, state
