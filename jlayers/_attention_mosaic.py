"""Attention as Pallas kernels for TPUs (Mosaic): a forward and two backward kernels, from
the derivation and residuals of :mod:`jlayers.attention` and the block math of
:mod:`jlayers._attention_kernels` that the GPU kernels share.

A TPU runs a kernel's grid as a sequential loop per core, with the blocks of each step copied
into vector memory ahead of it, so the walk over blocks is the grid's last dimension rather
than a loop inside the kernel: the forward's grid is (batch, query head, query block, key
block), and the running maximum, sum and output accumulator live in scratch memory across the
key blocks of one query block, written out at the last. Blocks that no row can see
(:func:`jlayers._attention_kernels.key_range`) do no arithmetic, and their copies are skipped:
the index maps clamp the key block (the query block, in the ``dK``, ``dV`` kernel) to the
visible range (a block equal to the previous one is not copied again), from the lengths that
arrive as scalar prefetch. The backward: one kernel
with grid (batch, key/value head, key block, group head × query block) accumulates ``dK``,
``dV``; one with grid (batch, query head, query block, key block) accumulates ``dQ`` and
writes each block of the bias's gradient (summed over the block's rows or keys where the bias
broadcasts along queries or keys, and over query blocks and the broadcast batch and heads
afterwards).

Mosaic tiles a block's last two dimensions by (8, 128): rows of statistics (log-sum-exp,
``δ``, query segment ids) are laid out ``[…, rows, 1]`` and key segment ids ``[…, 1, keys]``,
and blocks are 128 × 128, or the whole (8-padded) sequence when shorter. The tests run these
kernels with ``jax.experimental.pallas.tpu.InterpretParams()`` on a CPU and lower them for
``tpu``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jlayers import _attention_kernels as _k

def _operands(ops):
  """The optional operands laid out for Mosaic's tiling: segment ids as ``[B, Tp, 1]`` and
  ``[B, 1, Sp]``, sinks as ``[N, 1, 1]``."""
  laid = {"q_seg": None if ops.q_seg is None else ops.q_seg[:, :, None],
          "kv_seg": None if ops.kv_seg is None else ops.kv_seg[:, None, :],
          "mask": None if ops.mask is None else ops.mask.astype(jnp.int32),
          "bias": ops.bias,
          "sinks": None if ops.sinks is None else ops.sinks[:, None, None]}
  return [laid[name] for name in _k.ORDER if laid[name] is not None]


def _specs(spec, ops, index):
  """BlockSpecs of the optional operands; ``index(*grid, q_len, kv_len)`` gives the grid
  step's ``(batch, query head, query block, key block)``."""
  bq, bk = spec.block_q, spec.block_k
  specs = []
  if ops.q_seg is not None:
    specs += [pl.BlockSpec((None, bq, 1), lambda *g: (index(*g)[0], index(*g)[2], 0)),
              pl.BlockSpec((None, 1, bk), lambda *g: (index(*g)[0], 0, index(*g)[3]))]
  for name in ("mask", "bias"):
    full = getattr(spec, name)
    if full is not None:
      specs.append(pl.BlockSpec(
          (None, None, bq if full[2] else 1, bk if full[3] else 1),
          lambda *g, full=full: tuple(ix if f else 0 for ix, f in zip(index(*g), full))))
  if ops.sinks is not None:
    specs.append(pl.BlockSpec((None, 1, 1), lambda *g: (index(*g)[1], 0, 0)))
  return specs


def _block(spec, opt, q, k, i, j, q_len, kv_len, acc):
  """``(z, tanh, seen)`` of block ``(i, j)`` from the loaded ``q [bq, H]``, ``k [bk, H]``."""
  shape = (spec.block_q, spec.block_k)
  rows = i * spec.block_q + lax.broadcasted_iota(jnp.int32, shape, 0)
  cols = j * spec.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
  z, tanh = _k.logits(spec, q, k, opt["bias"][...] if spec.bias else None, acc)
  seen = _k.visible(spec, rows, cols, q_len, kv_len,
                    opt["q_seg"][...] if spec.segments else None,
                    opt["kv_seg"][...] if spec.segments else None,
                    opt["mask"][...] if spec.mask else None)
  return z, tanh, seen


