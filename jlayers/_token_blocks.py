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

from jlayers import _platform, _sharding

BLOCK_BYTES = 32 * 2**20
"""The memory budget of a sweep: one block of logits ``[tokens, V]`` and one slice of the weight
gradient ``[H, columns]``, in the compute dtype, each take at most this many bytes (a block holds
at least one token, a slice one column). The compiled value and gradient of
``linear_cross_entropy`` then hold about two such buffers beside its inputs and outputs,
whatever the number of tokens: 32 MiB makes blocks of 256 tokens at V = 32 768 in float32 (32
at V = 256 000) and slices of 8 192 columns at H = 1 024. Smaller blocks save memory but cost
time: on XLA:CPU, the products of blocks of 128 tokens took about 1.4× as long as of 256."""


ACCELERATOR_BLOCK_BYTES = 128 * 2**20
""":data:`BLOCK_BYTES` on GPUs and TPUs. There each block is a few large kernels (the block's
product, its softmax fusion, the two gradient products) launched from the loop, and a block must
fill the device: blocks of 1 024 tokens at V = 32 768 in float32 (128 at V = 256 000) give each
product at least 128 rows of the matrix units' tiles, and 4× fewer loop iterations than the CPU's
budget, for two buffers of 128 MiB beside the inputs — small next to an accelerator's memory
and next to the logits this op never forms (``T · V`` floats)."""


def sizes(n: int, h: int, v: int, itemsize: int, budget: int | None = None) -> tuple[int, int]:
  """``(tokens per block, columns per slice)`` for ``n`` tokens, ``H`` features, ``V`` columns
  and ``itemsize`` bytes per float: the tokens a power of two (at most ``n``), from ``budget``
  bytes (default :data:`BLOCK_BYTES`)."""
  budget = BLOCK_BYTES if budget is None else budget
  tokens = max(1, budget // (v * itemsize))
  cols = max(1, budget // (max(h, 1) * itemsize))
  return min(n, 1 << (tokens.bit_length() - 1)), min(v, cols)


def per_platform(sweep, n: int, h: int, v: int, itemsize: int):
  """``sweep((tokens, columns))`` with the sizes of the platform lowered for: :data:`BLOCK_BYTES`
  on a CPU, :data:`ACCELERATOR_BLOCK_BYTES` elsewhere (:func:`jax.lax.platform_dependent`; one
  sweep when both give the same sizes, as for every problem that fits one CPU block)."""
  cpu, accelerator = sizes(n, h, v, itemsize), sizes(n, h, v, itemsize, ACCELERATOR_BLOCK_BYTES)
  if cpu == accelerator:
    return sweep(cpu)
  return _platform.by_platform(cpu=lambda: sweep(cpu), native=lambda: sweep(accelerator))


def clamped(i, size: int, total: int):
  """Block ``i`` of ``size`` entries along ``total``: its start, clamped so that the last block
  ends at ``total`` (overlapping the one before, instead of padding the input), and which of
  its entries no earlier block held."""
  start = jnp.minimum(i * size, total - size)
  return start, start + lax.iota(jnp.int32, size) >= i * size


def zeros(shape, dtype, like, extra=()):
  """Zeros of ``shape`` varying over the manual mesh axes that ``like`` varies over (and
  ``extra``): a loop's carry must keep its type under ``shard_map``, where the blocks it takes
  in vary."""
  z = jnp.zeros(shape, dtype)
  varying = set(getattr(getattr(jax.typeof(like), "mat", None), "varying", ())) | set(extra)
  names = tuple(sorted(varying))
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
  """``fn(split, shared[, vocab]) -> {key: array}``, each device on its own tokens (and its
  own columns of ``shared``).

  ``split`` holds ``x: [..., H]`` and arrays of its tokens (``x.shape[:-1]``). Where the first
  axis of a rank ≥ 2 ``x`` is split over mesh axes (:func:`jlayers._sharding.split_axis`),
  ``fn`` runs under ``shard_map``: the ``split`` arrays are laid out as ``x`` first, whatever
  their sharding (replicated labels, a closed-over constant), the outputs ``out_keys`` come
  back split as ``x``, except those in ``summed``, added over the devices (one all-reduce
  each, weight-sized). ``shared`` (the weight ``[H, V]``) is replicated, unless its types say
  its columns are split over other mesh axes (vocabulary parallel): then each device keeps its
  columns, ``fn`` gets ``vocab = (those axes, V, the first column's index)`` and combines
  what a token needs across them itself, and the ``summed`` outputs stay split as ``shared``.
  Elsewhere ``fn(split, shared)`` as it is.
  """
  parts, names, explicit = _sharding.split_axis(x, 0) if x.ndim > 1 else (1, (), False)
  vocab = ()
  if _sharding.explicit(shared):
    vocab = tuple(n for n in _sharding.axis_names(_sharding.entry(shared, 1)) if n not in names)
  if parts == 1 and not vocab:
    return fn(split, shared)
  columns = P(None, vocab if len(vocab) > 1 else vocab[0]) if vocab else P()
  if explicit:
    split = {k: _sharding.reshard_like(a, x) for k, a in split.items()}
    if jax.typeof(shared).sharding.spec != columns:
      shared = jax.sharding.reshard(shared, columns)
  rows = P(names) if names else P()

  def body(split, shared):
    if vocab:
      size = shared.shape[1]
      out = fn(split, shared, (vocab, size * _sharding.mesh_size(vocab),
                               lax.axis_index(vocab) * size))
    else:
      out = fn(split, shared)
    return {k: lax.psum(a, names) if k in summed and names else a for k, a in out.items()}

  return jax.shard_map(body, in_specs=({k: rows for k in split}, columns),
                       out_specs={k: columns if k in summed else rows for k in out_keys},
                       axis_names=set(names) | set(vocab))(split, shared)
