"""Attention's forward as a Pallas kernel for GPUs (Triton: Ampere, Hopper, ROCm).

The same online softmax as :mod:`jlayers.attention`'s blockwise form, written for the hardware:
one program per (batch, query head, block of query rows) keeps its block of ``q`` and its
running maximum ``m``, sum ``l`` and output accumulator in registers, and walks the key blocks
its rows can see (up to the diagonal when causal; not past the row's valid keys), so that the
whole forward is one kernel launch. It writes the output and the float32 log-sum-exp
``L = m + log l`` per row, the residual the hand-derived backward reads.

Not yet wired into :func:`jlayers.dot_product_attention` (whose backward is the XLA blockwise
rule): this module is the forward kernel, proven in interpret mode against the twin and lowered
for ``cuda`` and ``rocm`` by the tests. Options so far: grouped-query heads, causal, scale, soft
cap, key/value sequence lengths.
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