def _forward_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs, spec, ops):
  opt, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _k.unpack(refs, ops)
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  acc = acc_ref.dtype
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when(j == 0)
  def _():  # a sink is a first "key" with score σ and no value
    m_ref[...] = (jnp.full(m_ref.shape, -jnp.inf, acc) if not spec.sinks else
                  jnp.broadcast_to(opt["sinks"][...].astype(acc), m_ref.shape))
    l_ref[...] = jnp.full(l_ref.shape, 1 if spec.sinks else 0, acc)
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc)

  lo, end = _k.key_range(spec, i, q_len, kv_len)

  @pl.when((j >= lo) & (j < end))
  def _():
    z, _, seen = _block(spec, opt, q_ref[...], k_ref[...], i, j, q_len, kv_len, acc)
    z = jnp.where(seen, z, -jnp.inf)
    m = m_ref[...]
    m_new = jnp.maximum(m, jnp.max(z, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
    p = jnp.exp(z - m_safe)
    correction = jnp.exp(m - m_safe)
    l_ref[...] = correction * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = correction * acc_ref[...] + jnp.dot(
        p, v_ref[...].astype(acc), preferred_element_type=acc)
    m_ref[...] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    m, l = m_ref[...], l_ref[...]
    seen, one = l > 0, jnp.ones_like(l)
    o_ref[...] = (acc_ref[...] / jnp.where(seen, l, one)).astype(o_ref.dtype)
    m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
    lse_ref[...] = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, one)),
                             jnp.full_like(m, -jnp.inf))


def _interpret(interpret):
  return pltpu.InterpretParams() if interpret else False


def forward(q, k, v, spec: _k.Spec, ops: _k.Operands, *, interpret=False):
  """As :func:`jlayers._attention_pallas.forward`, by the Mosaic kernel: the output
  ``[B, T, N, H]`` and log-sum-exp ``[B, N, T]`` in float32 (float64 for float64 inputs)."""
  b, t, n, h = q.shape
  acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  qh, = _k.head_major(spec.block_q, q)
  kh, vh = _k.head_major(spec.block_k, k, v)
  tp, sp = qh.shape[2], kh.shape[2]
  bq, bk, group = spec.block_q, spec.block_k, spec.group

  def index(bi, ni, i, j, q_len, kv_len):  # the key block clamped to the visible range
    lo, end = _k.key_range(spec, i, q_len[bi], kv_len[bi])
    return bi, ni, i, jnp.clip(j, lo, jnp.maximum(end - 1, lo))

  rows = pl.BlockSpec((None, None, bq, h), lambda *g: (g[0], g[1], g[2], 0))
  keys = pl.BlockSpec((None, None, bk, h),
                      lambda *g: (g[0], _k.div(g[1], group), index(*g)[3], 0))
  stats = pl.BlockSpec((None, None, bq, 1), lambda *g: (g[0], g[1], g[2], 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(b, n, tp // bq, sp // bk),
      in_specs=[rows, keys, keys] + _specs(spec, ops, index),
      out_specs=[rows, stats],
      scratch_shapes=[pltpu.VMEM((bq, 1), acc), pltpu.VMEM((bq, 1), acc),
                      pltpu.VMEM((bq, h), acc)])
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, ops=ops), grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((b, n, tp, h), acc),
                 jax.ShapeDtypeStruct((b, n, tp, 1), acc)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=_interpret(interpret),
  )(ops.q_len, ops.kv_len, qh, kh, vh, *_operands(ops))
  return _k.from_head_major(out, t, h), lse[:, :, :t, 0]


