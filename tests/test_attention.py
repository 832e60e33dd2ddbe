"""Golden values, agreement with ``jax.nn.dot_product_attention``, masking conventions, block
structure, linear memory and bad input of ``dot_product_attention`` (the generic checks are in
test_ops_generic.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers
from jlayers import _attention_blocks

BOTH = pytest.mark.parametrize("fn", [jlayers.dot_product_attention,
                                      jlayers.reference.dot_product_attention],
                               ids=["manual", "twin"])


def _rand(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape))


@BOTH
def test_golden_values_and_gradients_by_hand(fn):
  # One query q = [1, 0] against keys [1, 0] and [0, 1] (scale 1): scores [1, 0], so
  # P = [a, 1 - a] with a = e / (e + 1), and O = a v_0 + (1 - a) v_1.
  a = math.e / (math.e + 1)
  v0, v1 = np.array([1.0, 2.0]), np.array([3.0, 5.0])
  dout = np.array([1.0, -1.0])
  # dV_j = P_j dO; dP_j = dO · v_j; D = dO · O; dS_j = P_j (dP_j - D); dq = Σ_j dS_j k_j,
  # dk_j = dS_j q.
  out = a * v0 + (1 - a) * v1
  dp = np.array([dout @ v0, dout @ v1])
  ds = np.array([a, 1 - a]) * (dp - dout @ out)
  with jax.enable_x64(True):
    q = jnp.array([1.0, 0.0]).reshape(1, 1, 1, 2)
    k = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 1, 2)
    v = jnp.array([v0, v1]).reshape(1, 2, 1, 2)
    y, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, scale=1.0), q, k, v)
    dq, dk, dv = pullback(jnp.asarray(dout).reshape(1, 1, 1, 2))
  np.testing.assert_allclose(y.ravel(), out, rtol=1e-14)
  np.testing.assert_allclose(dv.reshape(2, 2), [a * dout, (1 - a) * dout], rtol=1e-14)
  np.testing.assert_allclose(dq.ravel(), ds[0] * np.array([1.0, 0.0]) + ds[1] * np.array(
      [0.0, 1.0]), rtol=1e-13)
  np.testing.assert_allclose(dk.reshape(2, 2), [ds[0] * np.array([1.0, 0.0]),
                                                ds[1] * np.array([1.0, 0.0])], atol=1e-15)


@BOTH
def test_causal_is_top_left_aligned_when_t_differs_from_s(fn):
  """Query i sees keys 0..i, for T < S and T > S; equal scores make each row the running
  mean of the values it sees."""
  v = jnp.arange(5.0).reshape(1, 5, 1, 1)
  for t in (3, 7):
    out = fn(jnp.zeros((1, t, 1, 1)), jnp.zeros((1, 5, 1, 1)), v, causal=True)
    want = [np.mean(np.arange(min(i, 4) + 1)) for i in range(t)]
    np.testing.assert_allclose(out.ravel(), want, rtol=1e-6)


def _jax_nn(q, k, v, **kwargs):
  with jax.numpy_dtype_promotion("standard"):
    return jax.nn.dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("t, n, s, kv, causal", [(5, 4, 7, 2, False), (7, 4, 5, 1, True),
                                                 (6, 2, 6, 2, True), (150, 2, 140, 1, True)])
def test_agrees_with_jax_nn_dot_product_attention(t, n, s, kv, causal):
  """An independent implementation: values and gradients, grouped-query heads, causal. Its
  softmax runs in float32 whatever the input dtype, hence float32 tolerances here (the float64
  proof is against the twin, and the NumPy forward below)."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    q, k, v = _rand(rng, 2, t, n, 3), _rand(rng, 2, s, kv, 3), _rand(rng, 2, s, kv, 3)
    w = _rand(rng, 2, t, n, 3)
    ours = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(w * jlayers.dot_product_attention(q, k, v, causal=causal,
                                                                  scale=0.6)), (0, 1, 2)))
    theirs = jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(w * _jax_nn(q, k, v, is_causal=causal, scale=0.6)), (0, 1, 2)))
    (a, ga), (b, gb) = ours(q, k, v), theirs(q, k, v)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _numpy_attention(q, k, v, mask, scale):
  """float64 NumPy: one loop over heads, each query head reading key head n // G."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros_like(q)
  for head in range(n):
    s = np.einsum("bth,bsh->bts", q[:, :, head], k[:, :, head // g]) * scale
    m = np.broadcast_to(mask[:, head if mask.shape[1] > 1 else 0], s.shape)
    e = np.where(m, np.exp(s - np.where(m, s, -np.inf).max(-1, keepdims=True)), 0.0)
    out[:, :, head] = np.einsum("bts,bsh->bth", e / e.sum(-1, keepdims=True), v[:, :, head // g])
  return out


@pytest.mark.parametrize("t, s", [(6, 9), (150, 140)])
def test_forward_against_numpy_float64(t, s):
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal(shape) for shape in ((2, t, 4, 3), (2, s, 2, 3), (2, s, 2, 3)))
  mask = rng.random((2, 4, t, s)) < 0.7
  mask[..., 0] = True
  mask &= np.arange(s)[None, :] <= np.arange(t)[:, None]  # and causal
  want = _numpy_attention(q, k, v, mask, 0.8)
  with jax.enable_x64(True):
    got = jlayers.dot_product_attention(*map(jnp.asarray, (q, k, v)), mask=jnp.asarray(mask),
                                        causal=True, scale=0.8)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_a_mask_agrees_with_jax_nn_on_rows_that_see_a_key():
  rng = np.random.default_rng(1)
  mask = jnp.asarray(rng.random((2, 1, 5, 6)) < 0.6).at[:, :, :, 0].set(True)
  with jax.enable_x64(True):
    q, k, v = _rand(rng, 2, 5, 2, 3), _rand(rng, 2, 6, 2, 3), _rand(rng, 2, 6, 2, 3)
    np.testing.assert_allclose(jlayers.dot_product_attention(q, k, v, mask=mask),
                               _jax_nn(q, k, v, mask=mask), rtol=1e-6)


@BOTH
@pytest.mark.parametrize("t, s", [(4, 5), (140, 150)])
def test_a_row_with_every_key_masked_gives_zero_output_and_gradient(fn, t, s):
  """Also in the block loop (T, S > 64, the block size): the fully masked rows span blocks."""
  rng = np.random.default_rng(2)
  mask = np.ones((1, 2, t, s), bool)
  mask[0, 0, 1] = False
  mask[0, 1, t - 1] = False
  q, k, v = _rand(rng, 1, t, 2, 3), _rand(rng, 1, s, 1, 3), _rand(rng, 1, s, 1, 3)
  def run(q, k, v):
    out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask=jnp.asarray(mask)), q, k, v)
    return out, *pullback(jnp.ones_like(out))
  out, dq, dk, dv = jax.jit(run)(q, k, v)
  for a in (out, dq, dk, dv):
    assert not bool(jnp.any(jnp.isnan(a)))
  np.testing.assert_array_equal(out[0, 1, 0], 0.0)
  np.testing.assert_array_equal(out[0, t - 1, 1], 0.0)
  np.testing.assert_array_equal(dq[0, 1, 0], 0.0)
  assert float(jnp.max(jnp.abs(out[0, 0, 0]))) > 0


@BOTH
def test_masked_keys_get_no_gradient_and_never_leak(fn):
  """A key masked for every query has zero dk and dv, even holding huge values."""
  rng = np.random.default_rng(3)
  mask = np.ones((1, 1, 1, 4), bool)
  mask[..., 2] = False
  k = _rand(rng, 1, 4, 1, 2).at[0, 2].set(1e30)
  v = _rand(rng, 1, 4, 1, 2).at[0, 2].set(1e30)
  q = _rand(rng, 1, 3, 1, 2)
  out, (dk, dv) = jax.value_and_grad(
      lambda k, v: jnp.sum(fn(q, k, v, mask=jnp.asarray(mask))), (0, 1))(k, v)
  assert bool(jnp.isfinite(out))
  np.testing.assert_array_equal(dk[0, 2], 0.0)
  np.testing.assert_array_equal(dv[0, 2], 0.0)


@BOTH
def test_no_keys_or_no_queries_give_zeros(fn):
  for t, s in ((0, 3), (3, 0)):
    q, k = jnp.ones((1, t, 2, 2)), jnp.ones((1, s, 1, 2))
    y, grads = jax.value_and_grad(lambda q, k: jnp.sum(fn(q, k, k)), (0, 1))(q, k)
    assert float(y) == 0.0 and [g.shape for g in grads] == [q.shape, k.shape]
    np.testing.assert_array_equal(fn(q, k, k), np.zeros(q.shape))


def test_causal_blocks_above_the_diagonal_are_skipped():
  config = _attention_blocks.Config(True, 1.0, 128, 128)
  x = jnp.zeros((1, 300, 1, 2))
  blocks = _attention_blocks.blocks(config, x, x, x, _attention_blocks.Extras())
  # 3 × 3 blocks of 128: the 3 above the diagonal are never visited.
  assert list(zip(*map(list, blocks.pairs))) == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1),
                                                 (2, 2)]
  assert len(_attention_blocks.visited_pairs(config._replace(causal=False), 300, 300)[0]) == 9


def test_block_size_is_64_up_to_512_positions_and_128_beyond():
  assert [_attention_blocks.block_size(n) for n in (0, 1, 20, 64, 65, 512, 513, 2048)] == [
      1, 1, 20, 64, 64, 64, 128, 128]


def _largest_intermediate(fn, *args):
  """The most elements of any value computed by ``fn``, through every nested jaxpr."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        best = max(best, math.prod(getattr(var.aval, "shape", ())))
      for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
        best = max(best, walk(sub))
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", param)
        if hasattr(inner, "eqns"):
          best = max(best, walk(inner))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_forward_and_backward_never_form_a_t_by_s_array():
  """Linear memory, structurally: with T = S = 512 no value of the forward or the backward
  has as many elements as one head's T × S scores (a 64 × 64 block per head does)."""
  t, heads = 512, 2
  q = jnp.ones((1, t, heads, 4))

  def fwd_bwd(q, k, v):
    out, pullback = jax.vjp(lambda q, k, v: jlayers.dot_product_attention(q, k, v, causal=True),
                            q, k, v)
    return pullback(out)

  assert _largest_intermediate(fwd_bwd, q, q, q) < t * t
  twin = lambda q, k, v: jax.vjp(jlayers.reference.dot_product_attention, q, k, v)[1](q)  # noqa: E731
  assert _largest_intermediate(twin, q, q, q) >= heads * t * t  # the measure can see it


