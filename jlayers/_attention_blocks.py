"""The block structure of :mod:`jlayers.attention`'s blockwise formulation.

Inside the rule, heads are split as ``N = (K, G)`` and the layouts are head-major: ``q`` as
``[B, K, G, T, H]``, ``k`` and ``v`` as ``[B, K, S, H]``, rows padded to whole blocks. The
rule visits the (query block, key block) pairs of :class:`Blocks` in one ``lax.scan``, in the
forward and again in the backward; the block sizes are chosen here, in one place, and so is
which entries of a block a query may see (:func:`visible`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlayers import _checks, _sharding

BLOCK = 128
"""Query rows or keys per block along a sequence longer than :data:`SHORT_SEQUENCE`."""
SHORT_BLOCK = 64
"""Query rows or keys per block along a sequence of at most :data:`SHORT_SEQUENCE` (fewer when
the sequence is shorter still)."""
SHORT_SEQUENCE = 512
ROW_BLOCK_SCORES = 1 << 16
"""With this many scores or fewer in a whole ``T × S`` block of one head (one query row of
decoding against a cache of up to 65 536 keys), the keys are one block: the forward is one
product of the rows with every key, a softmax and one product with the values, with no loop
over key blocks."""


def key_block_size(t: int, s: int) -> int:
  """Keys per block for ``t`` query rows against ``s`` keys: all of them when ``t · s`` is at
  most :data:`ROW_BLOCK_SCORES` and ``t`` fits one query block (a few rows against a cache),
  else :func:`block_size` of ``s``."""
  if t <= SHORT_BLOCK and t * s <= ROW_BLOCK_SCORES and t < s:
    return max(1, s)
  return block_size(s)


def block_size(length: int) -> int:
  """Rows per block along a sequence of ``length`` positions: :data:`SHORT_BLOCK` up to
  :data:`SHORT_SEQUENCE` positions, :data:`BLOCK` beyond, never more than the sequence. The
  sizes were chosen by timing the op and a transformer training step on XLA:CPU at 512 to
  2 048 positions (the README's benchmark section has the figures)."""
  return max(1, min(length, SHORT_BLOCK if length <= SHORT_SEQUENCE else BLOCK))


class Config(NamedTuple):
  """The static configuration of one call (hashable; goes in ``nondiff_argnums``)."""

  causal: bool
  scale: float
  block_q: int
  block_k: int
  window: tuple[int, int] | None = None  # (left, right): i - left <= j <= i + right
  soft_cap: float | None = None


class Extras(NamedTuple):
  """The optional arrays of one call, as the caller gave them (``None`` where absent)."""

  mask: jax.Array | None = None  # bool, broadcastable to [B, N, T, S]
  bias: jax.Array | None = None  # float, broadcastable to [B, N, T, S]
  sinks: jax.Array | None = None  # float[N]
  q_segment_ids: jax.Array | None = None  # int[B, T]
  kv_segment_ids: jax.Array | None = None  # int[B, S]
  query_seq_lengths: jax.Array | None = None  # int[B]
  key_value_seq_lengths: jax.Array | None = None  # int[B]


class Blocks(NamedTuple):
  """The padded, head-major operands and the static block structure of one call."""

  q: jax.Array  # [B, K, G, Tp, H]
  k: jax.Array  # [B, K, Sp, H]
  v: jax.Array  # [B, K, Sp, H]
  mask: jax.Array | None  # [Bm, Km, Gm, Tm, Sm], each 1 or full (padded)
  bias: jax.Array | None  # [Bb, Kb, Gb, Tb, Sb], each 1 or full (padded)
  q_segments: jax.Array | None  # [B, 1, 1, Tp, 1]
  kv_segments: jax.Array | None  # [B, 1, 1, 1, Sp]
  q_lengths: jax.Array | None  # [B, 1, 1, 1, 1]
  kv_lengths: jax.Array | None  # [B, 1, 1, 1, 1]
  pairs: tuple[np.ndarray, np.ndarray]  # (query block, key block) of every visited block
  t: int
  s: int


def pad(a, axis, size):
  if a.shape[axis] in (1, size):
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, widths)


