"""Normalisation layers: :class:`BatchNorm` (with running statistics), :class:`LayerNorm`,
:class:`RMSNorm` and :class:`GroupNorm`.

Params are ``{"scale": ..., "offset": ...}`` (those in use) in ``param_dtype``, shaped like the
channels (batch and group norm) or the normalised axes (layer and RMS norm); batch norm's
state holds the running statistics, the others have none. With ``dtype`` set, ``x`` is cast to
it first; statistics are computed in at least float32 either way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jlayers import _checks
from jlayers.batch_norm import batch_norm_inference_op, batch_norm_op
from jlayers.layers import base
from jlayers.layers.base import Initializer, Layer
from jlayers.normalization import group_norm_op, layer_norm_op, rms_norm_op


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

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    where = type(self).__name__
    shape = _checks.shape_of(where, input_shape, min_rank=1)
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
    base.set_field(self, "eps", _checks.real(where, "eps", self.eps, 0.0, float("inf"),
                                          lo_open=True, hi_open=True))
    for name in ("use_scale", "use_offset"):
      if hasattr(self, name):
        _checks.flag(where, name, getattr(self, name))
    for name in ("scale_init", "offset_init"):
      if hasattr(self, name):
        _checks.initializer(where, name, getattr(self, name))


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
    _checks.static_call("LayerNorm", train, impl)
    scale, offset = self._params(params)
    y = layer_norm_op.select(impl)(base.compute_dtype(self, x), scale, offset, axis=self.axis,
                                     eps=self.eps)
    return y, state


@dataclasses.dataclass(frozen=True)
class RMSNorm(_AxesNorm):
  """Root-mean-square normalisation over ``axis``, see :func:`jlayers.rms_norm`. Params:
  ``scale`` shaped like the normalised axes, dropped with ``use_scale=False``.

  The scale applied is ``scale_offset + scale`` (formed in at least float32): with the default
  ``scale_offset=0`` the param itself, with ``scale_offset=1.0`` Gemma's ``x̂ · (1 + w)``.
  ``scale_init`` gives the scale applied at init (ones), so the param starts at
  ``scale_init − scale_offset`` (``1 − scale_offset``: zeros for Gemma).
  """

  kind: ClassVar[str] = "rms_norm"
  _: dataclasses.KW_ONLY
  axis: Any = -1
  eps: float = 1e-6
  use_scale: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Initializer = initializers.ones
  scale_offset: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    base.set_field(self, "scale_offset", _checks.real("RMSNorm", "scale_offset",
                                                      self.scale_offset))
    if self.scale_offset and not self.use_scale:
      raise ValueError(f"RMSNorm: scale_offset={self.scale_offset} offsets the scale param, "
                       "which use_scale=False drops")

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    params, state = super().init(key, input_shape, input_dtype=input_dtype)
    if self.scale_offset:
      params["scale"] = params["scale"] - jnp.asarray(self.scale_offset, params["scale"].dtype)
    return params, state

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("RMSNorm", train, impl)
    scale, _ = self._params(params)
    if self.scale_offset:
      scale = scale.astype(_checks.at_least_float32(scale.dtype)) + self.scale_offset
    y = rms_norm_op.select(impl)(base.compute_dtype(self, x), scale, axis=self.axis,
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
    _checks.static_call("GroupNorm", train, impl)
    scale, offset = self._params(params)
    y = group_norm_op.select(impl)(base.compute_dtype(self, x), scale, offset,
                                     groups=self.groups, axis=self.axis, eps=self.eps)
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
    base.set_field(self, "momentum", _checks.real("BatchNorm", "momentum", self.momentum, 0.0, 1.0))
    base.set_field(self, "eps", _checks.real("BatchNorm", "eps", self.eps, 0.0, float("inf"),
                                          lo_open=True, hi_open=True))
    if not _checks.is_int(self.axis):
      raise TypeError(f"BatchNorm: axis must be an int, got {type(self.axis).__name__}")
    _checks.axis_name("BatchNorm", self.axis_name)
    _checks.initializer("BatchNorm", "scale_init", self.scale_init)
    _checks.initializer("BatchNorm", "offset_init", self.offset_init)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    shape = _checks.shape_of("BatchNorm", input_shape, min_rank=1)
    channels = shape[_checks.axis_index("BatchNorm", "axis", self.axis, len(shape))]
    s_key, o_key = jax.random.split(key)
    params = {"scale": self.scale_init(s_key, (channels,), self.param_dtype),
              "offset": self.offset_init(o_key, (channels,), self.param_dtype)}
    stats = _checks.at_least_float32(self.param_dtype)
    return params, {"mean": jnp.zeros((channels,), stats), "var": jnp.ones((channels,), stats)}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("BatchNorm", train, impl)
    x = base.compute_dtype(self, x)
    scale, offset = base.entries(self, params, "params", ("scale", "offset"))
    mean, var = base.entries(self, state, "state", ("mean", "var"))
    if not train:
      y = batch_norm_inference_op.select(impl)(x, scale, offset, mean, var, axis=self.axis,
                                               eps=self.eps)
      return y, state
    y, batch_mean, batch_var = batch_norm_op.select(impl)(
        x, scale, offset, axis=self.axis, eps=self.eps, axis_name=self.axis_name)
    axis = _checks.axis_index("BatchNorm", "axis", self.axis, x.ndim)
    if math.prod(s for i, s in enumerate(x.shape) if i != axis) == 0:
      return y, state  # an empty batch has no statistics: the running ones stay as they were
    m = self.momentum
    new_state = {
        name: m * old + (1.0 - m) * jax.lax.stop_gradient(batch).astype(old.dtype)
        for name, old, batch in (("mean", mean, batch_mean), ("var", var, batch_var))}
    return y, new_state