def _dkv_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                spec, ops, q_blocks):
  opt, (dk_ref, dv_ref, dk_acc, dv_acc) = _k.unpack(refs, ops)
  b, j, x = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  i = _k.rem(x, q_blocks)
  acc = dk_acc.dtype
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when(x == 0)
  def _():
    dk_acc[...] = jnp.zeros(dk_acc.shape, acc)
    dv_acc[...] = jnp.zeros(dv_acc.shape, acc)

  lo, end = _k.query_range(spec, j, q_len, kv_len)

  @pl.when((i >= lo) & (i < end))
  def _():
    q, do = q_ref[...], do_ref[...].astype(acc)
    z, tanh, seen = _block(spec, opt, q, k_ref[...], i, j, q_len, kv_len, acc)
    p = _k.probabilities(z, seen, lse_ref[...])
    dv_acc[...] += lax.dot_general(p, do, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    dp = lax.dot_general(do, v_ref[...].astype(acc), (((1,), (1,)), ((), ())),
                         preferred_element_type=acc)
    dz = _k.score_gradient(p, dp, delta_ref[...], tanh)
    dk_acc[...] += lax.dot_general(dz, q.astype(acc), (((0,), (0,)), ((), ())),
                                   preferred_element_type=acc) * spec.scale

  @pl.when(x == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(q_len_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               spec, ops):
  opt, outs = _k.unpack(refs, ops)
  dq_ref, db_ref, dq_acc = (outs[0], outs[1], outs[2]) if spec.bias else (outs[0], None, outs[1])
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  acc = dq_acc.dtype
  q_len, kv_len = q_len_ref[b], kv_len_ref[b]

  @pl.when(j == 0)
  def _():
    dq_acc[...] = jnp.zeros(dq_acc.shape, acc)

  lo, end = _k.key_range(spec, i, q_len, kv_len)
  inside = (j >= lo) & (j < end)

  s_full = spec.bias is not None and spec.bias[3]
  if spec.bias and not s_full:  # one block per query block, summed over the key blocks
    @pl.when(j == 0)
    def _():
      db_ref[...] = jnp.zeros(db_ref.shape, db_ref.dtype)

  @pl.when(inside)
  def _():
    k = k_ref[...]
    z, tanh, seen = _block(spec, opt, q_ref[...], k, i, j, q_len, kv_len, acc)
    p = _k.probabilities(z, seen, lse_ref[...])
    dp = lax.dot_general(do_ref[...].astype(acc), v_ref[...].astype(acc),
                         (((1,), (1,)), ((), ())), preferred_element_type=acc)
    dz = _k.score_gradient(p, dp, delta_ref[...], tanh)
    dq_acc[...] += jnp.dot(dz, k.astype(acc), preferred_element_type=acc) * spec.scale
    if spec.bias:  # dβ = dz, summed over the rows or keys along which the bias broadcasts
      db = dz if spec.bias[2] else jnp.sum(dz, axis=0, keepdims=True)
      if s_full:
        db_ref[...] = db.reshape(db_ref.shape).astype(db_ref.dtype)
      else:
        db_ref[...] += jnp.sum(db, axis=1, keepdims=True).reshape(db_ref.shape)

  if s_full:
    @pl.when(jnp.logical_not(inside))
    def _():
      db_ref[...] = jnp.zeros(db_ref.shape, db_ref.dtype)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def backward(q, k, v, d_out, lse, delta, spec: _k.Spec, ops: _k.Operands, *, interpret=False):
  """As :func:`jlayers._attention_pallas.backward`, by the Mosaic kernels: ``(dQ, dK, dV,
  dbias or None)`` in float32 (float64 for float64 inputs)."""
  b, t, n, h = q.shape
  heads, group = k.shape[2], spec.group
  acc = lse.dtype
  bq, bk = spec.block_q, spec.block_k
  qh, doh = _k.head_major(spec.block_q, q, d_out)
  kh, vh = _k.head_major(spec.block_k, k, v)
  tp, sp = qh.shape[2], kh.shape[2]
  nq, nk = tp // bq, sp // bk
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)), constant_values=-jnp.inf)[..., None]
  delta = jnp.pad(delta.astype(acc), ((0, 0), (0, 0), (0, tp - t)))[..., None]
  sem = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3 + ("arbitrary",))
  kv_ops = ops._replace(sinks=None)
  laid = _operands(kv_ops)

  def kv_index(bi, ki, j, x, q_len, kv_len):  # the query block clamped to those that see j
    lo, end = _k.query_range(spec, j, q_len[bi], kv_len[bi])
    i = jnp.clip(_k.rem(x, nq), lo, jnp.maximum(end - 1, lo))
    return bi, ki * group + _k.div(x, nq), i, j

  rows = pl.BlockSpec((None, None, bq, h), lambda *g: kv_index(*g)[:3] + (0,))
  stats = pl.BlockSpec((None, None, bq, 1), lambda *g: kv_index(*g)[:3] + (0,))
  key_block = pl.BlockSpec((None, None, bk, h), lambda bi, ki, j, *_: (bi, ki, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, ops=kv_ops, q_blocks=nq),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, heads, nk, group * nq),
          in_specs=[rows, key_block, key_block, rows, stats, stats] + _specs(
              spec, kv_ops, kv_index),
          out_specs=[key_block, key_block],
          scratch_shapes=[pltpu.VMEM((bk, h), acc), pltpu.VMEM((bk, h), acc)]),
      out_shape=[jax.ShapeDtypeStruct(kh.shape, acc)] * 2,
      compiler_params=sem, interpret=_interpret(interpret),
  )(ops.q_len, ops.kv_len, qh, kh, vh, doh, lse, delta, *laid)

  def q_index(bi, ni, i, j, q_len, kv_len):
    lo, end = _k.key_range(spec, i, q_len[bi], kv_len[bi])
    return bi, ni, i, jnp.clip(j, lo, jnp.maximum(end - 1, lo))

  rows = pl.BlockSpec((None, None, bq, h), lambda *g: g[:3] + (0,))
  stats = pl.BlockSpec((None, None, bq, 1), lambda *g: g[:3] + (0,))
  keys = pl.BlockSpec((None, None, bk, h),
                      lambda *g: (g[0], _k.div(g[1], group), q_index(*g)[3], 0))
  out_specs, out_shape = [rows], [jax.ShapeDtypeStruct(qh.shape, acc)]
  if spec.bias:  # per (batch, head): [Tp or query blocks × 1, Sp or 1], Mosaic-tiled
    t_full, s_full = spec.bias[2], spec.bias[3]
    if t_full:
      out_specs.append(pl.BlockSpec((None, None, bq, bk if s_full else 1),
                                    lambda *g: (*g[:3], g[3] if s_full else 0)))
      out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp if s_full else 1), acc))
    else:
      out_specs.append(pl.BlockSpec((None, None, None, 1, bk if s_full else 1),
                                    lambda *g: (*g[:3], 0, g[3] if s_full else 0)))
      out_shape.append(jax.ShapeDtypeStruct((b, n, nq, 1, sp if s_full else 1), acc))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, ops=kv_ops),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, n, nq, nk),
          in_specs=[rows, keys, keys, rows, stats, stats] + _specs(spec, kv_ops, q_index),
          out_specs=out_specs, scratch_shapes=[pltpu.VMEM((bq, h), acc)]),
      out_shape=out_shape, compiler_params=sem, interpret=_interpret(interpret),
  )(ops.q_len, ops.kv_len, qh, kh, vh, doh, lse, delta, *laid)
  dbias = _k.bias_gradient(outs[1], spec) if spec.bias else None
  return (_k.from_head_major(outs[0], t, h), _k.from_head_major(dk, spec.s, h),
          _k.from_head_major(dv, spec.s, h), dbias)
