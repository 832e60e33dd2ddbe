"""Attention as Pallas kernels for GPUs (Triton: Ampere, Hopper, ROCm): a forward and two
backward kernels, from the derivation and residuals of :mod:`jlayers.attention`.

The forward is the XLA form's online softmax written for the hardware: one program per
(batch, query head, block of query rows) keeps its block of ``q``, its running maximum ``m``,
sum ``l`` and output accumulator in registers and walks the key blocks its rows can see
(:func:`jlayers._attention_kernels.key_range`), so that the whole forward is one launch. It
writes the output (float32) and the log-sum-exp ``L = m + log l`` per row. The backward
(:func:`backward`) recomputes each block's probabilities from ``L``: one program per (batch,
key/value head, key block) sums ``dK``, ``dV`` over the group's query heads and the query
blocks that see it (so grouped heads need no atomics), one per (batch, query head, query
block) sums ``dQ`` over its key blocks and writes the bias's gradient block by block.

Triton's tensors have power-of-two shapes: blocks are powers of two of at least 16, ``T``
and ``S`` are padded to whole blocks (padded keys lie past every key length, padded rows are
dropped), and ``H`` to a power of two with zero features. A bias or mask broadcast along a
dimension is read as a block of size 1 there; a bias's gradient is written per (batch, head),
per query block where it broadcasts along queries, and summed over its broadcast dimensions
afterwards.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jlayers import _attention_kernels as _k

def _load(ref, *index):
  """``ref[index]`` where an axis of size 1 (a broadcast mask or bias) is read whole."""
  index = tuple(ix if ref.shape[a] != 1 else
                (slice(None) if isinstance(ix, (slice, pl.Slice)) else 0)
                for a, ix in enumerate(index))
  return ref[index]


def _forward_kernel(q_ref, k_ref, v_ref, q_len_ref, kv_len_ref, *refs, spec, ops):
  """One (batch, query head, query block): ``q_ref [bq, H]``, ``k_ref``, ``v_ref [Sp, H]``;
  writes ``o_ref [bq, H]`` and ``lse_ref [bq]``."""
  opt, (o_ref, lse_ref) = _k.unpack(refs, ops)
  i = pl.program_id(2)
  bq, bk = spec.block_q, spec.block_k
  acc = lse_ref.dtype  # float32, or float64 for float64 inputs (the interpret-mode proof)
  q = q_ref[...]  # scores from the inputs' dtype, accumulated in acc (as the XLA form's)
  q_len, kv_len = q_len_ref[0], kv_len_ref[0]
  rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  q_seg = opt["q_seg"][...].reshape(bq, 1) if spec.segments else None

  def step(j, carry):
    m, l, o = carry
    keys = pl.ds(j * bk, bk)
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    bias = _load(opt["bias"], slice(None), keys) if spec.bias else None
    z, _ = _k.logits(spec, q, k_ref[keys, :], bias, acc)
    seen = _k.visible(spec, rows, cols, q_len, kv_len, q_seg,
                      opt["kv_seg"][keys].reshape(1, bk) if spec.segments else None,
                      _load(opt["mask"], slice(None), keys) if spec.mask else None)
    z = jnp.where(seen, z, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
    p = jnp.exp(z - m_safe[:, None])
    correction = jnp.exp(m - m_safe)
    o = correction[:, None] * o + jnp.dot(p, v_ref[keys, :].astype(acc),
                                          preferred_element_type=acc)
    return m_new, correction * l + jnp.sum(p, axis=1), o

  # A sink is a first "key" with score σ and no value: running maximum σ, sum e^{σ−σ} = 1.
  row = jnp.zeros((bq,), acc)
  m, l = (row - jnp.inf, row) if not spec.sinks else (row + opt["sinks"][0], row + 1)
  lo, end = _k.key_range(spec, i, q_len, kv_len)
  m, l, o = lax.fori_loop(lo, end, step, (m, l, jnp.zeros(q.shape, acc)))
  seen = l > 0
  one = jnp.ones_like(l)
  o_ref[...] = (o / jnp.where(seen, l, one)[:, None]).astype(o_ref.dtype)
  m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
  lse_ref[...] = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, one)), row - jnp.inf)


def _heads(q, k, v, *rest, spec):
  """Head-major, padded to whole blocks and to a power-of-two head size of at least 16:
  ``q`` (and the ``rest``, shaped as ``q``) as ``[B, N, Tp, Hp]``, ``k``, ``v`` as
  ``[B, K, Sp, Hp]``."""
  hp = max(16, 1 << (q.shape[3] - 1).bit_length())
  qh, *rest = _k.head_major(spec.block_q, q, *rest, features=hp)
  return (qh, *_k.head_major(spec.block_k, k, v, features=hp), *rest)


def _pair_spec(full, shape_full, index_full):
  """A BlockSpec of a mask or bias ``[Bx, Nx, Tx, Sx]``: per dimension the block of the full
  form (``shape_full``, ``index_full(grid…)``; ``None`` squeezes it), or 1 and index 0 where
  it broadcasts."""
  shape = tuple(None if s is None else (s if f else 1) for s, f in zip(shape_full, full))

  def index(*grid):
    return tuple(ix if f else 0 for ix, f in zip(index_full(*grid), full))

  return pl.BlockSpec(shape, index)


def _params(q):
  warps = 4 if q.shape[3] <= 64 else 8
  return plt.CompilerParams(num_warps=warps, num_stages=2)


def _optional_specs(spec, ops, head_index, head_block, i_index, key_block):
  """in_specs of the optional operands, in :data:`jlayers._attention_kernels.ORDER`, for a
  grid of (batch, heads, …): ``head_index(*grid)`` the head (block) and ``head_block`` its
  size (``None``: one head, squeezed); ``i_index(*grid)`` the query block, or ``None`` for
  every row; ``key_block`` the pair (keys per block, ``index(*grid)``), or (all keys,
  ``None``)."""
  specs = []
  tp = _k.round_up(spec.t, spec.block_q)
  if ops.q_seg is not None:
    q_rows = spec.block_q if i_index is not None else tp
    specs += [pl.BlockSpec((None, q_rows), lambda *g: (g[0], i_index(*g) if i_index else 0)),
              pl.BlockSpec((None, key_block[0]),
                           lambda *g: (g[0], key_block[1](*g) if key_block[1] else 0))]
  for name in ("mask", "bias"):
    if getattr(ops, name) is not None:
      full = getattr(spec, name)
      specs.append(_pair_spec(
          full, (None, head_block, spec.block_q if i_index else tp, key_block[0]),
          lambda *g: (g[0], head_index(*g), i_index(*g) if i_index else 0,
                      key_block[1](*g) if key_block[1] else 0)))
  if ops.sinks is not None:
    specs.append(pl.BlockSpec((1,), lambda *g: (head_index(*g),)))
  return specs


def _optional(ops):
  return [a for a in (getattr(ops, name) for name in _k.ORDER) if a is not None]


def forward(q, k, v, spec: _k.Spec, ops: _k.Operands, *, interpret=False):
  """The attention output ``[B, T, N, H]`` and log-sum-exp ``[B, N, T]`` (both float32, or
  float64 for float64 inputs; ``L = -inf`` for a row that sees no key and has no sink) of
  ``q [B, T, N, H]`` against ``k``, ``v`` ``[B, S, K, H]``, by one kernel launch."""
  b, t, n, h = q.shape
  acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  qh, kh, vh = _heads(q, k, v, spec=spec)
  tp, sp, hp = qh.shape[2], kh.shape[2], qh.shape[3]
  bq, group = spec.block_q, spec.group
  rows = pl.BlockSpec((None, None, bq, hp), lambda bi, ni, i: (bi, ni, i, 0))
  keys = pl.BlockSpec((None, None, sp, hp), lambda bi, ni, i: (bi, _k.div(ni, group), 0, 0))
  per_batch = pl.BlockSpec((1,), lambda bi, ni, i: (bi,))
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, ops=ops),
      grid=(b, n, tp // bq),
      in_specs=[rows, keys, keys, per_batch, per_batch] + _optional_specs(
          spec, ops, lambda bi, ni, i: ni, None, lambda bi, ni, i: i, (sp, None)),
      out_specs=[rows, pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))],
      out_shape=[jax.ShapeDtypeStruct((b, n, tp, hp), acc), jax.ShapeDtypeStruct((b, n, tp), acc)],
      compiler_params=_params(qh), interpret=interpret,
  )(qh, kh, vh, ops.q_len, ops.kv_len, *_optional(ops))
  return _k.from_head_major(out, t, h), lse[:, :, :t]


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_len_ref, kv_len_ref, *refs,
                spec, ops):
  """One (batch, key/value head, key block): ``dK``, ``dV`` of its keys summed over the
  group's query heads and the query blocks that see them."""
  opt, (dk_ref, dv_ref) = _k.unpack(refs, ops)
  j = pl.program_id(2)
  bq, bk = spec.block_q, spec.block_k
  acc = lse_ref.dtype
  k, v = k_ref[...], v_ref[...].astype(acc)
  q_len, kv_len = q_len_ref[0], kv_len_ref[0]
  cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  kv_seg = opt["kv_seg"][...].reshape(1, bk) if spec.segments else None
  lo, end = _k.query_range(spec, j, q_len, kv_len)
  count = end - lo

  def step(x, carry):
    dk, dv = carry
    g, i = _k.div(x, count), lo + _k.rem(x, count)
    rows_ix = pl.ds(i * bq, bq)
    q, do = q_ref[g, rows_ix, :], do_ref[g, rows_ix, :].astype(acc)
    rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    bias = _load(opt["bias"], g, rows_ix, slice(None)) if spec.bias else None
    z, tanh = _k.logits(spec, q, k, bias, acc)
    seen = _k.visible(spec, rows, cols, q_len, kv_len,
                      opt["q_seg"][rows_ix].reshape(bq, 1) if spec.segments else None, kv_seg,
                      _load(opt["mask"], g, rows_ix, slice(None)) if spec.mask else None)
    p = _k.probabilities(z, seen, lse_ref[g, rows_ix][:, None])
    dv = dv + jnp.dot(p.T, do, preferred_element_type=acc)
    dp = jnp.dot(do, v.T, preferred_element_type=acc)
    dz = _k.score_gradient(p, dp, delta_ref[g, rows_ix][:, None], tanh)
    return dk + jnp.dot(dz.T, q.astype(acc), preferred_element_type=acc) * spec.scale, dv

  zeros = jnp.zeros(k.shape, acc)
  dk, dv = lax.fori_loop(0, spec.group * count, step, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_len_ref, kv_len_ref, *refs,
               spec, ops):
  """One (batch, query head, query block): ``dQ`` of its rows over the key blocks they see,
  and the bias's gradient ``dz`` of those blocks (summed over rows or keys where the bias
  broadcasts)."""
  opt, outs = _k.unpack(refs, ops)
  dq_ref, db_ref = outs[0], (outs[1] if spec.bias else None)
  i = pl.program_id(2)
  bq, bk = spec.block_q, spec.block_k
  acc = lse_ref.dtype
  q, do = q_ref[...], do_ref[...].astype(acc)
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_len, kv_len = q_len_ref[0], kv_len_ref[0]
  rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
  q_seg = opt["q_seg"][...].reshape(bq, 1) if spec.segments else None
  t_full, s_full = (spec.bias[2], spec.bias[3]) if spec.bias else (True, True)

  def db_block(dz):
    return dz if t_full else jnp.sum(dz, axis=0, keepdims=True)

  if spec.bias and s_full:  # blocks no row sees keep a zero gradient
    zero = jnp.zeros((bq if t_full else 1, bk), db_ref.dtype)

    def clear(j, _):
      db_ref[:, pl.ds(j * bk, bk)] = zero
      return 0

    lax.fori_loop(0, db_ref.shape[1] // bk, clear, 0)

  def step(j, carry):
    dq, db = carry
    keys = pl.ds(j * bk, bk)
    k, v = k_ref[keys, :], v_ref[keys, :].astype(acc)
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    bias = _load(opt["bias"], slice(None), keys) if spec.bias else None
    z, tanh = _k.logits(spec, q, k, bias, acc)
    seen = _k.visible(spec, rows, cols, q_len, kv_len, q_seg,
                      opt["kv_seg"][keys].reshape(1, bk) if spec.segments else None,
                      _load(opt["mask"], slice(None), keys) if spec.mask else None)
    p = _k.probabilities(z, seen, lse)
    dz = _k.score_gradient(p, jnp.dot(do, v.T, preferred_element_type=acc), delta, tanh)
    if spec.bias and s_full:
      db_ref[:, keys] = db_block(dz).astype(db_ref.dtype)
    elif spec.bias:
      db = db + jnp.sum(db_block(dz), axis=1, keepdims=True)
    return dq + jnp.dot(dz, k.astype(acc), preferred_element_type=acc) * spec.scale, db

  lo, end = _k.key_range(spec, i, q_len, kv_len)
  db0 = jnp.zeros((bq if t_full else 1, 1), acc)
  dq, db = lax.fori_loop(lo, end, step, (jnp.zeros(q.shape, acc), db0))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  if spec.bias and not s_full:
    db_ref[...] = db.astype(db_ref.dtype)


def backward(q, k, v, d_out, lse, delta, spec: _k.Spec, ops: _k.Operands, *, interpret=False):
  """``(dQ, dK, dV, dbias or None)`` (float32, float64 for float64 inputs; ``dbias`` shaped
  as the bias) for the output cotangent ``d_out [B, T, N, H]``, from the forward's
  log-sum-exp ``lse [B, N, T]`` and ``delta [B, N, T]`` (``δ_i = dO_i · O_i − \\bar L_i``),
  by two kernel launches (derivation: :func:`jlayers.attention._attention_bwd`)."""
  b, t, n, h = q.shape
  heads, group = k.shape[2], spec.group
  acc = lse.dtype
  bq, bk = spec.block_q, spec.block_k
  qh, kh, vh, doh = _heads(q, k, v, d_out, spec=spec)
  tp, sp, hp = qh.shape[2], kh.shape[2], qh.shape[3]
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)), constant_values=-jnp.inf)
  delta = jnp.pad(delta.astype(acc), ((0, 0), (0, 0), (0, tp - t)))
  params = _params(qh)
  per_batch = pl.BlockSpec((1,), lambda bi, _, j: (bi,))
  group_rows = pl.BlockSpec((None, group, tp, hp), lambda bi, ki, j: (bi, ki, 0, 0))
  group_stats = pl.BlockSpec((None, group, tp), lambda bi, ki, j: (bi, ki, 0))
  key_block = pl.BlockSpec((None, None, bk, hp), lambda bi, ki, j: (bi, ki, j, 0))
  kv_ops = ops._replace(sinks=None)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, ops=kv_ops),
      grid=(b, heads, sp // bk),
      in_specs=[group_rows, key_block, key_block, group_rows, group_stats, group_stats,
                per_batch, per_batch] + _optional_specs(
          spec, kv_ops, lambda bi, ki, j: ki, group, None, (bk, lambda bi, ki, j: j)),
      out_specs=[key_block, key_block],
      out_shape=[jax.ShapeDtypeStruct(kh.shape, acc)] * 2,
      compiler_params=params, interpret=interpret,
  )(qh, kh, vh, doh, lse, delta, ops.q_len, ops.kv_len, *_optional(kv_ops))
  rows = pl.BlockSpec((None, None, bq, hp), lambda bi, ni, i: (bi, ni, i, 0))
  keys = pl.BlockSpec((None, None, sp, hp), lambda bi, ni, i: (bi, _k.div(ni, group), 0, 0))
  stats = pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))
  out_specs, out_shape = [rows], [jax.ShapeDtypeStruct(qh.shape, acc)]
  if spec.bias:
    t_full, s_full = spec.bias[2], spec.bias[3]
    out_specs.append(pl.BlockSpec((None, None, bq if t_full else 1, sp if s_full else 1),
                                  lambda bi, ni, i: (bi, ni, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct(
        (b, n, tp if t_full else tp // bq, sp if s_full else 1), acc))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, ops=kv_ops),
      grid=(b, n, tp // bq),
      in_specs=[rows, keys, keys, rows, stats, stats, per_batch, per_batch] + _optional_specs(
          spec, kv_ops, lambda bi, ni, i: ni, None, lambda bi, ni, i: i, (sp, None)),
      out_specs=out_specs, out_shape=out_shape,
      compiler_params=params, interpret=interpret,
  )(qh, kh, vh, doh, lse, delta, ops.q_len, ops.kv_len, *_optional(kv_ops))
  dbias = _k.bias_gradient(outs[1], spec) if spec.bias else None
  return (_k.from_head_major(outs[0], t, h), _k.from_head_major(dk, spec.s, h),
          _k.from_head_major(dv, spec.s, h), dbias)

