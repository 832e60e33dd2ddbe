"""Dot-product attention in linear memory, with a hand-derived backward pass.

The forward runs over blocks of queries and keys with an online softmax and keeps, besides
its inputs and output, one log-sum-exp per query row (float32 or wider); the backward
recomputes the probabilities block by block. No ``T × S`` array ever exists: the causal mask,
windows, segment ids and lengths are evaluated per block (:mod:`jlayers._attention_blocks`),
and blocks they hide entirely are skipped. CPUs run the blocks as a ``lax.scan`` in XLA
(here); GPUs and TPUs run the same rule as Pallas kernels (:mod:`jlayers._attention_platforms`
chooses, and says when a call falls back to the XLA form).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _attention_blocks as _blocks
from jlayers import _attention_platforms as _platforms
from jlayers import _checks, _ops, _sharding
from jlayers._attention_args import validate
from jlayers._attention_blocks import Extras, blocks, pad, put, reduce_to, rows


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
    causal: bool = False, scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None, logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
    query_seq_lengths: jax.Array | None = None, key_value_seq_lengths: jax.Array | None = None,
    bias: jax.Array | None = None, sinks: jax.Array | None = None,
    return_residual: bool = False):
  r"""Scaled dot-product attention with grouped-query heads, in linear memory, with a manual
  VJP.

  For batch ``b``, query head ``n`` and its key/value head ``κ = n // (N/K)``:

  .. math::
    z_{ij} = \mathrm{scale} · q_i · k_j + β_{ij}, \qquad
    S_{ij} = c \tanh(z_{ij} / c) \ \text{(with a soft cap } c\text{; else } S = z),

    P_{ij} = \frac{m_{ij} e^{S_{ij}}}{e^{σ_n} + Σ_l m_{il} e^{S_{il}}}, \qquad
    O_i = Σ_j P_{ij} v_j, \qquad L_i = \log\big(e^{σ_n} + Σ_l m_{il} e^{S_{il}}\big)

  with ``β`` the bias, ``σ`` the sink of head ``n`` (absent: no such term) and ``m`` the
  visibility of key ``j`` to query ``i``: the ``mask``; with ``causal``, ``j ≤ i``; with a
  window ``(left, right)``, ``i − left ≤ j ≤ i + right``; with segment ids, keys of the query's
  segment only; with sequence lengths, ``i < query_seq_lengths[b]`` and
  ``j < key_value_seq_lengths[b]``. As ``jax.nn.dot_product_attention`` and PyTorch:
  ``causal`` and the window are top-left aligned when ``T ≠ S`` (query ``i`` against key
  ``j``), and ``N`` query heads share ``K`` key/value heads (``N = K``: multi-head; ``K = 1``:
  multi-query). A row that sees no key gets output 0 and gradient 0 (never NaN), and a
  log-sum-exp of ``-inf`` (``σ_n`` with a sink); so does every row when ``S = 0``. An empty
  output (``B``, ``T``, ``N`` or ``H`` of 0) is returned as such, with empty gradients.

  The forward visits blocks of queries × keys (sizes chosen per sequence length in
  :mod:`jlayers._attention_blocks`) with an online softmax, skipping blocks that the causal
  mask and the window hide entirely (the time grows with ``T · window``, not ``T · S``); it
  saves the inputs, the output and one log-sum-exp per query row (float32, or float64 for
  float64 inputs). Scores, probabilities and every accumulation are in at least float32: for
  half-precision inputs the probabilities multiply ``v`` (and the backward's ``dS``, ``q`` and
  ``k``) unrounded, as autodiff of the twin does, since each row of the softmax's backward
  cancels and that rounding would leave errors as large as the terms that cancel.

  Args:
    q: float[B, T, N, H], queries.
    k: float[B, S, K, H], keys; ``K`` divides ``N``.
    v: float[B, S, K, H], values; one dtype for ``q``, ``k``, ``v``.
    mask: optional bool of rank 4 broadcastable to [B, N, T, S] (each dimension 1 or the
      full size): True where query ``i`` may attend key ``j``. Not differentiable.
    causal: also hide keys after the query (``j > i``); static.
    scale: the score scale, a float; default ``1/√H``; static.
    local_window_size: ``None``, an int ``w`` (the window ``(w, w)``) or ``(left, right)``:
      query ``i`` sees keys ``i − left ≤ j ≤ i + right``; static.
    logits_soft_cap: ``None`` or a positive float ``c``: the scores (scaled, bias added)
      become ``c · tanh(z / c)`` (Gemma 2); static.
    q_segment_ids: optional int[B, T]: a query sees only keys of its own segment (sequences
      packed in one row). Not differentiable.
    kv_segment_ids: optional int[B, S]; default ``q_segment_ids`` (which needs ``S = T``).
    query_seq_lengths: optional int[B]: rows ``i ≥`` the length see no key (output 0).
    key_value_seq_lengths: optional int[B]: keys ``j ≥`` the length are hidden.
    bias: optional float of rank 4 broadcastable to [B, N, T, S] (each dimension 1 or the full
      size), added to the scaled scores (ALiBi, relative position biases); differentiable, its
      gradient summed over its broadcast dimensions block by block.
    sinks: optional float[N]: one logit per query head that joins every row's softmax
      denominator and attends to nothing; differentiable.
    return_residual: also return the log-sum-exp ``L``; static.

  Returns:
    float[B, T, N, H] in the inputs' dtype; with ``return_residual``, the pair of it and
    ``L``, float[B, T, N] in float32 (float64 for float64 inputs), differentiable too.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> q = jnp.ones((1, 2, 1, 2))
    >>> k = jnp.zeros((1, 3, 1, 2))  # equal scores: attention averages the values
    >>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)
    >>> jlayers.dot_product_attention(q, k, v)[0, :, 0].tolist()
    [[2.0, 3.0], [2.0, 3.0]]
    >>> jlayers.dot_product_attention(q, k, v, causal=True)[0, :, 0].tolist()
    [[0.0, 1.0], [1.0, 2.0]]
    >>> jlayers.dot_product_attention(q, k, v, local_window_size=(0, 0))[0, :, 0].tolist()
    [[0.0, 1.0], [2.0, 3.0]]
  """
  q, k, v, extras, config, residual = validate(
      q, k, v, mask=mask, causal=causal, scale=scale, local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, bias=bias, sinks=sinks,
      return_residual=return_residual)
  if q.size == 0 or k.shape[1] == 0:  # an empty output, or no key to see: every row is empty
    out, lse = _blocks.empty(q, extras.sinks)
  else:
    out, lse = _attention(config, *_platforms.whole_sequences(q, k, v), extras)
  return (out, lse) if residual else out


def _forward(config, q, k, v, extras):
  """``(output [B, T, N, H], log-sum-exp [B, K, G, T])``, both in at least float32; a row that
  sees nothing (and has no sink) has the log-sum-exp ``+inf``, so that ``exp(S − L)`` is 0."""
  blk = blocks(config, q, k, v, extras)
  bq, bk = config.block_q, config.block_k
  f32 = _checks.at_least_float32(q.dtype)
  # Zeros laid out as the blocks (batch-split on a mesh), so the loop's carry keeps its type.
  row = jnp.zeros_like(blk.q[..., 0], f32)
  # A sink is a first "key" with score σ and no value: a running max σ and sum e^{σ−σ} = 1.
  m, l = ((row - jnp.inf, row) if extras.sinks is None else
          (row + _blocks.head_major_sinks(extras.sinks, k, f32), row + 1))
  init = (m, l, jnp.zeros_like(blk.q, f32))

  only = len(blk.pairs[0]) == 1 and extras.sinks is None  # one block, nothing before it

  def step(carry, ij):
    m, l, acc = carry
    i, j = ij
    qi = rows(blk.q, i, bq, 3)
    s, _ = _blocks.scores(config, blk, qi, rows(blk.k, j, bk, 2), i, j)
    m_old, l_old, acc_old = rows(m, i, bq, 3), rows(l, i, bq, 3), rows(acc, i, bq, 3)
    m_new = jnp.max(s, axis=4) if only else jnp.maximum(m_old, jnp.max(s, axis=4))
    m_safe = _blocks.safe_max(m_new)
    p = jnp.exp(s - m_safe[..., None])
    vj = rows(blk.v, j, bk, 2).astype(f32)
    if bq == 1:  # one query row (decoding): the values as the left operand read them in place
      pv = lax.dot_general(vj, p, (((2,), (4,)), ((0, 1), (0, 1))),
                           preferred_element_type=f32).transpose(0, 1, 3, 4, 2)
    else:
      pv = lax.dot_general(p, vj, (((4,), (2,)), ((0, 1), (0, 1))), preferred_element_type=f32)
    if only:  # the running sums start empty: nothing to rescale
      l_new, acc_new = jnp.sum(p, axis=4), pv
    else:
      correction = jnp.exp(m_old - m_safe)
      l_new = correction * l_old + jnp.sum(p, axis=4)
      acc_new = correction[..., None] * acc_old + pv
    return (put(m, m_new, i, bq, 3), put(l, l_new, i, bq, 3),
            put(acc, acc_new, i, bq, 3)), None

  if len(blk.pairs[0]) == 1:  # one block (a few rows against a cache): no loop
    (m, l, acc), _ = step(init, (0, 0))
  else:
    (m, l, acc), _ = lax.scan(step, init, blk.pairs)
  seen = l > 0
  out = acc / jnp.where(seen, l, jnp.ones_like(l))[..., None]
  lse = jnp.where(seen, _blocks.safe_max(m) + jnp.log(jnp.where(seen, l, jnp.ones_like(l))),
                  jnp.full_like(l, jnp.inf))
  b, t, n, h = q.shape
  out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out, lse[..., :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, extras):
  return _attention_fwd(config, q, k, v, extras)[0]


def _attention_fwd(config, q, k, v, extras):
  """Saves ``q``, ``k``, ``v`` and the optional arrays (inputs), the output ``O`` and the
  log-sum-exp ``L_i`` of each query row ([B, K, G, T]), both in at least float32.

  With ``L`` the backward recomputes any block of probabilities exactly as
  ``P_ij = exp(S_ij − L_i)`` from ``q`` and ``k`` (one product per block): saving ``P`` would
  keep a ``T × S`` array per head, the memory this formulation exists to avoid, and so would
  saving the soft cap's ``tanh``, which the backward recomputes with the scores. ``O`` gives
  ``D_i = dO_i · O_i``, the row sums of the softmax backward, without revisiting the keys. It
  is kept unrounded for half-precision inputs: every row of ``dS = P ∘ (dP − D)`` cancels,
  and a ``D`` from the rounded output would carry that rounding into every entry of ``dS``.
  """
  out, lse = _platforms.forward(config, q, k, v, extras, xla=_forward)
  return (out.astype(q.dtype), _blocks.public_lse(lse, q)), (q, k, v, extras, out, lse)


def _attention_bwd(config, res, cts):
  r"""Backward of attention from ``q``, ``k``, ``v``, ``O`` and ``L``, block by block.

  For one batch and query head, with ``dO = ∂ℓ/∂O``, ``\bar L = ∂ℓ/∂L`` (0 unless the
  log-sum-exp is returned and used) and ``P_ij = exp(S_ij − L_i)``:

  1. ``O_i = Σ_j P_ij v_j``, linear in ``v`` and in ``P``:

     .. math::
       \frac{∂ℓ}{∂v_j} = Σ_i P_{ij}\, dO_i \quad (dV = P^T dO), \qquad
       dP_{ij} = \frac{∂ℓ}{∂P_{ij}} = dO_i · v_j \quad (dP = dO\, V^T)

  2. The softmax of row ``i`` has Jacobian :math:`∂P_{ij}/∂S_{il} = P_{ij}(δ_{jl} - P_{il})`
     (0 for hidden entries, where ``P = 0``; the sink's term in the denominator changes
     nothing here), and :math:`∂L_i/∂S_{il} = P_{il}`, so

     .. math::
       dS_{il} = Σ_j dP_{ij} P_{ij} (δ_{jl} - P_{il}) + \bar L_i P_{il}
               = P_{il} (dP_{il} - δ_i), \qquad
       δ_i = D_i - \bar L_i, \quad D_i = Σ_j P_{ij} dP_{ij} = dO_i · O_i

     ``D`` is a row sum of ``dO ∘ O``: no pass over the keys is needed for it.
  3. The soft cap ``S = c tanh(z / c)`` has :math:`dS/dz = 1 - \tanh^2(z/c)`, so
     ``dz = dS ∘ (1 − tanh²(z/c))`` (``dz = dS`` without a cap); ``tanh`` is recomputed with
     the block's scores.
  4. ``z_ij = scale · q_i · k_j + β_ij``:

     .. math::
       \frac{∂ℓ}{∂q_i} = \mathrm{scale}\, Σ_j dz_{ij} k_j \quad (dQ = \mathrm{scale}\, dz\, K),
       \qquad \frac{∂ℓ}{∂k_j} = \mathrm{scale}\, Σ_i dz_{ij} q_i
       \quad (dK = \mathrm{scale}\, dz^T Q), \qquad \frac{∂ℓ}{∂β_{ij}} = dz_{ij}

     and a bias broadcast along batch, heads, queries or keys gets ``dz`` summed along
     them, block by block, into an accumulator of the bias's own shape.
  5. The sink ``σ`` of head ``n`` enters only the denominators: with
     ``P_{σi} = exp(σ − L_i)``, :math:`∂P_{ij}/∂σ = -P_{ij} P_{σi}`, so
     :math:`∂O_i/∂σ = -P_{σi} O_i` and :math:`∂L_i/∂σ = P_{σi}`, and

     .. math::
       \frac{∂ℓ}{∂σ} = Σ_{b, i} P_{σi} (\bar L_i - dO_i · O_i) = -Σ_{b, i} P_{σi} δ_i

  Grouped-query heads: key/value head ``κ`` serves ``G = N/K`` query heads, so its gradients
  add over them, in at least float32. A row that sees no key (and has no sink) has
  ``L = +∞``, so ``P = 0`` and its gradients are 0. Masks are not differentiable.
  """
  q, k, v, extras, out, lse = res
  g, g_lse = cts
  b, t, n, h = q.shape
  heads, f32, g = k.shape[2], lse.dtype, g.astype(q.dtype)
  lse_bar = g_lse.astype(f32).reshape(b, t, heads, n // heads).transpose(0, 2, 3, 1)
  delta = jnp.sum((g.astype(f32) * out).reshape(b, t, heads, n // heads, h), axis=4)
  delta = delta.transpose(0, 2, 3, 1) - lse_bar  # [B, K, G, T]
  dq, dk, dv, dbias = _platforms.backward(config, q, k, v, extras, g, lse, delta,
                                          xla=_blockwise_backward)
  dsinks = None
  if extras.sinks is not None:
    p_sink = jnp.exp(_blocks.head_major_sinks(extras.sinks, k, f32) - lse)
    dsinks = -jnp.sum(p_sink * delta, axis=(0, 3)).reshape(n).astype(extras.sinks.dtype)
    dsinks = _sharding.reshard_as(dsinks, extras.sinks)
  if dbias is not None:  # in the bias's own dtype and layout
    dbias = _sharding.reshard_as(dbias.astype(extras.bias.dtype), extras.bias)
  dq, dk, dv = (_sharding.reshard_as(d.astype(a.dtype), a) for d, a in ((dq, q), (dk, k), (dv, v)))
  return dq, dk, dv, Extras(None, dbias, dsinks, None, None, None, None)


def _blockwise_backward(config, q, k, v, extras, g, lse, delta):
  """``(dQ, dK, dV, dbias or None)`` in at least float32 by the XLA blockwise form: every
  block the forward visited, again, in the same order."""
  blk, bq, bk = blocks(config, q, k, v, extras), config.block_q, config.block_k
  (b, t, n, h), heads, f32, tp = q.shape, k.shape[2], lse.dtype, blk.q.shape[3]
  do = pad(g.reshape(b, t, heads, n // heads, h).transpose(0, 2, 3, 1, 4), 3, tp)
  lse_p, delta_p = pad(lse, 3, tp), pad(delta, 3, tp)
  init = tuple(jnp.zeros_like(a, f32) for a in (blk.q, blk.k, blk.v))
  if blk.bias is not None:
    init += (jnp.zeros_like(blk.bias, f32),)

  def step(carry, ij):
    (dq, dk, dv), (i, j) = carry[:3], ij
    qi, kj, vj = rows(blk.q, i, bq, 3), rows(blk.k, j, bk, 2), rows(blk.v, j, bk, 2)
    doi = rows(do, i, bq, 3)
    s, tanh = _blocks.scores(config, blk, qi, kj, i, j)
    p = jnp.exp(s - rows(lse_p, i, bq, 3)[..., None])
    dv_j = lax.dot_general(p, doi.astype(f32), (((2, 3), (2, 3)), ((0, 1), (0, 1))),
                           preferred_element_type=f32)
    dp = lax.dot_general(doi, vj, (((4,), (3,)), ((0, 1), (0, 1))), preferred_element_type=f32)
    dz = p * (dp - rows(delta_p, i, bq, 3)[..., None])
    if tanh is not None:
      dz = dz * (1 - tanh * tanh)
    dq_i = lax.dot_general(dz, kj.astype(f32), (((4,), (2,)), ((0, 1), (0, 1))),
                           preferred_element_type=f32)
    dk_j = lax.dot_general(dz, qi.astype(f32), (((2, 3), (2, 3)), ((0, 1), (0, 1))),
                           preferred_element_type=f32)
    new = (put(dq, rows(dq, i, bq, 3) + config.scale * dq_i, i, bq, 3),
           put(dk, rows(dk, j, bk, 2) + config.scale * dk_j, j, bk, 2),
           put(dv, rows(dv, j, bk, 2) + dv_j, j, bk, 2))
    if blk.bias is not None:
      db, slab = carry[3], rows(carry[3], i, bq, 3)
      block = rows(slab, j, bk, 4)
      new += (put(db, put(slab, block + reduce_to(dz, block.shape), j, bk, 4), i, bq, 3),)
    return new, None

  grads, _ = lax.scan(step, init, blk.pairs)
  dq = grads[0][:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(q.shape)
  dk, dv = (a[:, :, :k.shape[1]].transpose(0, 2, 1, 3) for a in grads[1:3])
  if extras.bias is None:
    return dq, dk, dv, None
  mt, ms = extras.bias.shape[2:]  # drop the padding
  return dq, dk, dv, grads[3][:, :, :, :mt, :ms].reshape(extras.bias.shape)


_attention.defvjp(_attention_fwd, _attention_bwd)


def dot_product_attention_reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mask: jax.Array | None = None,
    causal: bool = False, scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None, logits_soft_cap: float | None = None,
    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None,
    query_seq_lengths: jax.Array | None = None, key_value_seq_lengths: jax.Array | None = None,
    bias: jax.Array | None = None, sinks: jax.Array | None = None,
    return_residual: bool = False):
  """Autodiff twin of :func:`dot_product_attention`: the plain ``softmax(S) v`` with the whole
  ``[B, K, G, T, S]`` score array, every visibility condition built as a whole ``T × S`` mask,
  the sink added to the denominator, the maximum under ``stop_gradient`` (softmax and
  log-sum-exp are shift-invariant), hidden entries selected to probability 0 and rows that
  see nothing to 0."""
  q, k, v, ex, config, residual = validate(
      q, k, v, mask=mask, causal=causal, scale=scale, local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap, q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths, bias=bias, sinks=sinks,
      return_residual=return_residual)
  if q.size == 0 or k.shape[1] == 0:
    out, lse = _blocks.empty(q, ex.sinks)
    return (out, lse) if residual else out
  b, t, n, h = q.shape
  s_len, heads = k.shape[1], k.shape[2]
  acc = _checks.at_least_float32(q.dtype)
  z = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, heads, n // heads, h), k,
                 preferred_element_type=acc) * config.scale
  if ex.bias is not None:
    z = z + _blocks.head_major(ex.bias, q, heads).astype(acc)
  if config.soft_cap is not None:
    z = config.soft_cap * jnp.tanh(z / config.soft_cap)
  valid = _blocks.dense_visibility(config, ex, q, s_len, heads)
  for c in valid:
    z = jnp.where(c, z, -jnp.inf)
  m = jnp.max(z, axis=4, keepdims=True)
  if ex.sinks is not None:
    sink = _blocks.head_major_sinks(ex.sinks, k, acc)[..., None]
    m = jnp.maximum(m, sink)
  m = lax.stop_gradient(_blocks.safe_max(m))
  e = jnp.exp(z - m)
  total = jnp.sum(e, axis=4, keepdims=True)
  if ex.sinks is not None:
    total = total + jnp.exp(sink - m)
  some = total > 0
  p = e / jnp.where(some, total, jnp.ones_like(total))
  out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(acc), preferred_element_type=acc)
  out = out.reshape(b, t, n, h).astype(q.dtype)
  if not residual:
    return out
  lse = jnp.where(some, m + jnp.log(jnp.where(some, total, jnp.ones_like(total))), -jnp.inf)
  return out, lse[..., 0].transpose(0, 3, 1, 2).reshape(b, t, n)


dot_product_attention_op = _ops.declare("dot_product_attention", dot_product_attention,
                                         dot_product_attention_reference)
