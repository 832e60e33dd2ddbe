"""Argument checking of :func:`jlayers.dot_product_attention` (and its twin): every array's
rank, shape and dtype and every option, refused at trace time with the argument named."""

from __future__ import annotations

import math

import jax.numpy as jnp

from jlayers import _checks
from jlayers._attention_blocks import Config, Extras, block_size, key_block_size

_OP = "dot_product_attention"


def _broadcastable(name, a, full, kind):
  if a.ndim != 4 or any(m not in (1, f) for m, f in zip(a.shape, full)):
    raise ValueError(f"{_OP}: {name} must have rank 4 and broadcast to (B, N, T, S) = {full} "
                     f"(each dimension 1 or that size), got shape {tuple(a.shape)}")
  if kind == "bool" and a.dtype != jnp.bool_:
    raise TypeError(f"{_OP}: {name} must have dtype bool, got {a.dtype}")


def _ints(name, a, shape, what):
  if a is None:
    return None
  a = _checks.as_array(_OP, name, a)
  if not jnp.issubdtype(a.dtype, jnp.integer):
    raise TypeError(f"{_OP}: {name} must have an integer dtype, got {a.dtype}")
  _checks.shape(_OP, name, a, shape, what)
  return a.astype(jnp.int32) if name.endswith("lengths") else a


def _window(value):
  if value is None:
    return None
  pair = (value, value) if _checks.is_int(value) else value
  if (not isinstance(pair, (tuple, list)) or len(pair) != 2
      or not all(_checks.is_int(w) for w in pair)):
    raise TypeError(f"{_OP}: local_window_size must be None, an int or a pair of ints "
                    f"(left, right), got {value!r}")
  if min(pair) < 0:
    raise ValueError(f"{_OP}: local_window_size must be non-negative, got {value!r}")
  return int(pair[0]), int(pair[1])


def validate(q, k, v, *, mask, causal, scale, local_window_size, logits_soft_cap,
             q_segment_ids, kv_segment_ids, query_seq_lengths, key_value_seq_lengths, bias,
             sinks, return_residual):
  """``(q, k, v, Extras, Config, return_residual)``, or a ``TypeError``/``ValueError`` naming
  the argument."""
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
  full = (b, n, t, s)
  if mask is not None:
    mask = _checks.as_array(_OP, "mask", mask)
    _broadcastable("mask", mask, full, "bool")
  if bias is not None:
    bias = _checks.floating(_OP, "bias", bias)
    _broadcastable("bias", bias, full, "float")
  if sinks is not None:
    sinks = _checks.floating(_OP, "sinks", sinks)
    _checks.shape(_OP, "sinks", sinks, (n,), "(N,), one logit per query head")
  if kv_segment_ids is not None and q_segment_ids is None:
    raise ValueError(f"{_OP}: kv_segment_ids needs q_segment_ids")
  q_segment_ids = _ints("q_segment_ids", q_segment_ids, (b, t), "(B, T)")
  if q_segment_ids is not None and kv_segment_ids is None:
    if s != t:
      raise ValueError(f"{_OP}: kv_segment_ids must be given when S ({s}) differs from T "
                       f"({t}); without it the keys take q_segment_ids")
    kv_segment_ids = q_segment_ids
  kv_segment_ids = _ints("kv_segment_ids", kv_segment_ids, (b, s), "(B, S)")
  if q_segment_ids is not None and q_segment_ids.dtype != kv_segment_ids.dtype:
    common = jnp.promote_types(q_segment_ids.dtype, kv_segment_ids.dtype)
    q_segment_ids, kv_segment_ids = q_segment_ids.astype(common), kv_segment_ids.astype(common)
  extras = Extras(mask, bias, sinks, q_segment_ids, kv_segment_ids,
                  _ints("query_seq_lengths", query_seq_lengths, (b,), "(B,)"),
                  _ints("key_value_seq_lengths", key_value_seq_lengths, (b,), "(B,)"))
  causal = _checks.flag(_OP, "causal", causal)
  scale = _checks.optional_finite(_OP, "scale", scale)
  if scale is None:
    scale = 1.0 / math.sqrt(h) if h else 1.0
  cap = None
  if logits_soft_cap is not None:
    cap = _checks.positive_float(_OP, "logits_soft_cap", logits_soft_cap)
  config = Config(bool(causal), float(scale), block_size(t), key_block_size(t, s),
                  _window(local_window_size), cap)
  return q, k, v, extras, config, _checks.flag(_OP, "return_residual", return_residual)
