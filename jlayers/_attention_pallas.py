"""Attention as Pallas kernels for GPUs (Triton: Ampere, Hopper, ROCm): a forward and two
backward kernels, from the derivation and residuals of :mod:`jlayers.attention`.

The forward is the same online softmax as the XLA blockwise form, written for the hardware:
one program per (batch, query head, block of query rows) keeps its block of ``q`` and its
running maximum ``m``, sum ``l`` and output accumulator in registers, and walks the key blocks
its rows can see (up to the diagonal when causal; not past the row's valid keys), so that the
whole forward is one kernel launch. It writes the output and the log-sum-exp ``L = m + log l``
per row. The backward (:func:`backward`) recomputes each block's probabilities from ``L``: one
kernel per key block for ``dK``, ``dV``, one per query block for ``dQ``.

Not yet wired into :func:`jlayers.dot_product_attention` (which runs the XLA blockwise rule on
every platform): the tests prove the kernels in interpret mode against the twin and its
autodiff, and lower them for ``cuda`` and ``rocm``. Options so far: grouped-query heads,
causal, scale, soft cap, key/value sequence lengths.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

BLOCK_Q = 64
BLOCK_K = 64


def _kernel(q_ref, k_ref, v_ref, lengths_ref, o_ref, lse_ref, *, scale, causal, soft_cap,
            block_q, block_k, seq_k):
  """One (batch, head, query block): ``q_ref [bq, H]``, ``k_ref``/``v_ref [S, H]`` (the block's
  key/value head), ``lengths_ref [1]`` (the batch row's valid keys); writes ``o_ref [bq, H]``
  and ``lse_ref [bq]``."""
  i = pl.program_id(2)
  f32 = lse_ref.dtype  # float32, or float64 for float64 inputs (the interpret-mode proof)
  q = q_ref[...].astype(f32)
  h = q.shape[-1]
  valid_k = lengths_ref[0]
  rows = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

  def step(j, carry):
    m, l, acc = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :].astype(f32)
    v = v_ref[pl.ds(start, block_k), :].astype(f32)
    s = jnp.dot(q, k.T, preferred_element_type=f32) * scale
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    cols = start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    seen = cols < valid_k
    if causal:
      seen &= cols <= rows
    s = jnp.where(seen, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, jnp.zeros_like(m_new), m_new)
    p = jnp.exp(s - m_safe[:, None])
    correction = jnp.exp(m - m_safe)
    l = correction * l + jnp.sum(p, axis=1)
    acc = correction[:, None] * acc + jnp.dot(p, v, preferred_element_type=f32)
    return m_new, l, acc

  # The key blocks these rows can see: up to the diagonal when causal, and to the valid keys.
  last = jnp.minimum(valid_k, seq_k)
  if causal:
    last = jnp.minimum(last, (i + 1) * block_q)
  blocks = (last + block_k - 1) // block_k
  init = (jnp.full((block_q,), -jnp.inf, f32), jnp.zeros((block_q,), f32),
          jnp.zeros((block_q, h), f32))
  m, l, acc = lax.fori_loop(0, blocks, step, init)
  seen = l > 0
  one = jnp.ones_like(l)
  o_ref[...] = (acc / jnp.where(seen, l, one)[:, None]).astype(o_ref.dtype)
  m_safe = jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)
  lse_ref[...] = jnp.where(seen, m_safe + jnp.log(jnp.where(seen, l, one)),
                           jnp.full_like(m, -jnp.inf))


def forward(q, k, v, *, causal: bool = False, scale: float | None = None,
            logits_soft_cap: float | None = None, key_value_seq_lengths=None,
            block_q: int = BLOCK_Q, block_k: int = BLOCK_K, interpret=False,
            num_warps: int = 4, num_stages: int = 2):
  """The attention output ``[B, T, N, H]`` (``q``'s dtype) and log-sum-exp ``[B, N, T]``
  (float32, float64 for float64 inputs; ``-inf`` for a row that sees no key) of
  ``q [B, T, N, H]`` against ``k``, ``v`` ``[B, S, K, H]`` (``K`` divides ``N``), by the
  Pallas kernel.

  ``T`` and ``S`` are padded to whole blocks (padded keys are never seen: they lie past every
  row's valid length; padded rows are dropped). ``interpret=True`` runs the kernel on any
  backend (the tests' proof on a CPU).
  """
  b, t, n, h = q.shape
  s, heads = k.shape[1], k.shape[2]
  group = n // heads
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  acc = jnp.dtype(jnp.float64) if q.dtype == jnp.float64 else jnp.dtype(jnp.float32)
  block_q = min(block_q, max(16, pl.next_power_of_2(t)))
  block_k = min(block_k, max(16, pl.next_power_of_2(s)))
  tp, sp = pl.cdiv(t, block_q) * block_q, pl.cdiv(s, block_k) * block_k
  lengths = (jnp.full((b,), s, jnp.int32) if key_value_seq_lengths is None
             else jnp.minimum(jnp.asarray(key_value_seq_lengths, jnp.int32), s))
  qh = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
  kh, vh = (jnp.pad(a, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
            for a in (k, v))  # [B, K, Sp, H]
  kernel = functools.partial(_kernel, scale=scale, causal=causal, soft_cap=logits_soft_cap,
                             block_q=block_q, block_k=block_k, seq_k=s)
  out, lse = pl.pallas_call(
      kernel,
      grid=(b, n, tp // block_q),
      in_specs=[
          pl.BlockSpec((None, None, block_q, h), lambda bi, ni, i: (bi, ni, i, 0)),
          pl.BlockSpec((None, None, sp, h), lambda bi, ni, i: (bi, ni // group, 0, 0)),
          pl.BlockSpec((None, None, sp, h), lambda bi, ni, i: (bi, ni // group, 0, 0)),
          pl.BlockSpec((1,), lambda bi, ni, i: (bi,)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, block_q, h), lambda bi, ni, i: (bi, ni, i, 0)),
          pl.BlockSpec((None, None, block_q), lambda bi, ni, i: (bi, ni, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((b, n, tp, h), q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), acc)],
      compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(qh, kh, vh, lengths)
  return out[:, :, :t].transpose(0, 2, 1, 3), lse[:, :, :t]



def _probabilities(q, k, lse, rows, cols, valid_k, *, scale, causal, soft_cap):
  """``(P, tanh or None)`` of one block: ``P = exp(z − L)`` where the entry is seen (0 where it
  is not, or where the row sees no key: ``L = −inf``), ``z`` the (soft-capped) scaled score."""
  z = jnp.dot(q, k.T, preferred_element_type=q.dtype) * scale
  tanh = None
  if soft_cap is not None:
    tanh = jnp.tanh(z / soft_cap)
    z = soft_cap * tanh
  seen = (cols < valid_k) & jnp.isfinite(lse)[:, None]
  if causal:
    seen &= cols <= rows
  safe = jnp.where(jnp.isfinite(lse), lse, jnp.zeros_like(lse))[:, None]
  return jnp.where(seen, jnp.exp(z - safe), jnp.zeros_like(z)), tanh


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lengths_ref, dk_ref, dv_ref,
                *, scale, causal, soft_cap, block_q, block_k, q_blocks, group):
  """One (batch, key/value head, key block): ``dK``, ``dV`` of its keys, summed over the
  ``group`` query heads that share them and the query blocks that see them (from the first
  block holding a row at or after the keys, when causal)."""
  j = pl.program_id(2)
  f32 = lse_ref.dtype
  k, v = k_ref[...].astype(f32), v_ref[...].astype(f32)
  cols = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
  first = (j * block_k) // block_q if causal else 0
  blocks = q_blocks - first

  def step(n, carry):
    dk, dv = carry
    g, qi = n // blocks, first + n % blocks
    rows = pl.ds(qi * block_q, block_q)
    q, do = q_ref[g, rows, :].astype(f32), do_ref[g, rows, :].astype(f32)
    row = qi * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    p, tanh = _probabilities(q, k, lse_ref[g, rows], row, cols, lengths_ref[0], scale=scale,
                             causal=causal, soft_cap=soft_cap)
    dv = dv + jnp.dot(p.T, do, preferred_element_type=f32)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=f32) - delta_ref[g, rows][:, None])
    if tanh is not None:
      ds = ds * (1 - tanh * tanh)
    return dk + jnp.dot(ds.T, q, preferred_element_type=f32) * scale, dv

  zeros = jnp.zeros(k.shape, f32)
  dk, dv = lax.fori_loop(0, group * blocks, step, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, lengths_ref, dq_ref, *, scale,
               causal, soft_cap, block_q, block_k, seq_k):
  """One (batch, query head, query block): ``dQ`` of its rows over the key blocks they see."""
  i = pl.program_id(2)
  f32 = lse_ref.dtype
  q, do = q_ref[...].astype(f32), do_ref[...].astype(f32)
  lse, delta = lse_ref[...], delta_ref[...]
  valid_k = lengths_ref[0]
  rows = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

  def step(j, dq):
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :].astype(f32), v_ref[keys, :].astype(f32)
    cols = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    p, tanh = _probabilities(q, k, lse, rows, cols, valid_k, scale=scale, causal=causal,
                             soft_cap=soft_cap)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=f32) - delta[:, None])
    if tanh is not None:
      ds = ds * (1 - tanh * tanh)
    return dq + jnp.dot(ds, k, preferred_element_type=f32) * scale

  last = jnp.minimum(valid_k, seq_k)
  if causal:
    last = jnp.minimum(last, (i + 1) * block_q)
  dq = lax.fori_loop(0, (last + block_k - 1) // block_k, step, jnp.zeros(q.shape, f32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _layouts(q, k, v, block_q, block_k):
  """``q`` and ``k``, ``v`` head-major and padded to whole blocks: ``[B, N, Tp, H]``,
  ``[B, K, Sp, H]``."""
  t, s = q.shape[1], k.shape[1]
  tp, sp = pl.cdiv(t, block_q) * block_q, pl.cdiv(s, block_k) * block_k
  qh = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  kh, vh = (jnp.pad(a, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
            for a in (k, v))
  return qh, kh, vh


def backward(q, k, v, out, lse, d_out, *, causal: bool = False, scale: float | None = None,
             logits_soft_cap: float | None = None, key_value_seq_lengths=None,
             block_q: int = BLOCK_Q, block_k: int = BLOCK_K, interpret=False,
             num_warps: int = 4, num_stages: int = 2):
  r"""``(dQ, dK, dV)`` of attention for the output cotangent ``d_out [B, T, N, H]``, from the
  forward's ``out`` and log-sum-exp ``lse [B, N, T]`` (:func:`forward`), by two kernels.

  With ``P = exp(z − L)`` recomputed per block, ``z = c·tanh(s/c)`` (or ``s``), ``s = scale·q·kᵀ``
  and ``D_i = Σ_h dO_ih O_ih`` (``= Σ_j P_ij dP_ij``):

  .. math::
    dV_j = Σ_i P_{ij} dO_i, \\quad dP_{ij} = dO_i · V_j, \\quad
    dS_{ij} = P_{ij}(dP_{ij} − D_i)\\,(1 − \\tanh^2(s_{ij}/c)), \\quad
    dK_j = scale Σ_i dS_{ij} Q_i, \\quad dQ_i = scale Σ_j dS_{ij} K_j

  (the softmax Jacobian contracted with ``dP`` row by row, then the soft cap's chain factor).
  One kernel per (batch, key/value head, key block) sums ``dK``, ``dV`` over the query heads of
  its group and the query blocks that see the block; one per (batch, query head, query block)
  sums ``dQ`` over the key blocks its rows see.
  """
  b, t, n, h = q.shape
  s, heads = k.shape[1], k.shape[2]
  group = n // heads
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  block_q = min(block_q, max(16, pl.next_power_of_2(t)))
  block_k = min(block_k, max(16, pl.next_power_of_2(s)))
  acc = lse.dtype
  lengths = (jnp.full((b,), s, jnp.int32) if key_value_seq_lengths is None
             else jnp.minimum(jnp.asarray(key_value_seq_lengths, jnp.int32), s))
  qh, kh, vh = _layouts(q, k, v, block_q, block_k)
  doh = _layouts(d_out, k, v, block_q, block_k)[0]
  tp, sp = qh.shape[2], kh.shape[2]
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1).transpose(0, 2, 1)  # [B, N, T]
  delta = jnp.pad(delta, ((0, 0), (0, 0), (0, tp - t)))
  lse = jnp.pad(lse, ((0, 0), (0, 0), (0, tp - t)), constant_values=-jnp.inf)
  options = {"scale": scale, "causal": causal, "soft_cap": logits_soft_cap,
             "block_q": block_q, "block_k": block_k}
  params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  group_rows = pl.BlockSpec((None, group, tp, h), lambda bi, ki, j: (bi, ki, 0, 0))
  group_stats = pl.BlockSpec((None, group, tp), lambda bi, ki, j: (bi, ki, 0))
  key_block = pl.BlockSpec((None, None, block_k, h), lambda bi, ki, j: (bi, ki, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, q_blocks=tp // block_q, group=group, **options),
      grid=(b, heads, sp // block_k),
      in_specs=[group_rows, key_block, key_block, group_rows, group_stats, group_stats,
                pl.BlockSpec((1,), lambda bi, ki, j: (bi,))],
      out_specs=[key_block, key_block],
      out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
      compiler_params=params, interpret=interpret,
  )(qh, kh, vh, doh, lse, delta, lengths)
  query_block = pl.BlockSpec((None, None, block_q, h), lambda bi, ni, i: (bi, ni, i, 0))
  all_keys = pl.BlockSpec((None, None, sp, h), lambda bi, ni, i: (bi, ni // group, 0, 0))
  row_stats = pl.BlockSpec((None, None, block_q), lambda bi, ni, i: (bi, ni, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, seq_k=s, **options),
      grid=(b, n, tp // block_q),
      in_specs=[query_block, all_keys, all_keys, query_block, row_stats, row_stats,
                pl.BlockSpec((1,), lambda bi, ni, i: (bi,))],
      out_specs=query_block,
      out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
      compiler_params=params, interpret=interpret,
  )(qh, kh, vh, doh, lse, delta, lengths)
  unpad = lambda a, size: a[:, :, :size].transpose(0, 2, 1, 3)  # noqa: E731
  return unpad(dq, t), unpad(dk, s), unpad(dv, s)
