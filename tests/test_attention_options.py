"""The options of ``dot_product_attention`` (windows, soft cap, segment ids, lengths, bias,
sinks, the returned log-sum-exp) against implementations that share nothing with jlayers:
``jax.nn.dot_product_attention`` where it has the option, NumPy in float64 from the published
equations where it does not, per-sequence calls for packed rows, and values by hand. The
agreement of each rule with its twin over random cotangents is in the grid
(``jlayers/grids/attention.py``)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit

import jlayers
from jlayers import _attention_blocks

BOTH = pytest.mark.parametrize("fn", [jlayers.dot_product_attention,
                                      jlayers.reference.dot_product_attention],
                               ids=["manual", "twin"])


def _qkv(seed, b=2, t=9, n=4, s=9, k=2, h=3):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal(shape) for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))


def _numpy_attention(q, k, v, *, visible=None, bias=None, cap=None, sinks=None, scale=None):
  """Float64 NumPy attention from the equations: z = scale q·k + β, S = c tanh(z/c), P the
  softmax over the visible keys and the sink, O = P v, L = log of the denominator."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # key/value head n // g
  z = np.einsum("btnh,bsnh->bnts", q, kk) * (scale or 1 / math.sqrt(h))
  if bias is not None:
    z = z + bias
  if cap is not None:
    z = cap * np.tanh(z / cap)
  if visible is None:
    visible = np.ones(z.shape, bool)
  e = np.where(visible, np.exp(z), 0.0)
  total = e.sum(-1, keepdims=True)
  if sinks is not None:
    total = total + np.exp(sinks).reshape(1, n, 1, 1)
  p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
  lse = np.where(total[..., 0] > 0, np.log(np.where(total[..., 0] > 0, total[..., 0], 1)),
                 -np.inf)
  return np.einsum("bnts,bsnh->btnh", p, vv), lse.transpose(0, 2, 1)


def _x64(fn, *args, **kwargs):
  with jax.enable_x64(True):
    out = fn(*(jnp.asarray(a) for a in args), **kwargs)
    return jax.tree_util.tree_map(np.asarray, out)


@BOTH
@pytest.mark.parametrize("window, causal", [(2, False), ((3, 0), True), ((1, 3), False),
                                            ((0, 0), False)])
def test_local_window_equals_jax_nn(fn, window, causal):
  q, k, v = (jnp.asarray(a, jnp.float32) for a in _qkv(0))
  got = fn(q, k, v, local_window_size=window, causal=causal)
  want = jax.nn.dot_product_attention(q, k, v, local_window_size=window, is_causal=causal)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@BOTH
def test_lengths_bias_and_residual_equal_jax_nn_with_gradients(fn):
  """Valid query rows only: jax.nn gives rows past the query length a mean of the values,
  jlayers 0. The bias's gradient (broadcast over batch and keys) against jax.nn's. jax.nn
  does not differentiate its log-sum-exp (its gradient is the twin's business, in the grid,
  and the sink test's, by hand), so the log-sum-exp enters the value only."""
  q, k, v = (jnp.asarray(a, jnp.float32) for a in _qkv(1, t=7, s=8))
  bias = jnp.asarray(np.random.default_rng(2).standard_normal((1, 4, 7, 1)), jnp.float32)
  q_len, kv_len = jnp.array([5, 7]), jnp.array([8, 3])
  rows = (np.arange(7)[None, :, None, None] < np.asarray(q_len)[:, None, None, None])

  def loss(f, **kw):
    def inner(q, k, v, bias):
      out, lse = f(q, k, v, bias=bias, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                   return_residual=True, **kw)
      return (jnp.sum(jnp.where(rows, out, 0) ** 2)
              + jax.lax.stop_gradient(jnp.sum(jnp.where(rows[..., 0], lse, 0))))
    return jax.value_and_grad(inner, (0, 1, 2, 3))(q, k, v, bias)

  (got, grads), (want, wgrads) = jax.jit(lambda: (loss(fn), loss(jax.nn.dot_product_attention)))()
  np.testing.assert_allclose(got, want, rtol=2e-5)
  for a, b in zip(grads, wgrads):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@BOTH
