"""Layer, RMS and group normalisation with one hand-derived backward pass.

All three standardise ``x`` over a set of reduced axes and apply a per-element affine map;
they share one ``custom_vjp`` (:func:`_normalize`), whose ``x̂`` backward is the closed form
of :mod:`jlayers._standardize` (batch norm uses it too). Group norm is the same rule on a view
of ``x`` with the channel axis split into ``(groups, channels per group)``.

On GPUs and TPUs the rules stay in XLA, with no Pallas kernel: value and gradient lower to
row reductions and elementwise work only (3 reductions for rms norm, 6 for layer norm, 8 for
group norm, no product). XLA's reduction fusion puts each reduction together with the
elementwise work that feeds and follows it in one kernel, and merges sibling reductions of the
same input, so each pass reads ``x`` about once per reduction kernel; a hand kernel would save
at most one read of ``x`` per pass of a memory-bound op. That is the figure to measure on a GPU
before writing one (the ``ops`` section of :mod:`jlayers.bench` times these rules).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jlayers import _checks, _ops, _sharding, _standardize


class _Config(NamedTuple):
  """Static configuration (hashable; goes in ``nondiff_argnums``).

  ``view`` is the shape ``x`` is reshaped to (group norm splits its channel axis), ``axes``
  the reduced axes of the view, ``param_axes`` the axes of the view along which ``scale`` and
  ``offset`` vary (their shape is the view's at those axes).
  """

  view: tuple[int, ...]
  axes: tuple[int, ...]
  param_axes: tuple[int, ...]
  centered: bool
  eps: float
  param_shape: tuple[int, ...]  # the shape of scale and offset
  offset: Any  # the offset's dtype, None without an offset


def _param(op, name, v, x, axes, what):
  if v is None:
    return None
  v = _checks.floating(op, name, v)
  _checks.shape(op, name, v, tuple(x.shape[a] for a in axes), what)
  # Laid out as x's axes ``axes`` on a mesh (a vector split otherwise, as FSDP splits it, is
  # gathered); the reshard's transpose lays the rule's gradient out as the parameter again.
  return _sharding.reshard_like(v, x, axes=axes)


def _layer_config(op, x, scale, offset, axis, eps, centered):
  x = _checks.floating(op, "x", x)
  _checks.min_rank(op, "x", x, 1)
  axes = _checks.axes(op, "axis", axis, x.ndim)
  eps = _checks.positive_float(op, "eps", eps)
  what = f"(x's normalised axes {axes})"
  scale = _param(op, "scale", scale, x, axes, what)
  offset = _param(op, "offset", offset, x, axes, what)
  config = _Config(tuple(x.shape), axes, axes, centered, eps, tuple(x.shape[a] for a in axes),
                   None if offset is None else offset.dtype)
  return x, scale, offset, config


def layer_norm(x: jax.Array, scale: jax.Array | None = None, offset: jax.Array | None = None,
               *, axis=-1, eps: float = 1e-5) -> jax.Array:
  r"""Layer normalisation over ``axis``, with a manual VJP.

  .. math::
    μ = \frac1N Σ_R x, \quad σ^2 = \frac1N Σ_R (x - μ)^2, \quad
    y = γ \frac{x - μ}{\sqrt{σ^2 + ε}} + β

  with ``R`` the ``N`` elements of one row: ``axis`` (an int, or a tuple of axes normalised
  together), the same for every index of the other axes. Statistics are computed in at least
  float32 (two-pass variance, never negative), the result is rounded once to ``x``'s dtype.

  Args:
    x: float[..., F] (the normalised axes anywhere).
    scale: optional float[F] (``γ``): shaped like ``x``'s normalised axes, in ``x``'s axis
      order; any float dtype. ``None``: no scale.
    offset: optional float[F] (``β``), like ``scale``. ``None``: no offset.
    axis: the normalised axis or tuple of axes (static).
    eps: positive constant added to the variance.

  Returns:
    float[x.shape] in ``x``'s dtype. Gradients of ``scale`` and ``offset`` come back in their
    own dtypes.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> y = jlayers.layer_norm(jnp.array([[1.0, 2.0, 3.0]]), eps=1e-12)
    >>> [round(v, 4) for v in y[0].tolist()]  # (x - 2) / sqrt(2/3)
    [-1.2247, 0.0, 1.2247]
  """
  x, scale, offset, config = _layer_config("layer_norm", x, scale, offset, axis, eps, True)
  return _normalize(config, x, scale, offset)


def rms_norm(x: jax.Array, scale: jax.Array | None = None, *, axis=-1,
             eps: float = 1e-6) -> jax.Array:
  r"""Root-mean-square normalisation over ``axis``, with a manual VJP.

  .. math::
    y = γ \frac{x}{\sqrt{\frac1N Σ_R x^2 + ε}}

  over the ``N`` elements ``R`` of one row (``axis``: an int or a tuple of axes), without
  centring. The mean square is computed in at least float32, the result rounded once to
  ``x``'s dtype.

  Args:
    x: float[..., F].
    scale: optional float[F] (``γ``), shaped like ``x``'s normalised axes; any float dtype.
    axis: the normalised axis or tuple of axes (static).
    eps: positive constant added to the mean square.

  Returns:
    float[x.shape] in ``x``'s dtype.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> y = jlayers.rms_norm(jnp.array([[3.0, 4.0]]), eps=1e-12)
    >>> [round(v, 4) for v in y[0].tolist()]  # rms = sqrt(12.5)
    [0.8485, 1.1314]
  """
  x, scale, _, config = _layer_config("rms_norm", x, scale, None, axis, eps, False)
  return _normalize(config, x, scale, None)


def _group_config(x, scale, offset, groups, axis, eps):
  op = "group_norm"
  x = _checks.floating(op, "x", x)
  _checks.min_rank(op, "x", x, 2, "(N, ..., C)")
  axis = _checks.axis_index(op, "axis", axis, x.ndim)
  if axis == 0:
    raise ValueError(f"{op}: axis must be the channel axis, not the batch axis 0, for x of "
                     f"shape {tuple(x.shape)}")
  groups = _checks.positive_int(op, "groups", groups)
  channels = x.shape[axis]
  if channels % groups:
    raise ValueError(f"{op}: groups={groups} must divide the {channels} channels of x "
                     f"(axis {axis}, shape {tuple(x.shape)})")
  eps = _checks.positive_float(op, "eps", eps)
  what = f"(C,) matching x's axis {axis}"
  scale = _param(op, "scale", scale, x, (axis,), what)
  offset = _param(op, "offset", offset, x, (axis,), what)
  view = (*x.shape[:axis], groups, channels // groups, *x.shape[axis + 1:])
  reduced = tuple(a for a in range(len(view)) if a not in (0, axis))
  config = _Config(view, reduced, (axis, axis + 1), True, eps, (channels,),
                   None if offset is None else offset.dtype)
  return x, scale, offset, config


def group_norm(x: jax.Array, scale: jax.Array | None, offset: jax.Array | None, *,
               groups: int, axis: int = -1, eps: float = 1e-5) -> jax.Array:
  r"""Group normalisation, with a manual VJP.

  The ``C`` channels (on ``axis``, last for NHWC) are split into ``groups`` consecutive groups
  of ``C / groups``; each example's group is standardised over its channels and every spatial
  axis (all axes but the batch axis 0 and ``axis``), then each channel gets its own scale and
  offset:

  .. math::
    y_{c} = γ_c \frac{x_{c} - μ_{n,g(c)}}{\sqrt{σ^2_{n,g(c)} + ε}} + β_c

  ``groups=1`` is layer norm over every non-batch axis with a per-channel affine map;
  ``groups=C`` is instance norm. Statistics are computed in at least float32.

  Args:
    x: float[N, ..., C] (the channels on ``axis``; rank >= 2, axis 0 is the batch).
    scale: float[C] (``γ``) or ``None``; any float dtype.
    offset: float[C] (``β``) or ``None``; any float dtype.
    groups: the number of groups, a positive divisor of ``C`` (static).
    axis: the channel axis (not 0).
    eps: positive constant added to the variance.

  Returns:
    float[x.shape] in ``x``'s dtype.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> x = jnp.array([[1.0, 3.0, 10.0, 30.0]])  # two groups: (1, 3) and (10, 30)
    >>> y = jlayers.group_norm(x, jnp.ones(4), jnp.zeros(4), groups=2, eps=1e-12)
    >>> [round(v, 4) for v in y[0].tolist()]
    [-1.0, 1.0, -1.0, 1.0]
  """
  x, scale, offset, config = _group_config(x, scale, offset, groups, axis, eps)
  return _normalize(config, x, scale, offset)


# --------------------------------------------------------------------------------------------
# The shared rule.


def _broadcast(config, v, dtype):
  """A ``scale``/``offset`` vector laid out to broadcast against the view of ``x``."""
  shape = tuple(n if a in config.param_axes else 1 for a, n in enumerate(config.view))
  return v.astype(dtype).reshape(shape)


def _standardize_view(config, x):
  """``(x̂, μ or None, r)`` of the view of ``x``, in at least float32 (``μ``, ``r`` keepdims)."""
  xv = x.astype(_checks.at_least_float32(x.dtype)).reshape(config.view)
  mean, var, _, centred = _standardize.moments(xv, config.axes, centered=config.centered)
  rstd = jax.lax.rsqrt(var + config.eps)
  return centred * rstd, mean, rstd


def _affine(config, x, xhat, scale, offset):
  y = xhat
  if scale is not None:
    y = y * _broadcast(config, scale, xhat.dtype)
  if offset is not None:
    y = y + _broadcast(config, offset, xhat.dtype)
  return y.reshape(x.shape).astype(x.dtype)


def _forward(config, x, scale, offset):
  return _affine(config, x, _standardize_view(config, x)[0], scale, offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _normalize(config, x, scale, offset):
  return _forward(config, x, scale, offset)


def _normalize_fwd(config, x, scale, offset):
  """Saves ``x`` and ``scale`` (inputs: no memory of the rule's own) and the per-row ``μ``
  (centred forms only) and ``r = (σ² + ε)^{-1/2}``, one float each per statistic.

  The closed form needs ``x − μ`` (or ``x̂ = (x − μ)·r``): recomputing it in the backward is
  part of one fused elementwise pass, where saving it would keep a second array of ``x``'s
  size (in float32 for half-precision ``x``). ``μ`` and ``r`` are differentiable functions of ``x`` (no
  ``stop_gradient``), so the rule can be differentiated again.
  """
  xhat, mean, rstd = _standardize_view(config, x)
  return _affine(config, x, xhat, scale, offset), (x, scale, mean, rstd)


def _normalize_bwd(config, res, g):
  r"""Backward of ``y = γ x̂ + β`` with ``x̂`` standardised over the reduced axes ``R``.

  With ``G = ∂L/∂y`` and ``γ``, ``β`` broadcast along the axes they do not vary on:

  .. math::
    \frac{∂L}{∂β} = Σ_{\bar P} G, \qquad \frac{∂L}{∂γ} = Σ_{\bar P} G \hat x, \qquad
    ĝ = \frac{∂L}{∂\hat x} = γ G

  where :math:`Σ_{\bar P}` sums over every axis ``scale`` does not vary along (the batch and
  sequence axes of layer norm; batch and space of group norm). ``∂L/∂x`` is the closed form
  of :func:`jlayers._standardize.standardized_grad` on ``ĝ``:

  .. math::
    dx = r \big(ĝ - \mathrm{mean}_R ĝ - \hat x \, \mathrm{mean}_R (ĝ \hat x)\big)
       = r \big(ĝ - \mathrm{mean}_R ĝ\big) - c\, r^3 \mathrm{mean}_R (ĝ c)

  (without the mean of ``ĝ`` for RMS norm), evaluated in the second form, in the centred
  input ``c = x − μ`` (``x`` for RMS) recomputed here, so that ``x̂`` is never formed. For
  layer and RMS norm ``γ`` varies along ``R`` itself, so the sums of ``ĝ`` are taken as they
  stand. For group norm ``γ`` varies along a group's channels only and is constant over the
  spatial axes ``R_s`` of ``R``; so are ``μ`` and ``r`` over all of ``R``. The sums then factor
  through two per-(example, channel) sums over space, read from ``G`` and ``c`` in one pass:

  .. math::
    s_1 = Σ_{R_s} G, \quad s_2 = Σ_{R_s} G c, \qquad
    Σ_R ĝ = Σ_{c ∈ g} γ_c s_1, \quad Σ_R ĝ c = Σ_{c ∈ g} γ_c s_2, \qquad
    \frac{∂L}{∂β} = Σ_N s_1, \quad \frac{∂L}{∂γ} = Σ_N r s_2

  leaving one elementwise pass for ``dx`` and no intermediate array of ``x``'s size. Work is
  in at least float32; each cotangent is cast to its input's dtype. An empty ``x`` has zero
  gradients: its statistics (``0/0``) enter no output.
  """
  x, scale, mean, rstd = res
  if x.size == 0:  # no element to standardise: every gradient 0 (the statistics are 0/0)
    return (jnp.zeros_like(x), None if scale is None else jnp.zeros_like(scale),
            None if config.offset is None else jnp.zeros(config.param_shape, config.offset))
  cdt = rstd.dtype
  xv = x.astype(cdt).reshape(config.view)
  centred = xv - mean if config.centered else xv
  gy = g.astype(cdt).reshape(config.view)
  gamma = None if scale is None else _broadcast(config, scale, cdt)
  ghat = gy if gamma is None else gy * gamma
  n = _standardize.count(xv, config.axes)
  outer = tuple(a for a in range(xv.ndim) if a not in config.param_axes)
  spatial = tuple(a for a in config.axes if a not in config.param_axes)

  def param_grad(v, axes, dtype):
    return jnp.sum(v, axis=axes).reshape(config.param_shape).astype(dtype)

  # Two forms on purpose: written as group norm's (with no spatial axes), layer and RMS norm
  # materialise G·c for its two sums over different axes (+24 MiB temporary at 16×512×768).
  if not spatial:  # γ varies along every reduced axis (layer and RMS norm)
    sums = None
    dscale = None if scale is None else param_grad(gy * centred * rstd, outer, scale.dtype)
    doffset = None if config.offset is None else param_grad(gy, outer, config.offset)
  else:  # group norm: the sums over space first, from g and c in one pass
    per_channel = tuple(a for a in outer if a not in spatial)
    s1 = jnp.sum(gy, axis=spatial, keepdims=True)
    s2 = jnp.sum(gy * centred, axis=spatial, keepdims=True)
    channels = tuple(a for a in config.axes if a in config.param_axes)
    sums = tuple(jnp.sum(s if gamma is None else s * gamma, axis=channels, keepdims=True)
                 for s in (s1, s2))
    dscale = None if scale is None else param_grad(s2 * rstd, per_channel, scale.dtype)
    doffset = None if config.offset is None else param_grad(s1, per_channel, config.offset)
  dx = _standardize.standardized_grad(ghat, centred, rstd, n, v_is_xhat=False,
                                      axes=config.axes, sums=sums, centered=config.centered)
  return dx.reshape(x.shape).astype(x.dtype), dscale, doffset


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


# --------------------------------------------------------------------------------------------
# Autodiff twins.


def layer_norm_reference(x: jax.Array, scale: jax.Array | None = None,
                         offset: jax.Array | None = None, *, axis=-1,
                         eps: float = 1e-5) -> jax.Array:
  """Autodiff twin of :func:`layer_norm`: the same checks and forward, differentiated by JAX."""
  x, scale, offset, config = _layer_config("layer_norm", x, scale, offset, axis, eps, True)
  return _forward(config, x, scale, offset)


def rms_norm_reference(x: jax.Array, scale: jax.Array | None = None, *, axis=-1,
                       eps: float = 1e-6) -> jax.Array:
  """Autodiff twin of :func:`rms_norm`."""
  x, scale, _, config = _layer_config("rms_norm", x, scale, None, axis, eps, False)
  return _forward(config, x, scale, None)


def group_norm_reference(x: jax.Array, scale: jax.Array | None, offset: jax.Array | None, *,
                         groups: int, axis: int = -1, eps: float = 1e-5) -> jax.Array:
  """Autodiff twin of :func:`group_norm`."""
  x, scale, offset, config = _group_config(x, scale, offset, groups, axis, eps)
  return _forward(config, x, scale, offset)


layer_norm_op = _ops.declare("layer_norm", layer_norm, layer_norm_reference)
rms_norm_op = _ops.declare("rms_norm", rms_norm, rms_norm_reference)
group_norm_op = _ops.declare("group_norm", group_norm, group_norm_reference)
