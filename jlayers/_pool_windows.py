"""Window arithmetic of 2-D pooling: configuration, output sizes, divisors, and the views and
placements the rules of :mod:`jlayers.pool` are evaluated with.

Per-axis tuples follow the axes of ``x`` (window 1, stride 1, dilation 1, no padding on batch
and channels) for both layouts alike. A padded-input position is written ``s j + o`` with
``j`` an output position and ``o`` a window offset.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlayers import _checks, _sharding


_SPATIAL = {"NHWC": (1, 2), "NCHW": (2, 3)}


class Config(NamedTuple):
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


def validate(op, x, window, stride, padding, layout, count_include_pad=True, dilation=1,
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
  return x, Config(tuple(x.shape), x.dtype, per_axis(window, 1), per_axis(stride, 1),
                    per_axis(pads, (0, 0)), spatial, count_include_pad, per_axis(dilation, 1),
                    per_axis(extra, 0))


def _inside(m: int, k: int, s: int, d: int, lo: int, begin: int, end: int) -> np.ndarray:
  """``bool[m, k]``: whether element ``p`` of window ``j`` (at ``s j + d p - lo`` of the input)
  lies in ``[begin, end)``."""
  position = (np.arange(m) * s - lo)[:, None] + d * np.arange(k)
  return (begin <= position) & (position < end)


def views(config: Config, x: jax.Array, fill: float) -> list[jax.Array]:
  r"""The output-shaped views :math:`v_k[j] = \bar x_{s j + o_k}`, one per window offset.

  :math:`\bar x` (``x`` padded with ``fill``) is never built: each view is a strided slice of
  ``x``, padded where it leaves ``x``, and fuses into its consumer. Reduced elementwise, they
  beat ``reduce_window`` on XLA:CPU for small windows, but their cost grows with the offset
  count, so windows of more than :data:`MAX_VIEWS` offsets (global pooling) take
  ``reduce_window`` there too.
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


def place_offsets(config: Config, parts) -> jax.Array:
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


def place_blocks(config: Config, blocks: jax.Array) -> jax.Array:
  r"""Input-shaped array with ``blocks[..., j_0, o_0, ..., j_1, o_1, ...]`` at :math:`s j + o - lo`.

  Disjoint windows only (one entry per position): ``blocks``, broadcast to the blocked output
  shape (each spatial axis ``m`` split into ``(m, k)``, see :func:`blocked`), is spread by the
  dilation ``d`` and padded from ``k`` to ``s`` per offset axis, reshaped (``(j, o)`` to
  ``s j + o``), cropped. Batch and channel axes are never split or merged, so a batch split
  over devices stays local.
  """
  zero, out, steps = jnp.zeros((), blocks.dtype), config.out_shape, config.strides
  blocks = jnp.broadcast_to(blocks, blocked(config, out, config.window))
  blocks = lax.pad(blocks, zero, [
      p for a, (s, k, d) in enumerate(zip(steps, config.span, config.dilation))
      for p in (((0, 0, 0), (0, s - k, d - 1)) if a in config.spatial else ((0, 0, 0),))])
  merged = tuple(m * s for m, s in zip(out, steps))
  merged_blocks = blocks.reshape(merged,
                                 out_sharding=_sharding.merged_spec(blocks, _merges(config)))
  return lax.pad(merged_blocks, zero, [
      (-lo, n - m * s + lo, 0) for n, m, s, (lo, _) in zip(config.shape, out, steps, config.pads)])


def _merges(config: Config) -> tuple[int, ...]:
  """Axes per axis of a blocked array (:func:`blocked`): each spatial pair merges into one."""
  return tuple(2 if a in config.spatial else 1 for a in range(4))


def blocked(config: Config, shape, inner) -> tuple[int, ...]:
  """``shape`` with each spatial axis ``a`` split into ``(shape[a], inner[a])``."""
  return tuple(v for a, n in enumerate(shape)
               for v in ((n, inner[a]) if a in config.spatial else (n,)))


# Windows with more offsets than this take the native formulation on CPU as well.
MAX_VIEWS = 100


def reduce_window(config: Config, x, init, op):
  return lax.reduce_window(x, np.array(init, x.dtype), op, config.window, config.strides,
                           config.pads, window_dilation=config.dilation)


def window_sum_transpose(config: Config, g):
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


def max_by_phases(config: Config, x):
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
  y = blocks.reshape(merged, out_sharding=_sharding.merged_spec(blocks, _merges(config)))
  return lax.slice(y, (0,) * 4, config.out_shape)


def counts(config: Config) -> np.ndarray:
  """The divisor :math:`c` of every output, a constant broadcastable to the output: per axis,
  the window elements in the input and its padding (``count_include_pad``; not ``ceil_mode``'s
  extra padding) or in the input alone; their product over the spatial axes (batch and
  channels, of window 1, count 1 each, and may be empty)."""
  counts = np.ones((1,) * 4)
  for axis in config.spatial:
    n, k, s, d = (config.shape[axis], config.window[axis], config.strides[axis],
                  config.dilation[axis])
    (lo, hi), e, m = config.pads[axis], config.ceil_extra[axis], config.out_shape[axis]
    begin, end = (-lo, n + hi - e) if config.count_include_pad else (0, n)
    per_window = _inside(m, k, s, d, lo, begin, end).sum(axis=1)
    if (per_window == per_window[0]).all():
      per_window = per_window[:1]
    counts = counts * per_window.reshape([per_window.size if a == axis else 1 for a in range(4)])
  return counts