def test_soft_cap_bias_and_sinks_against_numpy(fn):
  q, k, v = _qkv(3)
  rng = np.random.default_rng(4)
  bias, sinks = rng.standard_normal((2, 1, 9, 9)), rng.standard_normal(4)
  visible = np.tril(np.ones((9, 9), bool))[None, None]
  out, lse = _x64(fn, q, k, v, bias=bias, sinks=sinks, logits_soft_cap=0.9, causal=True,
                  return_residual=True)
  want, want_lse = _numpy_attention(q, k, v, visible=visible, bias=bias, cap=0.9, sinks=sinks)
  np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-13)


@BOTH
def test_packed_rows_equal_each_sequence_alone(fn):
  """Three sequences packed in one row with segment ids (causal) give each sequence's own
  causal attention, values and gradients."""
  q, k, v = (a[:1] for a in _qkv(5))
  seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
  cot = np.random.default_rng(6).standard_normal(q.shape)

  def packed(q, k, v):
    return fn(q, k, v, causal=True, q_segment_ids=jnp.asarray(seg))

  def alone(q, k, v):
    parts = [fn(q[:, a:b], k[:, a:b], v[:, a:b], causal=True) for a, b in ((0, 3), (3, 5), (5, 9))]
    return jnp.concatenate(parts, axis=1)

  @jax.jit
  def both(q, k, v, cot):
    return [(f(q, k, v),) + jax.vjp(f, q, k, v)[1](cot) for f in (packed, alone)]

  got, want = _x64(both, q, k, v, cot)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


@BOTH
def test_sink_gradient_by_hand(fn):
  """One query, one key with score 0 and a sink σ = 0: P = 1/2 for the key and the sink,
  O = v/2, L = log 2. dσ = P_σ (dL − dO · O) = (1/2)(dL − dO · v / 2)."""
  v, do, dl = np.array([2.0, -4.0]), np.array([1.0, 3.0]), 0.5

  def f(v, sinks):
    out, lse = fn(jnp.zeros((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2)), v.reshape(1, 1, 1, 2),
                  sinks=sinks, return_residual=True)
    return jnp.sum(out.ravel() * do) + dl * lse[0, 0, 0]

  with jax.enable_x64(True):
    value, (dv, dsink) = jax.jit(jax.value_and_grad(f, (0, 1)))(jnp.asarray(v), jnp.zeros(1))
  assert float(value) == pytest.approx(do @ v / 2 + dl * math.log(2), rel=1e-15)
  np.testing.assert_allclose(dv, do / 2, rtol=1e-15)
  np.testing.assert_allclose(dsink, [0.5 * (dl - do @ v / 2)], rtol=1e-15)


@BOTH
def test_rows_that_see_nothing_give_zero_output_gradient_and_minus_inf_lse(fn):
  q, k, v = (jnp.asarray(a) for a in _qkv(7, t=5, s=5))
  seg_q = jnp.array([[0, 0, 1, 1, 3]] * 2)  # segment 3 of the queries has no key
  seg_kv = jnp.array([[0, 0, 1, 1, 2]] * 2)

  def f(q, k, v, bias):
    out, lse = fn(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_kv, bias=bias,
                  logits_soft_cap=2.0, key_value_seq_lengths=jnp.array([5, 0]),
                  return_residual=True)
    return jnp.sum(out * out), (out, lse)

  bias = jnp.ones((1, 1, 5, 5))
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))(
      q, k, v, bias)
  assert not any(np.isnan(np.asarray(g)).any() for g in grads)
  np.testing.assert_array_equal(out[0, 4], 0)
  np.testing.assert_array_equal(out[1], 0)
  np.testing.assert_array_equal(grads[0][0, 4], 0)
  np.testing.assert_array_equal(grads[0][1], 0)
  assert np.all(np.asarray(lse[0, 4]) == -np.inf) and np.all(np.asarray(lse[1]) == -np.inf)