def test_saves_inputs_output_and_one_log_sum_exp_per_query_row():
  q, k = jnp.ones((2, 5, 4, 3)), jnp.ones((2, 7, 2, 3))
  avals = residual_avals(jlayers.dot_product_attention, q, k, k)
  own = sorted((a.shape, str(a.dtype)) for a in avals if a.shape not in (q.shape, k.shape))
  assert own == [((2, 2, 2, 5), "float32")]  # [B, K, G, T]
  assert sorted(a.shape for a in avals if a.shape == q.shape) == [q.shape, q.shape]  # q, out


def test_half_precision_inputs_give_their_dtype_back():
  rng = np.random.default_rng(4)
  q, k, v = (_rand(rng, 1, 6, 2, 4).astype(jnp.bfloat16) for _ in range(3))
  out = jlayers.dot_product_attention(q, k, v, causal=True)
  assert out.dtype == jnp.bfloat16
  grads = jax.grad(lambda q, k, v: jnp.sum(
      jlayers.dot_product_attention(q, k, v).astype(jnp.float32)), (0, 1, 2))(q, k, v)
  assert {g.dtype for g in grads} == {jnp.dtype(jnp.bfloat16)}


Q, KV = jnp.ones((2, 3, 4, 5)), jnp.ones((2, 6, 2, 5))
BAD = [
    ("q rank", ValueError, r"dot_product_attention: q must have rank 4 \(B, T, N, H\), got "
     r"shape \(3, 4, 5\)", lambda q, kv: jlayers.dot_product_attention(q[0], kv, kv)),
    ("int q", TypeError, "dot_product_attention: q must have a floating dtype, got int32",
     lambda q, kv: jlayers.dot_product_attention(q.astype(jnp.int32), kv, kv)),
    ("mixed dtypes", TypeError, "dot_product_attention: q, k and v must have one dtype, got "
     "bfloat16, float32 and float32",
     lambda q, kv: jlayers.dot_product_attention(q.astype(jnp.bfloat16), kv, kv)),
    ("heads", ValueError, r"dot_product_attention: q's heads \(N=4\) must be a multiple of k's "
     r"and v's heads \(K=3\)",
     lambda q, kv: jlayers.dot_product_attention(q, kv[:, :, :1].repeat(3, 2), kv[:, :, :1]
                                                 .repeat(3, 2))),
    ("head size", ValueError, r"dot_product_attention: k must have shape \(B, S, K, H\) with "
     r"q's B=2 and H=5, got \(2, 6, 2, 4\)",
     lambda q, kv: jlayers.dot_product_attention(q, kv[..., :4], kv[..., :4])),
    ("v shape", ValueError, r"dot_product_attention: v must have shape \(2, 6, 2, 5\) \(k's "
     r"shape\), got \(2, 5, 2, 5\)", lambda q, kv: jlayers.dot_product_attention(q, kv, kv[:, :5])),
    ("mask dtype", TypeError, "dot_product_attention: mask must have dtype bool, got float32",
     lambda q, kv: jlayers.dot_product_attention(q, kv, kv, mask=jnp.ones((2, 4, 3, 6)))),
    ("mask shape", ValueError, r"mask must have rank 4 and broadcast to \(B, N, T, S\) = "
     r"\(2, 4, 3, 6\) \(each dimension 1 or that size\), got shape \(2, 4, 3, 5\)",
     lambda q, kv: jlayers.dot_product_attention(q, kv, kv, mask=jnp.ones((2, 4, 3, 5), bool))),
    ("mask rank", ValueError, r"got shape \(3, 6\)",
     lambda q, kv: jlayers.reference.dot_product_attention(q, kv, kv,
                                                           mask=jnp.ones((3, 6), bool))),
    ("causal", TypeError, "dot_product_attention: causal must be a bool, got str",
     lambda q, kv: jlayers.dot_product_attention(q, kv, kv, causal="yes")),
    ("scale", TypeError, "dot_product_attention: scale must be None or a finite float, got "
     "'0.5'", lambda q, kv: jlayers.dot_product_attention(q, kv, kv, scale="0.5")),
    ("batch", ValueError, r"k must have shape \(B, S, K, H\) with q's B=2",
     lambda q, kv: jlayers.dot_product_attention(q, kv[:1], kv[:1])),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, Q, KV)
