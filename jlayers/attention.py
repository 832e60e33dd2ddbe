"""Dot-product attention in linear memory, with a hand-derived backward pass.

The forward runs over blocks of queries and keys with an online softmax and keeps, besides
its inputs and output, one log-sum-exp per query row (float32 or wider); the backward recomputes the
probabilities block by block. No array of ``T × S`` scores ever exists, in either pass.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _ops
from jlayers._attention_blocks import block_size, blocks, head_major_mask, pad, put, rows

_OP = "dot_product_attention"

class _Config(NamedTuple):
  """Static configuration (hashable; goes in ``nondiff_argnums``)."""

  causal: bool
  scale: float
  block_q: int
  block_k: int


def _validate(q, k, v, mask, causal, scale):
  q, k, v = (_checks.floating(_OP, n, a) for n, a in (("q", q), ("k", k), ("v", v)))
  for name, a, what in (("q", q, "(B, T, N, H)"), ("k", k, "(B, S, K, H)"),
                        ("v", v, "(B, S, K, H)")):
    _checks.rank(_OP, name, a, 4, what)
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"{_OP}: q, k and v must have one dtype, got {q.dtype}, {k.dtype} and "
                    f"{v.dtype}")
  b, t, n, h = q.shape
  if k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"{_OP}: k must have shape (B, S, K, H) with q's B={b} and H={h}, got "
                     f"{tuple(k.shape)} for q {tuple(q.shape)}")
  _checks.shape(_OP, "v", v, k.shape, "(k's shape)")
  heads = k.shape[2]
  if heads == 0 or n % heads:
    raise ValueError(f"{_OP}: q's heads (N={n}) must be a multiple of k's and v's heads "
                     f"(K={heads}), got q {tuple(q.shape)} and k {tuple(k.shape)}")
  s = k.shape[1]
  if mask is not None:
    mask = _checks.as_array(_OP, "mask", mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"{_OP}: mask must have dtype bool, got {mask.dtype}")
    full = (b, n, t, s)
    if mask.ndim != 4 or any(m not in (1, f) for m, f in zip(mask.shape, full)):
      raise ValueError(f"{_OP}: mask must have rank 4 and broadcast to (B, N, T, S) = {full} "
                       f"(each dimension 1 or that size), got shape {tuple(mask.shape)}")
  causal = _checks.flag(_OP, "causal", causal)
  scale = _checks.optional_finite(_OP, "scale", scale)
  if scale is None:
    scale = 1.0 / math.sqrt(h) if h else 1.0
  config = _Config(bool(causal), float(scale), block_size(t), block_size(s))
  return q, k, v, mask, config


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, causal: bool = False,
                          scale: float | None = None) -> jax.Array:
  r"""Scaled dot-product attention with grouped-query heads, in linear memory, with a manual
  VJP.

  For batch ``b``, query head ``n`` and its key/value head ``κ = n // (N/K)``:

  .. math::
    S_{ij} = \mathrm{scale} · q_i · k_j, \qquad
    P_{ij} = \frac{m_{ij} e^{S_{ij}}}{Σ_l m_{il} e^{S_{il}}}, \qquad
    O_i = Σ_j P_{ij} v_j

  with ``m`` the mask (``mask`` and, with ``causal``, ``j ≤ i``). As
  ``jax.nn.dot_product_attention`` and PyTorch: ``causal`` is top-left aligned when
  ``T ≠ S`` (query ``i`` sees keys ``0..i``), and ``N`` query heads share ``K`` key/value
  heads (``N = K``: multi-head; ``K = 1``: multi-query). A query row whose every key is
  masked gets output 0 and gradient 0 (never NaN); so does every row when ``S = 0``. An empty
  output (``B``, ``T``, ``N`` or ``H`` of 0) is returned as such, with empty gradients.

  The forward visits blocks of queries × keys (sizes chosen per sequence length in
  :mod:`jlayers._attention_blocks`) with an online softmax (a running maximum and sum per
  query row), skipping blocks entirely above the diagonal when ``causal``; it saves ``q``,
  ``k``, ``v``, the output and one log-sum-exp per query row (float32, or float64 for float64
  inputs). Scores, probabilities and every product's accumulation are in at least float32;
  for half-precision inputs the scores are exact products of the inputs, and the
  probabilities multiply ``v`` (and the backward's ``dS`` multiplies ``q`` and ``k``) without
  being rounded to the inputs' dtype, as autodiff of the twin does: each row of the softmax's
  backward cancels, and that rounding would leave errors as large as the terms that cancel.

  Args:
    q: float[B, T, N, H], queries.
    k: float[B, S, K, H], keys; ``K`` divides ``N``.
    v: float[B, S, K, H], values; one dtype for ``q``, ``k``, ``v``.
    mask: optional bool of rank 4 broadcastable to [B, N, T, S] (each dimension 1 or the
      full size): True where query ``i`` may attend key ``j``. Not differentiable.
    causal: also mask keys after the query (``j > i``); static.
    scale: the score scale, a float; default ``1/√H``; static.

  Returns:
    float[B, T, N, H] in the inputs' dtype.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> q = jnp.ones((1, 2, 1, 2))
    >>> k = jnp.zeros((1, 3, 1, 2))  # equal scores: attention averages the values
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> jlayers.dot_product_attention(q, k, v)[0, :, 0].tolist()
    [[2.0, 3.0], [2.0, 3.0]]
    >>> jlayers.dot_product_attention(q, k, v, causal=True)[0, :, 0].tolist()
    [[0.0, 1.0], [1.0, 2.0]]
  """
  q, k, v, mask, config = _validate(q, k, v, mask, causal, scale)
  if q.size == 0 or k.shape[1] == 0:  # an empty output, or no key to see: every row is empty
    return jnp.zeros_like(q)
  return _attention(config, q, k, v, mask)


def _scores(config, blk, qi, kj, i, j):
  """``scale · q_i k_jᵀ`` of one block, [B, K, G, bq, bk] in at least float32, masked to
  ``-inf``."""
  s = lax.dot_general(qi, kj, (((4,), (3,)), ((0, 1), (0, 1))),
                      preferred_element_type=_checks.at_least_float32(qi.dtype)) * config.scale
  shape = (1, 1, 1, config.block_q, config.block_k)
  valid = None
  if config.causal or blk.k.shape[2] != blk.s:
    cols = j * config.block_k + lax.broadcasted_iota(jnp.int32, shape, 4)
    valid = cols < blk.s
    if config.causal:
      valid = valid & (cols <= i * config.block_q + lax.broadcasted_iota(jnp.int32, shape, 3))
  if blk.mask is not None:
    m = rows(rows(blk.mask, i, config.block_q, 3), j, config.block_k, 4)
    valid = m if valid is None else valid & m
  return s if valid is None else jnp.where(valid, s, -jnp.inf)


def _safe_max(m):
  """A running maximum with ``-inf`` (no key seen yet) replaced by 0, so that ``s − m`` and
  ``m_old − m`` are never ``-inf − (-inf)``."""
  return jnp.where(m == -jnp.inf, jnp.zeros_like(m), m)


def _forward(config, q, k, v, mask):
  """``(output [B, T, N, H], log-sum-exp [B, K, G, T])``, both in at least float32."""
  blk = blocks(config, q, k, v, mask)
  bq, bk = config.block_q, config.block_k
  f32 = _checks.at_least_float32(q.dtype)
  # Zeros laid out as the blocks (batch-split on a mesh), so the loop's carry keeps its type.
  row = jnp.zeros_like(blk.q[..., 0], f32)
  init = (row - jnp.inf, row, jnp.zeros_like(blk.q, f32))

  def step(carry, ij):
    m, l, acc = carry
    i, j = ij
    qi = rows(blk.q, i, bq, 3)
    s = _scores(config, blk, qi, rows(blk.k, j, bk, 2), i, j)
    m_old, l_old, acc_old = rows(m, i, bq, 3), rows(l, i, bq, 3), rows(acc, i, bq, 3)
    m_new = jnp.maximum(m_old, jnp.max(s, axis=4))
    m_safe = _safe_max(m_new)
    p = jnp.exp(s - m_safe[..., None])
    correction = jnp.exp(m_old - m_safe)
    pv = lax.dot_general(p, rows(blk.v, j, bk, 2).astype(f32),
                         (((4,), (2,)), ((0, 1), (0, 1))), preferred_element_type=f32)
    l_new = correction * l_old + jnp.sum(p, axis=4)
    acc_new = correction[..., None] * acc_old + pv
    return (put(m, m_new, i, bq, 3), put(l, l_new, i, bq, 3),
            put(acc, acc_new, i, bq, 3)), None

  (m, l, acc), _ = lax.scan(step, init, blk.pairs)
  seen = l > 0
  out = acc / jnp.where(seen, l, jnp.ones_like(l))[..., None]
  # A row with every key masked: output 0 and a log-sum-exp of +inf, so that the backward's
  # exp(S − L) is 0 there.
  lse = jnp.where(seen, _safe_max(m) + jnp.log(jnp.where(seen, l, jnp.ones_like(l))),
                  jnp.full_like(l, jnp.inf))
  b, t, n, h = q.shape
  out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out, lse[..., :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, mask):
  return _forward(config, q, k, v, mask)[0].astype(q.dtype)


def _attention_fwd(config, q, k, v, mask):
  """Saves ``q``, ``k``, ``v`` and ``mask`` (inputs), the output ``O`` and the log-sum-exp
  ``L_i = log Σ_j m_{ij} e^{S_{ij}}`` of each query row ([B, K, G, T]), both in at least
  float32.

  With ``L`` the backward recomputes any block of probabilities exactly as
  ``P_ij = exp(S_ij − L_i)`` from ``q`` and ``k`` (one product per block): saving ``P`` would
  keep a ``T × S`` array per head, the memory this formulation exists to avoid. ``O`` gives
  ``D_i = dO_i · O_i``, the row sums of the softmax backward, without revisiting the keys. It
  is kept before its rounding to a half-precision input's dtype (for float32 and float64
  inputs it is the output itself): every row of ``dS = P ∘ (dP − D)`` cancels, and a ``D``
  from the rounded output would carry that rounding into every entry of ``dS``. Both are
  differentiable functions of the inputs, so the rule can be differentiated again.
  """
  out, lse = _forward(config, q, k, v, mask)
  return out.astype(q.dtype), (q, k, v, mask, out, lse)


def _attention_bwd(config, res, g):
  r"""Backward of attention from ``q``, ``k``, ``v``, ``O`` and ``L``, block by block.

  For one batch and query head, with ``dO = ∂L/∂O`` and ``P_ij = exp(S_ij − L_i)``:

  1. ``O_i = Σ_j P_ij v_j``, linear in ``v`` and in ``P``:

     .. math::
       \frac{∂L}{∂v_j} = Σ_i P_{ij}\, dO_i \quad (dV = P^T dO), \qquad
       dP_{ij} = \frac{∂L}{∂P_{ij}} = dO_i · v_j \quad (dP = dO\, V^T)

  2. The softmax of row ``i`` has Jacobian :math:`∂P_{ij}/∂S_{il} = P_{ij}(δ_{jl} - P_{il})`
     (0 for masked entries, where ``P = 0``), so

     .. math::
       dS_{il} = Σ_j dP_{ij} P_{ij} (δ_{jl} - P_{il}) = P_{il} (dP_{il} - D_i), \qquad
       D_i = Σ_j P_{ij} dP_{ij} = dO_i · Σ_j P_{ij} v_j = dO_i · O_i

     ``D`` is a row sum of ``dO ∘ O``: no pass over the keys is needed for it.
  3. ``S_ij = scale · q_i · k_j``:

     .. math::
       \frac{∂L}{∂q_i} = \mathrm{scale}\, Σ_j dS_{ij} k_j \quad (dQ = \mathrm{scale}\, dS\, K),
       \qquad \frac{∂L}{∂k_j} = \mathrm{scale}\, Σ_i dS_{ij} q_i
       \quad (dK = \mathrm{scale}\, dS^T Q)

  Grouped-query heads: key/value head ``κ`` enters the scores and outputs of its ``G = N/K``
  query heads, so its gradients add over them,
  :math:`dK_κ = \mathrm{scale} Σ_{n: n // G = κ} dS_n^T Q_n` and
  :math:`dV_κ = Σ_{n: n // G = κ} P_n^T dO_n`: the block products contract the group axis with
  the query rows. Every block visited by the forward is visited again, in the same order:
  ``dQ`` of a query block and ``dK``, ``dV`` of a key block accumulate in at least float32 over the
  blocks they meet, and ``dS`` multiplies ``q`` and ``k`` in at least float32. A fully masked
  row has ``L = +∞``, so ``P = 0`` and its gradients are 0.
  ``mask`` is not differentiable and gets ``None``.
  """
  q, k, v, mask, out, lse = res
  blk = blocks(config, q, k, v, mask)
  bq, bk = config.block_q, config.block_k
  b, t, n, h = q.shape
  heads, g_size = k.shape[2], n // k.shape[2]
  f32 = lse.dtype
  tp = blk.q.shape[3]
  do = pad(g.astype(q.dtype).reshape(b, t, heads, g_size, h).transpose(0, 2, 3, 1, 4), 3, tp)
  o = out.reshape(b, t, heads, g_size, h).transpose(0, 2, 3, 1, 4)
  delta = pad(jnp.sum(do[:, :, :, :t].astype(f32) * o, axis=4), 3, tp)
  lse = pad(lse, 3, tp)
  init = tuple(jnp.zeros_like(a, f32) for a in (blk.q, blk.k, blk.v))

  def step(carry, ij):
    dq, dk, dv = carry
    i, j = ij
    qi, kj, vj = rows(blk.q, i, bq, 3), rows(blk.k, j, bk, 2), rows(blk.v, j, bk, 2)
    doi = rows(do, i, bq, 3)
    s = _scores(config, blk, qi, kj, i, j)
    p = jnp.exp(s - rows(lse, i, bq, 3)[..., None])
    dv_j = lax.dot_general(p, doi.astype(f32), (((2, 3), (2, 3)), ((0, 1), (0, 1))),
                           preferred_element_type=f32)
    dp = lax.dot_general(doi, vj, (((4,), (3,)), ((0, 1), (0, 1))), preferred_element_type=f32)
    ds = p * (dp - rows(delta, i, bq, 3)[..., None])
    dq_i = lax.dot_general(ds, kj.astype(f32), (((4,), (2,)), ((0, 1), (0, 1))),
                           preferred_element_type=f32)
    dk_j = lax.dot_general(ds, qi.astype(f32), (((2, 3), (2, 3)), ((0, 1), (0, 1))),
                           preferred_element_type=f32)
    return (put(dq, rows(dq, i, bq, 3) + config.scale * dq_i, i, bq, 3),
            put(dk, rows(dk, j, bk, 2) + config.scale * dk_j, j, bk, 2),
            put(dv, rows(dv, j, bk, 2) + dv_j, j, bk, 2)), None

  (dq, dk, dv), _ = lax.scan(step, init, blk.pairs)
  s = k.shape[1]
  dq = dq[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(q.shape).astype(q.dtype)
  dk = dk[:, :, :s].transpose(0, 2, 1, 3).astype(k.dtype)
  dv = dv[:, :, :s].transpose(0, 2, 1, 3).astype(v.dtype)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                    mask: jax.Array | None = None, causal: bool = False,
                                    scale: float | None = None) -> jax.Array:
  """Autodiff twin of :func:`dot_product_attention`: the plain ``softmax(scale · q kᵀ) v``
  with the whole ``[B, K, G, T, S]`` score array, its maximum under ``stop_gradient`` (softmax
  is shift-invariant), masked entries selected to probability 0 and fully masked rows to 0."""
  q, k, v, mask, config = _validate(q, k, v, mask, causal, scale)
  if q.size == 0 or k.shape[1] == 0:
    return jnp.zeros_like(q)
  b, t, n, h = q.shape
  s_len, heads = k.shape[1], k.shape[2]
  g = n // heads
  qh = q.reshape(b, t, heads, g, h)
  acc = _checks.at_least_float32(q.dtype)
  s = jnp.einsum("btkgh,bskh->bkgts", qh, k, preferred_element_type=acc) * config.scale
  valid = None if mask is None else head_major_mask(mask, q, heads)
  if config.causal:
    tril = (jnp.arange(s_len).reshape(1, s_len) <= jnp.arange(t).reshape(t, 1))
    tril = tril.reshape(1, 1, 1, t, s_len)
    valid = tril if valid is None else valid & tril
  if valid is not None:
    s = jnp.where(valid, s, -jnp.inf)
  m = lax.stop_gradient(_safe_max(jnp.max(s, axis=4, keepdims=True)))
  e = jnp.exp(s - m)
  total = jnp.sum(e, axis=4, keepdims=True)
  p = e / jnp.where(total > 0, total, jnp.ones_like(total))
  out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(acc), preferred_element_type=acc)
  return out.reshape(b, t, n, h).astype(q.dtype)


dot_product_attention_op = _ops.declare(_OP, dot_product_attention,
                                         dot_product_attention_reference)