def test_window_skips_blocks_so_work_grows_with_t_times_window():
  config = _attention_blocks.Config(True, 1.0, 128, 128, (255, 0))
  counts = [len(_attention_blocks.visited_pairs(config, t, t)[0]) for t in (2048, 8192)]
  assert counts == [16 + 15 + 14, 64 + 63 + 62]  # the diagonal block and two below it
  symmetric = config._replace(causal=False, window=(100, 100))
  assert len(_attention_blocks.visited_pairs(symmetric, 1024, 1024)[0]) == 8 + 2 * 7


def test_small_bias_gradient_is_reduced_block_by_block():
  """A bias of shape (1, N, 1, S) gets a gradient of that shape, equal to the sum over batch
  and queries of the full-size bias's gradient."""
  q, k, v = (jnp.asarray(a) for a in _qkv(8))
  small = jnp.asarray(np.random.default_rng(9).standard_normal((1, 4, 1, 9)))

  def loss(bias):
    return jnp.sum(jnp.sin(jlayers.dot_product_attention(q, k, v, bias=bias, causal=True)))

  with jax.enable_x64(True):
    d_small, d_full = jax.jit(lambda b: (jax.grad(loss)(b), jax.grad(loss)(
        jnp.broadcast_to(b, (2, 4, 9, 9)))))(small)
  assert d_small.shape == small.shape
  np.testing.assert_allclose(d_small, d_full.sum(axis=(0, 2), keepdims=True), rtol=1e-12)


Q, KV = jnp.ones((2, 3, 4, 5)), jnp.ones((2, 6, 2, 5))
att = jlayers.dot_product_attention
BAD = [
    ("window type", TypeError, r"local_window_size must be None, an int or a pair of ints "
     r"\(left, right\), got 2.5", lambda q, kv: att(q, kv, kv, local_window_size=2.5)),
    ("window negative", ValueError, r"local_window_size must be non-negative, got \(-1, 2\)",
     lambda q, kv: att(q, kv, kv, local_window_size=(-1, 2))),
    ("soft cap", ValueError, "logits_soft_cap must be a positive float, got 0.0",
     lambda q, kv: att(q, kv, kv, logits_soft_cap=0.0)),
    ("segment shape", ValueError, r"q_segment_ids must have shape \(2, 3\) \(B, T\), got "
     r"\(2, 6\)", lambda q, kv: att(q, kv, kv, q_segment_ids=jnp.zeros((2, 6), jnp.int32))),
    ("segment dtype", TypeError, "q_segment_ids must have an integer dtype, got float32",
     lambda q, kv: att(q, kv, kv, q_segment_ids=jnp.zeros((2, 3)))),
    ("kv segments without q", ValueError, "kv_segment_ids needs q_segment_ids",
     lambda q, kv: att(q, kv, kv, kv_segment_ids=jnp.zeros((2, 6), jnp.int32))),
    ("segments t != s", ValueError, r"kv_segment_ids must be given when S \(6\) differs from T",
     lambda q, kv: att(q, kv, kv, q_segment_ids=jnp.zeros((2, 3), jnp.int32))),
    ("lengths shape", ValueError, r"key_value_seq_lengths must have shape \(2,\) \(B,\), got "
     r"\(2, 1\)", lambda q, kv: att(q, kv, kv, key_value_seq_lengths=jnp.ones((2, 1), int))),
    ("bias shape", ValueError, r"bias must have rank 4 and broadcast to \(B, N, T, S\) = "
     r"\(2, 4, 3, 6\)", lambda q, kv: att(q, kv, kv, bias=jnp.zeros((2, 2, 3, 6)))),
    ("bias dtype", TypeError, "bias must have a floating dtype, got int32",
     lambda q, kv: att(q, kv, kv, bias=jnp.zeros((1, 1, 1, 6), jnp.int32))),
    ("sinks shape", ValueError, r"sinks must have shape \(4,\) \(N,\), one logit per query "
     r"head, got \(2,\)", lambda q, kv: att(q, kv, kv, sinks=jnp.zeros(2))),
    ("return_residual", TypeError, "return_residual must be a bool, got int",
     lambda q, kv: att(q, kv, kv, return_residual=1)),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, Q, KV)
