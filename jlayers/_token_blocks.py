"""Blocks of tokens for ops that sweep a ``[tokens, vocabulary]`` product block by block
(:mod:`jlayers.linear_cross_entropy`): the one byte budget that sizes the blocks, blocks that
need no padding, the weight gradient added up one slice of columns at a time, and the run of
each device on its own tokens on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jlayers import _sharding

BLOCK_BYTES = 32 * 2**20
"""The memory budget of a sweep: one block of logits ``[tokens, V]`` and one slice of the weight
gradient ``[H, columns]``, in the compute dtype, each take at most this many bytes (a block holds
at least one token, a slice one column). The compiled value and gradient of
``linear_cross_entropy`` then hold about two such buffers beside its inputs and outputs,
whatever the number of tokens: 32 MiB makes blocks of 256 tokens at V = 32 768 in float32 (32
at V = 256 000) and slices of 8 192 columns at H = 1 024. Smaller blocks save memory but cost
time: on XLA:CPU, the products of blocks of 128 tokens took about 1.4× as long as of 256."""


def sizes(n: int, h: int, v: int, itemsize: int) -> tuple[int, int]:
  """``(tokens per block, columns per slice)`` for ``n`` tokens, ``H`` features, ``V`` columns
  and ``itemsize`` bytes per float: the tokens a power of two (at most ``n``), from
  :data:`BLOCK_BYTES`."""
  tokens = max(1, BLOCK_BYTES // (v * itemsize))
  cols = max(1, BLOCK_BYTES // (max(h, 1) * itemsize))
  return min(n, 1 << (tokens.bit_length() - 1)), min(v, cols)


def clamped(i, size: int, total: int):
  """Block ``i`` of ``size`` entries along ``total``: its start, clamped so that the last block
  ends at ``total`` (overlapping the one before, instead of padding the input), and which of
  its entries no earlier block held."""
  start = jnp.minimum(i * size, total - size)
  return start, start + lax.iota(jnp.int32, size) >= i * size


def zeros(shape, dtype, like):
  """Zeros of ``shape`` varying over the manual mesh axes that ``like`` varies over: a loop's
  carry must keep its type under ``shard_map``, where the blocks it takes in vary."""
  z = jnp.zeros(shape, dtype)
  names = tuple(sorted(getattr(getattr(jax.typeof(like), "mat", None), "varying", ())))
  return lax.pcast(z, names, to="varying") if names else z


def add_outer(acc, a, b, cols: int):
  """``acc + aᵀ b`` (``a: [t, H]``, ``b: [t, V]``, ``acc: [H, V]``) one slice of ``cols``
  columns at a time, updated in place in a loop's carry: the product of the whole block would
  be a second ``[H, V]`` buffer."""
  v = b.shape[1]
  dims = (((0,), (0,)), ((), ()))
  if cols >= v:
    return acc + lax.dot_general(a, b, dims, preferred_element_type=acc.dtype)

  def column_slice(k, acc):
    start, fresh = clamped(k, cols, v)
    part = lax.dynamic_slice_in_dim(b, start, cols, 1)
    part = jnp.where(fresh[None, :], part, jnp.zeros_like(part))  # columns added already
    prod = lax.dot_general(a, part, dims, preferred_element_type=acc.dtype)
    return lax.dynamic_update_slice_in_dim(
        acc, lax.dynamic_slice_in_dim(acc, start, cols, 1) + prod, start, 1)

  return lax.fori_loop(0, -(-v // cols), column_slice, acc)


def per_device(fn, x, split: dict, shared, out_keys: tuple[str, ...], summed: tuple[str, ...]):
  """``fn(split, shared) -> {key: array}``, each device on its own tokens.

  ``split`` holds ``x: [..., H]`` and arrays of its tokens (``x.shape[:-1]``). Where the first
  axis of a rank ≥ 2 ``x`` is split over mesh axes (:func:`jlayers._sharding.split_axis`),
  ``fn`` runs under ``shard_map``: the ``split`` arrays are laid out as ``x`` first, whatever
  their sharding (replicated labels, a closed-over constant), ``shared`` (the weights) is
  replicated, the outputs ``out_keys`` come back split as ``x``, except those in ``summed``,
  added over the devices (one all-reduce each, weight-sized). Elsewhere ``fn`` as it is.
  """
  parts, names, explicit = _sharding.split_axis(x, 0) if x.ndim > 1 else (1, (), False)
  if parts == 1:
    return fn(split, shared)
  if explicit:
    split = {k: _sharding.reshard_like(a, x) for k, a in split.items()}
    shared = jax.tree_util.tree_map(
        lambda a: jax.sharding.reshard(a, P()) if any(jax.typeof(a).sharding.spec) else a, shared)

  def body(split, shared):
    out = fn(split, shared)
    return {k: lax.psum(a, names) if k in summed else a for k, a in out.items()}

  return jax.shard_map(body, in_specs=({k: P(names) for k in split}, P()),
                       out_specs={k: P() if k in summed else P(names) for k in out_keys},
                       axis_names=set(names))(split, shared)
