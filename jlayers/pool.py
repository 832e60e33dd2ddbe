"""2-D max and average pooling with hand-derived backward passes (any window, stride, padding;
dilation for the maximum; PyTorch's ``ceil_mode``).

Two formulations of each rule, chosen by :func:`jax.lax.platform_dependent` when lowering (see
:func:`jlayers.formulation`):

* **CPU**: forwards reduce one strided slice of the input per window offset; backwards put
  output-shaped arrays back with ``lax.pad`` and reshapes (no scatter, no select-and-scatter).
  Max pooling saves one byte per output. Windows of more than ``_MAX_VIEWS`` offsets (global
  pooling) take the native formulation on CPU too: one slice per offset grows with the window.
* **native** (GPU, TPU): ``lax.reduce_window`` forwards, and the backwards XLA's vendors tune:
  select-and-scatter for the maximum, a window sum of the dilated cotangent for the average.
  Select-and-scatter has no window dilation: a dilated maximum is scattered per phase, as
  undilated windows over strided slices of the input (:func:`_max_by_phases`).

``ceil_mode`` is extra high padding (``_Config.ceil_extra``): minus infinity for the maximum,
where it never wins, and counted in no average's divisor.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jlayers import _checks, _platform, _sharding

_SPATIAL = {"NHWC": (1, 2), "NCHW": (2, 3)}


class _Config(NamedTuple):
  """Static configuration (hashable, for ``nondiff_argnums``). Per-axis tuples follow the axes
  of ``x`` (window 1, stride 1, dilation 1, no padding on batch and channels) for both layouts
  alike. ``pads`` include ``ceil_extra``, the high padding that ``ceil_mode`` adds so that the
  last window fits: it is padding for the maximum, but no average counts it."""

  shape: tuple[int, ...]
  dtype: np.dtype
  window: tuple[int, ...]
  strides: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  spatial: tuple[int, int]
  count_include_pad: bool = True
  dilation: tuple[int, ...] = (1, 1, 1, 1)
  ceil_extra: tuple[int, ...] = (0, 0, 0, 0)

  @property
  def span(self) -> tuple[int, ...]:
    """The extent :math:`d (k - 1) + 1` of a (dilated) window along each axis."""
    return tuple(d * (k - 1) + 1 for k, d in zip(self.window, self.dilation))

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(self.shape, self.span, self.strides, self.pads))

  @property
  def offsets(self) -> list[tuple[int, ...]]:
    """The positions of the window elements relative to its start, :math:`o = d p`, in
    row-major order of :math:`p`: offset number ``k`` is ``offsets[k]``."""
    return list(itertools.product(*(range(0, d * k, d)
                                    for k, d in zip(self.window, self.dilation))))

  @property
  def disjoint(self) -> bool:  # no two windows overlap
    return all(s >= k for s, k in zip(self.strides, self.span))


def _out_size(n: int, k: int, s: int, lo: int, hi: int, ceil_mode: bool) -> int:
  r"""PyTorch's output size for ``n`` inputs, window span ``k``, stride ``s``, padding ``lo, hi``:
  :math:`\lfloor (n + lo + hi - k) / s \rfloor + 1`, or with ``ceil_mode`` the ceiling, less
  one where that last window would start past the input (in its high padding or beyond)."""
  if not ceil_mode:
    return (n + lo + hi - k) // s + 1
  m = -(-(n + lo + hi - k) // s) + 1
  return m - 1 if (m - 1) * s >= n + lo else m


def _validate(op, x, window, stride, padding, layout, count_include_pad=True, dilation=1,
              ceil_mode=False):
  x = _checks.floating(op, "x", x)
  layout = _checks.layout(op, layout)
  _checks.rank(op, "x", x, 4, f"({', '.join(layout)})")
  window = _checks.positive_ints(op, "window", window, 2)
  stride = window if stride is None else _checks.positive_ints(op, "stride", stride, 2)
  dilation = _checks.positive_ints(op, "dilation", dilation, 2)
  if not isinstance(count_include_pad, bool):
    raise TypeError(f"{op}: count_include_pad must be a bool, got {count_include_pad!r}")
  if not isinstance(ceil_mode, bool):
    raise TypeError(f"{op}: ceil_mode must be a bool, got {ceil_mode!r}")
  spatial = _SPATIAL[layout]
  size = tuple(x.shape[a] for a in spatial)
  span = tuple(d * (k - 1) + 1 for k, d in zip(window, dilation))
  what = (f"window {window}" if dilation == (1, 1) else
          f"dilated window {span} (window {window}, dilation {dilation})")
  pads = _checks.explicit_padding(op, padding, size, span, stride)
  if any(p >= k for pair, k in zip(pads, span) for p in pair):
    raise ValueError(f"{op}: padding must be smaller than the {what} on every side, "
                     f"got {pads}")
  padded = tuple(n + lo + hi for n, (lo, hi) in zip(size, pads))
  if any(p < k for p, k in zip(padded, span)):
    raise ValueError(f"{op}: {what} is larger than the padded input {padded} "
                     f"(spatial size {size}, padding {pads})")
  out = [_out_size(n, k, s, lo, hi, ceil_mode)
         for n, k, s, (lo, hi) in zip(size, span, stride, pads)]
  extra = tuple(max((m - 1) * s + k - p, 0) for m, s, k, p in zip(out, stride, span, padded))
  for axis, (n, k, s, d, (lo, _), m) in enumerate(zip(size, window, stride, dilation, pads, out)):
    # Undilated windows always cover an input element; dilated ones may step over all of it.
    covered = _inside(m, k, s, d, lo, 0, n).any(axis=1)
    if not covered.all():
      raise ValueError(
          f"{op}: every window must cover an input element, but the {what} of output "
          f"{layout[spatial[axis]]} index {int(np.argmin(covered))} covers only padding "
          f"(spatial size {size}, padding {pads}, stride {stride}, ceil_mode {ceil_mode})")

  def per_axis(values, fill):
    return tuple(values[spatial.index(a)] if a in spatial else fill for a in range(4))

  pads = tuple((lo, hi + e) for (lo, hi), e in zip(pads, extra))
  return x, _Config(tuple(x.shape), x.dtype, per_axis(window, 1), per_axis(stride, 1),
                    per_axis(pads, (0, 0)), spatial, count_include_pad, per_axis(dilation, 1),
                    per_axis(extra, 0))


def _inside(m: int, k: int, s: int, d: int, lo: int, begin: int, end: int) -> np.ndarray:
  """``bool[m, k]``: whether element ``p`` of window ``j`` (at ``s j + d p - lo`` of the input)
  lies in ``[begin, end)``."""
  position = (np.arange(m) * s - lo)[:, None] + d * np.arange(k)
  return (begin <= position) & (position < end)


def _views(config: _Config, x: jax.Array, fill: float) -> list[jax.Array]:
  r"""The output-shaped views :math:`v_k[j] = \bar x_{s j + o_k}`, one per window offset.

  :math:`\bar x` (``x`` padded with ``fill``) is never built: each view is a strided slice of
  ``x``, padded where it leaves ``x``, and fuses into its consumer. Reduced elementwise, they
  beat ``reduce_window`` on CPU (1.3x for 2x2 windows, 8x for 3x3 at stride 1) but cost grows
  with the offset count: past ~200 offsets (global pooling of 28x28) ``reduce_window`` wins.
  """
  views, fill = [], jnp.full((), fill, x.dtype)
  for o in config.offsets:
    box = []  # per axis: the slice [begin, end) of x and the pads of the view around it
    for oi, n, m, s, (lo, _) in zip(o, config.shape, config.out_shape, config.strides,
                                    config.pads):
      first = min(max(-(-(lo - oi) // s), 0), m)  # the first j with s j + o - lo inside x
      count = max(min((n - 1 - oi + lo) // s, m - 1) - first + 1, 0)
      begin = oi - lo + s * first if count else 0
      box.append((begin, begin + s * (count - 1) + 1 if count else 0,
                  (first, m - first - count, 0)))
    begin, end, pads = zip(*box)
    views.append(lax.pad(lax.slice(x, begin, end, config.strides), fill, pads))
  return views


def _place_offsets(config: _Config, parts) -> jax.Array:
  r"""Input-shaped :math:`\sum_k` of the output-shaped ``parts[k]`` put at :math:`s j + o_k - lo`.

  One ``lax.pad`` per offset: interior padding ``s - 1`` spreads the entries, low padding
  ``o_k - lo`` shifts them (cropping, where negative) and high padding fills up to the input.
  """
  total = None
  for o, part in zip(config.offsets, parts):
    placed = lax.pad(part, jnp.zeros((), part.dtype), [
        (oi - lo, n - (oi - lo) - (m - 1) * s - 1, s - 1) for oi, n, m, s, (lo, _) in zip(
            o, config.shape, config.out_shape, config.strides, config.pads)])
    total = placed if total is None else total + placed
  return total


def _place_blocks(config: _Config, blocks: jax.Array) -> jax.Array:
  r"""Input-shaped array with ``blocks[..., j_0, o_0, ..., j_1, o_1, ...]`` at :math:`s j + o - lo`.

  Disjoint windows only (one entry per position): ``blocks``, broadcast to the blocked output
  shape (each spatial axis ``m`` split into ``(m, k)``, see :func:`_blocked`), is spread by the
  dilation ``d`` and padded from ``k`` to ``s`` per offset axis, reshaped (``(j, o)`` to
  ``s j + o``), cropped. Batch and channel axes are never split or merged, so a batch split
  over devices stays local.
  """
  zero, out, steps = jnp.zeros((), blocks.dtype), config.out_shape, config.strides
  blocks = jnp.broadcast_to(blocks, _blocked(config, out, config.window))
  blocks = lax.pad(blocks, zero, [
      p for a, (s, k, d) in enumerate(zip(steps, config.span, config.dilation))
      for p in (((0, 0, 0), (0, s - k, d - 1)) if a in config.spatial else ((0, 0, 0),))])
  merged = tuple(m * s for m, s in zip(out, steps))
  return lax.pad(blocks.reshape(merged, out_sharding=_merged_sharding(config, blocks)), zero, [
      (-lo, n - m * s + lo, 0) for n, m, s, (lo, _) in zip(config.shape, out, steps, config.pads)])


def _merged_sharding(config: _Config, blocks):
  """Where the types carry shardings: that of ``blocks`` with each spatial pair merged back
  into one (unsplit) axis, for the reshape that merges them; else ``None``."""
  if not _sharding.explicit(blocks):
    return None
  spec, entries, i = jax.typeof(blocks).sharding.spec, [], 0
  for a in range(4):
    entries.append(None if a in config.spatial else (spec[i] if i < len(spec) else None))
    i += 2 if a in config.spatial else 1
  return P(*entries)


def _blocked(config: _Config, shape, inner) -> tuple[int, ...]:
  """``shape`` with each spatial axis ``a`` split into ``(shape[a], inner[a])``."""
  return tuple(v for a, n in enumerate(shape)
               for v in ((n, inner[a]) if a in config.spatial else (n,)))


# Windows with more offsets than this take the native formulation on CPU as well.
_MAX_VIEWS = 100


def _reduce_window(config: _Config, x, init, op):
  return lax.reduce_window(x, np.array(init, x.dtype), op, config.window, config.strides,
                           config.pads, window_dilation=config.dilation)


def _window_sum_transpose(config: _Config, g):
  r"""The transpose of the window sum :math:`y_j = \sum_{o} \bar x_{s j + o}`, natively.

  :math:`∂L/∂\bar x_i = \sum_{o} G^s_{i - o}` with :math:`G^s` the cotangent dilated by the
  stride (zeros between): a stride-1 window sum (same window and dilation) over :math:`G^s`
  padded by the span :math:`k - 1` below. Cropping :math:`lo` below and :math:`hi` above (the
  padding, ``ceil_mode``'s included) makes the low pad :math:`k - 1 - lo \ge 0` and the high
  pad :math:`n + lo - (m - 1) s - 1 \ge 0` (the last window starts inside the input or its low
  padding), which also covers the rows past the last window.
  """
  pads = [(k - 1 - lo, n + lo - (m - 1) * s - 1, s - 1) for n, m, k, s, (lo, _) in zip(
      config.shape, config.out_shape, config.span, config.strides, config.pads)]
  return lax.reduce_window(lax.pad(g, jnp.zeros((), g.dtype), pads), np.array(0, g.dtype),
                           lax.add, config.window, (1,) * 4, ((0, 0),) * 4,
                           window_dilation=config.dilation)


def max_pool2d(x: jax.Array, window, *, stride=None, padding="VALID", dilation=1,
               ceil_mode: bool = False, layout: str = "NHWC") -> jax.Array:
  r"""2-D max pooling, with a manual VJP.

  With ``x`` padded by :math:`-\infty` to :math:`\bar x`, window :math:`(k_h, k_w)`, stride
  :math:`(s_h, s_w)` and dilation :math:`(d_h, d_w)`:

  .. math::
    y_{n,i,j,c} = \max_{0 \le p < k_h,\; 0 \le q < k_w}
      \bar x_{n,\, s_h i + d_h p,\, s_w j + d_w q,\, c}

  The gradient of each output goes to the FIRST maximum of its window in row-major
  ``(p, q)`` order, as XLA's select-and-scatter does (ties are not split, nor counted twice).

  Args:
    x: float[N, H, W, C] (``layout="NHWC"``) or float[N, C, H, W] (``"NCHW"``).
    window: int or (int, int), positive: :math:`(k_h, k_w)`.
    stride: ``None`` (the window: no overlap), int or (int, int), positive.
    padding: ``"VALID"``, ``"SAME"`` (as in :func:`jax.lax.reduce_window`), an int or
      ``((lo_h, hi_h), (lo_w, hi_w))``; non-negative, smaller than the (dilated) window span
      :math:`d (k - 1) + 1` on every side.
    dilation: int or (int, int), positive: the step :math:`(d_h, d_w)` between window elements.
      Every window must still cover an input element.
    ceil_mode: round the output size up, as PyTorch does: the last window may reach past the
      padding (minus infinity there too) but must start inside the input or its low padding.
    layout: ``"NHWC"`` or ``"NCHW"``.

  Returns:
    float[N, H', W', C] (or float[N, C, H', W']) in the dtype of ``x``, with
    :math:`H' = \lfloor (H + lo_h + hi_h - d_h (k_h - 1) - 1) / s_h \rfloor + 1`; with
    ``ceil_mode`` the ceiling instead, less one if :math:`(H' - 1) s_h \ge H + lo_h`.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.max_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    >>> jlayers.max_pool2d(jnp.arange(25.0).reshape(1, 5, 5, 1), 2, ceil_mode=True)[0, :, :, 0]
    Array([[ 6.,  8.,  9.],
           [16., 18., 19.],
           [21., 23., 24.]], dtype=float32)
    >>> x = jnp.array([[4., 0., 1., 0.], [0., 0., 0., 0.], [2., 0., 3., 5.], [0., 6., 0., 0.]])
    >>> jlayers.max_pool2d(x.reshape(1, 4, 4, 1), 2, stride=1, dilation=2)[0, :, :, 0]
    Array([[4., 5.],
           [0., 6.]], dtype=float32)
  """
  x, config = _validate("max_pool2d", x, window, stride, padding, layout, dilation=dilation,
                        ceil_mode=ceil_mode)
  native = functools.partial(_max_pool2d_native, config)
  if len(config.offsets) > _MAX_VIEWS:
    return native(x)
  return _platform.by_platform(x, cpu=functools.partial(_max_pool2d, config), native=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool2d(config, x):
  return functools.reduce(jnp.maximum, _views(config, x, -jnp.inf))


def _max_pool2d_fwd(config, x):
  r"""Saves :math:`\kappa`, the number of the first arg-max offset of every window, as int8.

  The backward must know which element of each window won: :math:`\log_2(k_h k_w)` bits, one
  byte per OUTPUT element (at most ``_MAX_VIEWS`` < 128 offsets); autodiff keeps ``x``, a
  float per INPUT element. The padded input is built once (XLA fuses this into the backward,
  where padding per view made it keep every view).
  """
  xp = lax.pad(x, jnp.full((), -jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in config.pads])
  views = _views(config._replace(shape=xp.shape, pads=((0, 0),) * 4), xp, -jnp.inf)
  y = functools.reduce(jnp.maximum, views)
  kappa = jnp.zeros_like(y, jnp.int8)
  for k in range(len(views) - 1, -1, -1):
    kappa = jnp.where(views[k] == y, jnp.full((), k, kappa.dtype), kappa)
  return y, kappa


def _max_pool2d_bwd(config, kappa, g):
  r"""Backward of max pooling for the cotangent ``g``.

  Write a padded-input position as :math:`s j + o` with :math:`j` an output position and
  :math:`o` a window offset. Locally :math:`y_j = \bar x_{s j + o_{\kappa(j)}}`, so

  .. math::
    \frac{∂y_j}{∂\bar x_i} = [\, i = s j + o_{\kappa(j)} \,]
    \;\Rightarrow\;
    \frac{∂L}{∂\bar x_i} = \sum_j g_j \, [\, i = s j + o_{\kappa(j)} \,]
      = \sum_k \sum_j [\kappa(j) = k]\, g_j \, [\, i = s j + o_k \,]

  At a tie, :math:`\kappa(j)` is the first maximum: that is the convention. For a fixed
  :math:`k` the inner sum puts :math:`[\kappa = k]\, g` at the positions :math:`s j + o_k`;
  cropping the padding (:math:`-\infty`, it never wins) gives :math:`∂L/∂x`: that is
  :func:`_place_offsets`, or :func:`_place_blocks` on the blocks :math:`[\kappa(j) = k]\, g_j`
  for disjoint windows. The rule is linear in ``g`` and :math:`\kappa` is piecewise constant
  in ``x``: the derivative in ``x`` is 0 almost everywhere, as autodiff's (second order).
  """
  zero, size, split = jnp.zeros((), g.dtype), len(config.offsets), _blocked(config, g.shape,
                                                                          (1,) * 4)
  if config.disjoint:
    ks = jnp.asarray(np.arange(size).reshape(_blocked(config, (1,) * 4, config.window)),
                     kappa.dtype)
    dx = _place_blocks(config, jnp.where(kappa.reshape(split) == ks, g.reshape(split), zero))
  else:
    dx = _place_offsets(config, [jnp.where(kappa == jnp.full((), k, kappa.dtype), g, zero)
                                 for k in range(size)])
  return (dx.astype(config.dtype),)


_max_pool2d.defvjp(_max_pool2d_fwd, _max_pool2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool2d_native(config, x):
  return _reduce_window(config, x, -np.inf, lax.max)


def _max_pool2d_native_fwd(config, x):
  """Saves ``x`` (an input): select-and-scatter finds each window's first maximum in it."""
  return _reduce_window(config, x, -np.inf, lax.max), x


def _max_pool2d_native_bwd(config, x, g):
  r"""The rule of :func:`_max_pool2d_bwd`, evaluated by XLA's select-and-scatter.

  With :math:`\kappa(j)` the first maximum of window :math:`j` (row-major offsets):

  .. math::
    \frac{∂L}{∂\bar x_i} = \sum_j g_j \, [\, i = s j + o_{\kappa(j)} \,]

  Select-and-scatter scans each window of ``x`` in row-major order, keeps the first element
  that no later one exceeds (``ge``) and adds :math:`g_j` there: exactly this sum, the same
  tie convention. JAX emits it as the transpose of ``reduce_window`` max, which is what this
  calls; the padding (:math:`-\infty`) never wins. Select-and-scatter has no window dilation:
  dilated windows are scattered per phase, by the transpose of :func:`_max_by_phases`, whose
  undilated windows hold the same elements in the same order (so the same first maximum).
  """
  undilated = all(d == 1 for d in config.dilation)
  forward = (functools.partial(_reduce_window, config, init=-np.inf, op=lax.max) if undilated
             else functools.partial(_max_by_phases, config))
  return jax.vjp(forward, x)[1](g)


_max_pool2d_native.defvjp(_max_pool2d_native_fwd, _max_pool2d_native_bwd)


def _max_by_phases(config: _Config, x):
  r"""``reduce_window`` max over dilated windows, as undilated ``reduce_window`` maxima.

  Along an axis with stride :math:`s`, dilation :math:`d`, :math:`g = \gcd(s, d)` and
  :math:`V = d / g`, write the output position :math:`j = V u + v` (phase :math:`v < V`).
  Since :math:`s V = d s / g`, window :math:`j` holds

  .. math::
    \bar x_{s j + d p} = \bar x_{s v + d (s u / g + p)} = z^v_{(s / g) u + p},
    \qquad z^v_a = \bar x_{s v + d a}

  for :math:`p < k`: an undilated window :math:`k` at stride :math:`s / g` over the strided
  slice :math:`z^v`. Per pair of phases, one slice and one ``reduce_window`` (one in all when
  :math:`d` divides :math:`s`); the results interleave (stacked, then :math:`(u, v)` merged to
  :math:`j`, batch and channels untouched) and are cropped to the output. The phases of an axis
  start at distinct residues :math:`s v \bmod d`, so they read disjoint elements of ``x``.
  """
  phases = [d // math.gcd(s, d) for s, d in zip(config.strides, config.dilation)]
  rows = [-(-m // v) for m, v in zip(config.out_shape, phases)]  # outputs u per phase
  ends = [s * (v * r - 1) + k for s, v, r, k in zip(config.strides, phases, rows, config.span)]
  xp = lax.pad(x, jnp.full((), -jnp.inf, x.dtype),
               [(lo, end - n - lo, 0) for n, end, (lo, _) in zip(config.shape, ends, config.pads)])
  strides = [s // math.gcd(s, d) for s, d in zip(config.strides, config.dilation)]

  def phase(vs):
    begin = [s * v for s, v in zip(config.strides, vs)]
    end = [b + d * (t * (r - 1) + k - 1) + 1
           for b, d, t, r, k in zip(begin, config.dilation, strides, rows, config.window)]
    z = lax.slice(xp, begin, end, config.dilation)
    return lax.reduce_window(z, np.array(-np.inf, x.dtype), lax.max, config.window, strides,
                             ((0, 0),) * 4)

  if all(v == 1 for v in phases):
    return phase((0,) * 4)
  h, w = config.spatial
  blocks = jnp.stack([jnp.stack([phase(tuple({h: vh, w: vw}.get(a, 0) for a in range(4)))
                                 for vw in range(phases[w])], axis=w + 1)
                      for vh in range(phases[h])], axis=h + 1)
  merged = tuple(r * v for r, v in zip(rows, phases))
  y = blocks.reshape(merged, out_sharding=_merged_sharding(config, blocks))
  return lax.slice(y, (0,) * 4, config.out_shape)


def max_pool2d_reference(x: jax.Array, window, *, stride=None, padding="VALID", dilation=1,
                         ceil_mode: bool = False, layout: str = "NHWC") -> jax.Array:
  """Autodiff twin of :func:`max_pool2d`: a ``lax.reduce_window`` max, no custom rule.

  JAX has no VJP of ``reduce_window`` max with a dilated window: dilated windows are a running
  maximum over one strided slice of the padded input per window offset, in row-major order,
  that only a strictly larger element replaces (so the first maximum wins, as in the op)."""
  x, config = _validate("max_pool2d", x, window, stride, padding, layout, dilation=dilation,
                        ceil_mode=ceil_mode)
  if all(d == 1 for d in config.dilation):
    return _reduce_window(config, x, -np.inf, lax.max)
  xp = jnp.pad(x, config.pads, constant_values=-jnp.inf)
  y = None
  for o in config.offsets:
    view = lax.slice(xp, o, [oi + s * (m - 1) + 1 for oi, s, m in zip(
        o, config.strides, config.out_shape)], config.strides)
    y = view if y is None else jnp.where(view > y, view, y)
  return y


def avg_pool2d(x: jax.Array, window, *, stride=None, padding="VALID", ceil_mode: bool = False,
               layout: str = "NHWC", count_include_pad: bool = True) -> jax.Array:
  r"""2-D average pooling, with a manual VJP.

  With ``x`` zero-padded to :math:`\bar x`, window :math:`(k_h, k_w)` and stride
  :math:`(s_h, s_w)`:

  .. math::
    y_{n,i,j,c} = \frac{1}{c_{ij}} \sum_{0 \le p < k_h,\; 0 \le q < k_w}
      \bar x_{n,\, s_h i + p,\, s_w j + q,\, c}

  where :math:`c_{ij}` counts the elements of window :math:`(i, j)` in the input and its
  padding if ``count_include_pad`` (:math:`k_h k_w` unless ``ceil_mode`` takes the last window
  past the padding), else those in the input only, as PyTorch counts.

  Args:
    x: float[N, H, W, C] (``layout="NHWC"``) or float[N, C, H, W] (``"NCHW"``).
    window, stride, padding, ceil_mode, layout: as in :func:`max_pool2d` (the padding is zeros
      here; no dilation).
    count_include_pad: whether padding elements count in the divisor (never those that
      ``ceil_mode`` adds past the padding).

  Returns:
    float[N, H', W', C] (or float[N, C, H', W']) in the dtype of ``x``, as for max pooling.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.avg_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    >>> jlayers.avg_pool2d(jnp.arange(9.0).reshape(1, 3, 3, 1), 2, ceil_mode=True)[0, :, :, 0]
    Array([[2. , 3.5],
           [6.5, 8. ]], dtype=float32)
  """
  x, config = _validate("avg_pool2d", x, window, stride, padding, layout, count_include_pad,
                        ceil_mode=ceil_mode)
  native = functools.partial(_avg_pool2d_native, config)
  if len(config.offsets) > _MAX_VIEWS:
    return native(x)
  return _platform.by_platform(x, cpu=functools.partial(_avg_pool2d, config), native=native)


def _counts(config: _Config) -> np.ndarray:
  """The divisor :math:`c` of every output, a constant broadcastable to the output: per axis,
  the window elements in the input and its padding (``count_include_pad``; not ``ceil_mode``'s
  extra padding) or in the input alone; their product over the axes."""
  counts = np.ones((1,) * 4)
  for axis, (n, k, s, d, (lo, hi), e, m) in enumerate(zip(
      config.shape, config.window, config.strides, config.dilation, config.pads,
      config.ceil_extra, config.out_shape)):
    begin, end = (-lo, n + hi - e) if config.count_include_pad else (0, n)
    per_window = _inside(m, k, s, d, lo, begin, end).sum(axis=1)
    if (per_window == per_window[0]).all():
      per_window = per_window[:1]
    counts = counts * per_window.reshape([per_window.size if a == axis else 1 for a in range(4)])
  return counts


def _avg_forward(config: _Config, x):
  return functools.reduce(jnp.add, _views(config, x, 0.0)) / jnp.asarray(_counts(config), x.dtype)


_avg_pool2d = jax.custom_vjp(_avg_forward, nondiff_argnums=(0,))


def _avg_pool2d_fwd(config, x):
  """Saves nothing: ``y`` is linear in ``x``, with static coefficients (the divisors)."""
  return _avg_forward(config, x), None


def _avg_pool2d_bwd(config, _, g):
  r"""Backward of average pooling for the cotangent ``g``.

  With padded-input positions written :math:`s j + o_k` as for max pooling,
  :math:`y_j = c_j^{-1} \sum_k \bar x_{s j + o_k}`, so

  .. math::
    \frac{∂y_j}{∂\bar x_i} = c_j^{-1} \sum_k [\, i = s j + o_k \,]
    \;\Rightarrow\;
    \frac{∂L}{∂\bar x_i} = \sum_k \sum_j \frac{g_j}{c_j} \, [\, i = s j + o_k \,]

  Every offset puts the same :math:`g / c` at the positions :math:`s j + o_k`: each input
  element gets :math:`g_j / c_j` from every window holding it, and cropping the padding gives
  :math:`∂L/∂x` (:func:`_place_offsets`, or for disjoint windows :func:`_place_blocks` on
  :math:`g / c` broadcast over the offset axes). Linear in ``g``, independent of ``x``.
  """
  scaled = g / jnp.asarray(_counts(config), g.dtype)
  if config.disjoint:
    dx = _place_blocks(config, scaled.reshape(_blocked(config, g.shape, (1,) * 4)))
  else:
    dx = _place_offsets(config, [scaled] * len(config.offsets))
  return (dx.astype(config.dtype),)


_avg_pool2d.defvjp(_avg_pool2d_fwd, _avg_pool2d_bwd)


def _avg_native_forward(config: _Config, x):
  return _reduce_window(config, x, 0, lax.add) / jnp.asarray(_counts(config), x.dtype)


_avg_pool2d_native = jax.custom_vjp(_avg_native_forward, nondiff_argnums=(0,))


def _avg_pool2d_native_fwd(config, x):
  """Saves nothing, as :func:`_avg_pool2d_fwd`."""
  return _avg_native_forward(config, x), None


def _avg_pool2d_native_bwd(config, _, g):
  r"""The rule of :func:`_avg_pool2d_bwd`,

  .. math::
    \frac{∂L}{∂\bar x_i} = \sum_k \sum_j \frac{g_j}{c_j} \, [\, i = s j + o_k \,]
      = \sum_{o < k} \Big(\frac{g}{c}\Big)^s_{i - o}

  evaluated as one stride-1 window sum of :math:`g / c` dilated by the stride
  (:func:`_window_sum_transpose`).
  """
  scaled = g / jnp.asarray(_counts(config), g.dtype)
  return (_window_sum_transpose(config, scaled).astype(config.dtype),)


_avg_pool2d_native.defvjp(_avg_pool2d_native_fwd, _avg_pool2d_native_bwd)


def avg_pool2d_reference(x: jax.Array, window, *, stride=None, padding="VALID",
                         ceil_mode: bool = False, layout: str = "NHWC",
                         count_include_pad: bool = True) -> jax.Array:
  """Autodiff twin of :func:`avg_pool2d`: window sums over divisors, no custom rule. The
  divisors are ``reduce_window`` sums over padded ones, not the manual op's closed form: ones
  over the input and its padding (``count_include_pad``) or over the input alone, padded with
  zeros for the rest (``ceil_mode``'s extra padding included)."""
  x, config = _validate("avg_pool2d", x, window, stride, padding, layout, count_include_pad,
                        ceil_mode=ceil_mode)
  total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, config.window, config.strides,
                            config.pads)
  if count_include_pad and not any(config.ceil_extra):
    return total / jnp.asarray(np.prod(config.window), x.dtype)
  if count_include_pad:
    shape = [n + lo + hi - e for n, (lo, hi), e in zip(x.shape, config.pads, config.ceil_extra)]
    pads = [(0, e) for e in config.ceil_extra]
  else:
    shape, pads = list(x.shape), config.pads
  ones = jnp.ones([n if a in config.spatial else 1 for a, n in enumerate(shape)], x.dtype)
  return total / lax.reduce_window(ones, np.array(0, x.dtype), lax.add, config.window,
                                   config.strides, [p if a in config.spatial else (0, 0)
                                                    for a, p in enumerate(pads)])
