"""The block structure of :mod:`jlayers.attention`'s blockwise formulation.

Inside the rule, heads are split as ``N = (K, G)`` and the layouts are head-major: ``q`` as
``[B, K, G, T, H]``, ``k`` and ``v`` as ``[B, K, S, H]``, rows padded to whole blocks. The
rule visits the (query block, key block) pairs of :class:`Blocks` in one ``lax.scan``, in the
forward and again in the backward; the block sizes are chosen here, in one place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlayers import _sharding


BLOCK = 128
"""Query rows or keys per block along a sequence longer than :data:`SHORT_SEQUENCE`."""
SHORT_BLOCK = 64
"""Query rows or keys per block along a sequence of at most :data:`SHORT_SEQUENCE` (fewer when
the sequence is shorter still)."""
SHORT_SEQUENCE = 512


def block_size(length: int) -> int:
  """Rows per block along a sequence of ``length`` positions: :data:`SHORT_BLOCK` up to
  :data:`SHORT_SEQUENCE` positions, :data:`BLOCK` beyond, never more than the sequence. The
  sizes were chosen by timing the op and a transformer training step on XLA:CPU at 512 to
  2 048 positions (the README's benchmark section has the figures)."""
  return max(1, min(length, SHORT_BLOCK if length <= SHORT_SEQUENCE else BLOCK))


class Blocks(NamedTuple):
  """The padded, head-major operands and the static block structure of one call."""

  q: jax.Array  # [B, K, G, Tp, H]
  k: jax.Array  # [B, K, Sp, H]
  v: jax.Array  # [B, K, Sp, H]
  mask: jax.Array | None  # [Bm, Km, Gm, Tm, Sm], each 1 or full (padded)
  pairs: tuple[np.ndarray, np.ndarray]  # (query block, key block) of every visited block
  t: int
  s: int


def pad(a, axis, size):
  if a.shape[axis] in (1, size):
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, widths)


def blocks(config, q, k, v, mask) -> Blocks:
  b, t, n, h = q.shape
  s, heads = k.shape[1], k.shape[2]
  g = n // heads
  nq, nk = -(-t // config.block_q), -(-s // config.block_k)
  tp, sp = nq * config.block_q, nk * config.block_k
  qh = pad(q.reshape(b, t, heads, g, h).transpose(0, 2, 3, 1, 4), 3, tp)
  kh, vh = (pad(a.transpose(0, 2, 1, 3), 2, sp) for a in (k, v))
  if mask is not None:
    mask = pad(pad(head_major_mask(mask, q, heads), 3, tp), 4, sp)
  i, j = np.meshgrid(np.arange(nq), np.arange(nk), indexing="ij")
  keep = np.ones_like(i, bool)
  if config.causal:  # skip blocks whose first key comes after their last query
    keep = j * config.block_k <= i * config.block_q + config.block_q - 1
  pairs = (i[keep].astype(np.int32), j[keep].astype(np.int32))
  return Blocks(qh, kh, vh, mask, pairs, t, s)


def head_major_mask(mask, q, heads):
  """``mask [Bm, Nm, Tm, Sm]`` as ``[Bm, K, G, Tm, Sm]`` (or ``[Bm, 1, 1, Tm, Sm]``), its batch
  laid out as ``q``'s where the types carry shardings (a replicated mask next to batch-split
  scores would make the select ambiguous; splitting it is a local slice)."""
  mb, mn, mt, ms = mask.shape
  n = q.shape[2]
  mask = mask.reshape(mb, heads, n // heads, mt, ms) if mn == n else mask.reshape(
      mb, 1, 1, mt, ms)
  return _sharding.reshard_like(mask, q, axes=(0,))


def rows(a, i, size, axis):
  """Block ``i`` (of ``size``) of ``a`` along ``axis``; a size-1 (broadcast) axis as it is."""
  if a.shape[axis] == 1:
    return a
  return lax.dynamic_slice_in_dim(a, i * size, size, axis)


def put(a, update, i, size, axis):
  return lax.dynamic_update_slice_in_dim(a, update, i * size, axis)