def visited_pairs(config: Config, t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
  """The (query block, key block) pairs that hold at least one entry the causal mask and the
  local window leave visible; the others are skipped, so that the work grows with
  ``T · window`` rather than ``T · S``."""
  bq, bk = config.block_q, config.block_k
  i, j = np.meshgrid(np.arange(-(-t // bq)), np.arange(-(-s // bk)), indexing="ij")
  first_row, last_row = i * bq, i * bq + bq - 1
  first_col, last_col = j * bk, j * bk + bk - 1
  keep = np.ones_like(i, bool)
  right = 0 if config.causal else None
  if config.window is not None:
    left, wright = config.window
    keep &= last_col >= first_row - left
    right = wright if right is None else min(right, wright)
  if right is not None:
    keep &= first_col <= last_row + right
  return i[keep].astype(np.int32), j[keep].astype(np.int32)


def blocks(config: Config, q, k, v, extras: Extras) -> Blocks:
  b, t, n, h = q.shape
  s, heads = k.shape[1], k.shape[2]
  g = n // heads
  tp = -(-t // config.block_q) * config.block_q
  sp = -(-s // config.block_k) * config.block_k
  qh = pad(q.reshape(b, t, heads, g, h).transpose(0, 2, 3, 1, 4), 3, tp)
  kh, vh = (pad(a.transpose(0, 2, 1, 3), 2, sp) for a in (k, v))
  mask, bias = (None if a is None else pad(pad(head_major(a, q, heads), 3, tp), 4, sp)
                for a in (extras.mask, extras.bias))

  def per_example(a, shape, axis=4, length=1):
    if a is None:
      return None
    return _sharding.reshard_like(pad(a.reshape(shape), axis, length), q, axes=(0,))

  return Blocks(qh, kh, vh, mask, bias,
                per_example(extras.q_segment_ids, (b, 1, 1, t, 1), 3, tp),
                per_example(extras.kv_segment_ids, (b, 1, 1, 1, s), 4, sp),
                per_example(extras.query_seq_lengths, (b, 1, 1, 1, 1)),
                per_example(extras.key_value_seq_lengths, (b, 1, 1, 1, 1)),
                visited_pairs(config, t, s), t, s)


def head_major(a, q, heads):
  """A mask or bias ``[Bm, Nm, Tm, Sm]`` as ``[Bm, K, G, Tm, Sm]`` (or ``[Bm, 1, 1, Tm, Sm]``),
  its batch and heads laid out as ``q``'s where the types carry shardings (a replicated mask next to
  batch-split scores would make the select ambiguous; splitting it is a local slice)."""
  mb, mn, mt, ms = a.shape
  n = q.shape[2]
  a = _sharding.reshard_like(a, q, axes=(0, 2))  # batch and heads as q's, where whole
  return a.reshape(mb, heads, n // heads, mt, ms) if mn == n else a.reshape(mb, 1, 1, mt, ms)


def visible(config: Config, blk: Blocks, i, j):
  """Which entries of block ``(i, j)`` query rows may see: a bool array broadcastable to
  ``[B, K, G, bq, bk]``, or ``None`` when every entry is visible. An entry is visible when it
  is a real key (not padding), and the causal mask, the local window, the mask, the segment
  ids and the sequence lengths all allow it."""
  shape = (1, 1, 1, config.block_q, config.block_k)
  row = i * config.block_q + lax.broadcasted_iota(jnp.int32, shape, 3)
  col = j * config.block_k + lax.broadcasted_iota(jnp.int32, shape, 4)
  conditions = []
  if blk.k.shape[2] != blk.s:
    conditions.append(col < blk.s)
  if config.causal:
    conditions.append(col <= row)
  if config.window is not None:
    left, right = config.window
    conditions += [col >= row - left, col <= row + right]
  if blk.mask is not None:
    conditions.append(rows(rows(blk.mask, i, config.block_q, 3), j, config.block_k, 4))
  if blk.q_segments is not None:
    conditions.append(rows(blk.q_segments, i, config.block_q, 3)
                      == rows(blk.kv_segments, j, config.block_k, 4))
  if blk.q_lengths is not None:
    conditions.append(row < blk.q_lengths)
  if blk.kv_lengths is not None:
    conditions.append(col < blk.kv_lengths)
  if not conditions:
    return None
  valid = conditions[0]
  for c in conditions[1:]:
    valid = valid & c
  return valid


def scores(config, blk, qi, kj, i, j):
  """The scores ``S`` of one block, [B, K, G, bq, bk] in at least float32, hidden entries at
  ``-inf``, and ``tanh(z / c)`` when soft-capped (the backward's chain factor), else None."""
  f32 = _checks.at_least_float32(qi.dtype)
  s = lax.dot_general(qi, kj, (((4,), (3,)), ((0, 1), (0, 1))),
                      preferred_element_type=f32) * config.scale
  if blk.bias is not None:
    s = s + rows(rows(blk.bias, i, config.block_q, 3), j, config.block_k, 4).astype(f32)
  tanh = None
  if config.soft_cap is not None:
    tanh = jnp.tanh(s / config.soft_cap)
    s = config.soft_cap * tanh
  valid = visible(config, blk, i, j)
  return (s if valid is None else jnp.where(valid, s, -jnp.inf)), tanh


def dense_visibility(config: Config, ex: Extras, q, s_len: int, heads: int) -> list:
  """The twin's visibility conditions, each a whole ``T × S`` (or per-example) bool array
  broadcastable to ``[B, K, G, T, S]``: an entry is visible where all of them hold."""
  b, t = q.shape[:2]
  i = jnp.arange(t, dtype=jnp.int32).reshape(1, 1, 1, t, 1)
  j = jnp.arange(s_len, dtype=jnp.int32).reshape(1, 1, 1, 1, s_len)
  valid = [] if ex.mask is None else [head_major(ex.mask, q, heads)]
  if config.causal:
    valid.append(j <= i)
  if config.window is not None:
    valid += [j >= i - config.window[0], j <= i + config.window[1]]

  def per_example(a, shape):  # laid out as q's batch, as the scores are
    return _sharding.reshard_like(a.reshape(shape), q, axes=(0,))

  if ex.q_segment_ids is not None:
    valid.append(per_example(ex.q_segment_ids, (b, 1, 1, t, 1))
                 == per_example(ex.kv_segment_ids, (b, 1, 1, 1, s_len)))
  if ex.query_seq_lengths is not None:
    valid.append(i < per_example(ex.query_seq_lengths, (b, 1, 1, 1, 1)))
  if ex.key_value_seq_lengths is not None:
    valid.append(j < per_example(ex.key_value_seq_lengths, (b, 1, 1, 1, 1)))
  return valid


def empty(q, sinks):
  """The output (zeros) and log-sum-exp (``-inf``, or the row's sink) when no key exists."""
  b, t, n, _ = q.shape
  f32 = _checks.at_least_float32(q.dtype)
  if sinks is None:
    return jnp.zeros_like(q), jnp.full((b, t, n), -jnp.inf, f32)
  return jnp.zeros_like(q), jnp.broadcast_to(sinks.astype(f32), (b, t, n))


def safe_max(m):
  """A running maximum with ``-inf`` (no key seen yet) replaced by 0, so that ``s − m`` and
  ``m_old − m`` are never ``-inf − (-inf)``."""
  return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def head_major_sinks(sinks, k, f32):
  """The sinks float[N] as [1, K, G, 1] in ``f32``."""
  heads = k.shape[2]
  return sinks.astype(f32).reshape(1, heads, -1, 1)


def public_lse(lse, q):
  """The log-sum-exp as returned, [B, T, N]: ``-inf`` (log of an empty sum) where the rule
  keeps ``+inf``."""
  b, t, n, _ = q.shape
  lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)
  return lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def rows(a, i, size, axis):
  """Block ``i`` (of ``size``) of ``a`` along ``axis``; a size-1 (broadcast) axis as it is."""
  if a.shape[axis] == 1:
    return a
  return lax.dynamic_slice_in_dim(a, i * size, size, axis)


def put(a, update, i, size, axis):
  """``a`` with block ``i`` along ``axis`` replaced by ``update``; a size-1 axis as a whole."""
  if a.shape[axis] == 1:
    return update
  return lax.dynamic_update_slice_in_dim(a, update, i * size, axis)


def reduce_to(x, shape):
  """``x`` summed over the axes where ``shape`` has 1 and ``x`` does not (keeping them): the
  gradient of an operand broadcast to ``x``'s shape."""
  axes = tuple(a for a, (m, n) in enumerate(zip(shape, x.shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x
