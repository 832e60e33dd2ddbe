"""The transformer layers: LayerNorm, RMSNorm, GroupNorm, Embedding (with attend) and
MultiHeadAttention — params, the ops they call, dtypes, impl, errors. (Whole transformers'
manual gradients against autodiff in float64: the README's example and the character model's
tests.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlayers
from jlayers import layers as L


def _x(shape, seed=0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.mark.parametrize("layer, op, shape, pshape", [
    (L.LayerNorm(), lambda x, p: jlayers.layer_norm(x, p["scale"], p["offset"]), (2, 3, 8),
     (8,)),
    (L.LayerNorm(axis=(1, 2), eps=1e-3), lambda x, p: jlayers.layer_norm(
        x, p["scale"], p["offset"], axis=(1, 2), eps=1e-3), (2, 3, 8), (3, 8)),
    (L.RMSNorm(), lambda x, p: jlayers.rms_norm(x, p["scale"]), (2, 3, 8), (8,)),
    (L.GroupNorm(4), lambda x, p: jlayers.group_norm(x, p["scale"], p["offset"], groups=4),
     (2, 3, 3, 8), (8,)),
], ids=["layer_norm", "layer_norm_axes", "rms_norm", "group_norm"])
def test_norm_layers_init_and_apply_the_op(layer, op, shape, pshape):
  params, state = layer.init(jax.random.key(0), shape)
  assert state == {} and {k: v.shape for k, v in params.items()} == dict.fromkeys(params, pshape)
  np.testing.assert_array_equal(params["scale"], 1.0)
  params = jax.tree_util.tree_map(lambda p: p + 0.5, params)
  x = _x(shape)
  for impl in ("manual", "autodiff"):
    y, new_state = layer.apply(params, state, x, impl=impl)
    np.testing.assert_allclose(y, op(x, params), rtol=1e-6, atol=1e-6)
    assert new_state == {}


def test_norm_layers_without_params_and_in_bfloat16():
  assert L.LayerNorm(use_scale=False, use_offset=False).init(jax.random.key(0), (2, 4))[0] == {}
  assert set(L.GroupNorm(2, use_offset=False).init(jax.random.key(0), (2, 4))[0]) == {"scale"}
  layer = L.LayerNorm(dtype=jnp.bfloat16)
  params, _ = layer.init(jax.random.key(0), (2, 4))
  assert params["scale"].dtype == jnp.float32
  x = _x((2, 4))
  y, _ = layer.apply(params, {}, x)
  assert y.dtype == jnp.bfloat16
  g = jax.grad(lambda p: jnp.sum(layer.apply(p, {}, x)[0].astype(jnp.float32) * x))(params)
  assert g["scale"].dtype == jnp.float32


@pytest.mark.parametrize("make, match, exc", [
    (lambda: L.LayerNorm(axis="last"), "LayerNorm: axis must be an int or a non-empty tuple of "
     "ints, got 'last'", TypeError),
    (lambda: L.RMSNorm(eps=0.0), r"RMSNorm: eps must be in \(0.0, inf\), got 0.0", ValueError),
    (lambda: L.GroupNorm(0), "GroupNorm: groups must be positive, got 0", ValueError),
    (lambda: L.GroupNorm(3).init(jax.random.key(0), (2, 4)),
     r"GroupNorm: groups=3 must divide the 4 channels of input_shape \(2, 4\)", ValueError),
    (lambda: L.LayerNorm(use_scale=1), "LayerNorm: use_scale must be a bool, got int",
     TypeError),
    (lambda: L.Embedding(0, 4), "Embedding: num_embeddings must be positive, got 0", ValueError),
    (lambda: L.MultiHeadAttention(4, num_kv_heads=3), "MultiHeadAttention: num_kv_heads=3 must "
     "divide num_heads=4", ValueError),
    (lambda: L.MultiHeadAttention(3).init(jax.random.key(0), (2, 5, 8)),
     "MultiHeadAttention: num_heads=3 must divide qkv_features=8", ValueError),
    (lambda: L.MultiHeadAttention(2).init(jax.random.key(0), (5, 8)),
     r"MultiHeadAttention: input_shape must have rank 3, got \(5, 8\)", ValueError),
    (lambda: L.MultiHeadAttention(2, causal="yes"), "MultiHeadAttention: causal must be a bool, "
     "got str", TypeError),
])
def test_layer_configuration_errors(make, match, exc):
  with pytest.raises(exc, match=match):
    make()


def test_embedding_apply_attend_and_tied_gradients():
  layer = L.Embedding(6, 4)
  params, state = layer.init(jax.random.key(0), (2, 3))
  table = params["embedding"]
  assert table.shape == (6, 4) and table.dtype == jnp.float32 and state == {}
  ids = jnp.array([[0, 5, 5], [2, 1, 0]])
  h, _ = layer.apply(params, state, ids)
  np.testing.assert_array_equal(h, table[ids])
  logits = layer.attend(params, h)
  np.testing.assert_allclose(logits, h @ table.T, rtol=1e-6)

  def loss(params, impl):
    h, _ = layer.apply(params, {}, ids, impl=impl)
    return jnp.sum(layer.attend(params, jnp.tanh(h), impl=impl) * jnp.arange(6.0).reshape(1, 1,
                                                                                         6))

  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    manual, auto = (jax.grad(loss)(p64, impl)["embedding"] for impl in ("manual", "autodiff"))
  np.testing.assert_allclose(manual, auto, rtol=1e-13, atol=1e-14)
  assert np.abs(np.asarray(manual)[3]).max() > 0  # row 3 is only an output: attend reaches it


def test_embedding_casts_the_looked_up_rows_and_starts_a_sequential():
  layer = L.Embedding(5, 3, dtype=jnp.bfloat16)
  model = jlayers.Sequential([layer, L.LayerNorm(), L.Linear(2)])
  params, _ = model.init(jax.random.key(0), (2, 4), input_dtype=jnp.int32)
  assert params["embedding_0"]["embedding"].dtype == jnp.float32
  y, _ = model.apply(params, {}, jnp.zeros((2, 4), jnp.int32))
  assert y.shape == (2, 4, 2) and y.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match=r"Embedding.attend: x must have shape \(..., 3\)"):
    layer.attend(params["embedding_0"], jnp.ones((2, 4)))


def _attention_by_hand(params, x, kv, heads, kv_heads, **kwargs):
  """The same projections and jax.nn.dot_product_attention: an independent composition."""
  def proj(name, a):
    return a @ params[name]["kernel"] + params[name]["bias"].reshape(1, 1, -1)
  b, t, _ = x.shape
  q = proj("query", x).reshape(b, t, heads, -1)
  k = proj("key", kv).reshape(b, kv.shape[1], kv_heads, -1)
  v = proj("value", kv).reshape(b, kv.shape[1], kv_heads, -1)
  with jax.numpy_dtype_promotion("standard"):
    o = jax.nn.dot_product_attention(q, k, v, **kwargs)
  return proj("out", o.reshape(b, t, -1))


@pytest.mark.parametrize("kv_heads, causal", [(None, False), (2, True), (1, True)])
def test_multi_head_attention_equals_its_composition(kv_heads, causal):
  layer = L.MultiHeadAttention(4, num_kv_heads=kv_heads, causal=causal, qkv_features=16,
                               out_features=6)
  params, _ = layer.init(jax.random.key(0), (2, 5, 8))
  k_heads = kv_heads or 4
  assert {n: p["kernel"].shape for n, p in params.items()} == {
      "query": (8, 16), "key": (8, 4 * k_heads), "value": (8, 4 * k_heads), "out": (16, 6)}
  params = jax.tree_util.tree_map(lambda p: p + 0.1, params)  # non-zero biases
  x = _x((2, 5, 8))
  want = _attention_by_hand(params, x, x, 4, k_heads, is_causal=causal)
  for impl in ("manual", "autodiff"):
    y = jax.jit(lambda p, x, impl=impl: layer.apply(p, {}, x, impl=impl)[0])(params, x)
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


def test_cross_attention_with_a_mask():
  layer = L.MultiHeadAttention(2, kv_features=3, use_bias=False)
  params, _ = layer.init(jax.random.key(0), (2, 4, 6))
  assert "bias" not in params["query"] and params["key"]["kernel"].shape == (3, 6)
  x, kv = _x((2, 4, 6)), _x((2, 7, 3), 1)
  mask = jnp.arange(7).reshape(1, 1, 1, 7) < jnp.array([5, 7]).reshape(2, 1, 1, 1)
  y = jax.jit(lambda p, x, kv: layer.apply(p, {}, x, inputs_kv=kv, mask=mask)[0])(params, x, kv)
  zero_bias = jax.tree_util.tree_map(lambda k: {"kernel": k, "bias": jnp.zeros(k.shape[1])},
                                     {n: p["kernel"] for n, p in params.items()})
  want = _attention_by_hand(zero_bias, x, kv, 2, 2, mask=mask)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match=r"inputs_kv must have 3 features \(as at init\)"):
    layer.apply(params, {}, x, inputs_kv=x)


def test_attention_with_qk_norm_rotary_sinks_window_and_split_biases():
  """Every new option of MultiHeadAttention at once, against its composition written here
  from the equations (plain jnp: RMS norm of each head, rotate-half rotary embedding, softmax
  with the sink in the denominator and the window as a mask), and manual gradients against
  autodiff in float64."""
  mha = L.MultiHeadAttention(4, num_kv_heads=2, causal=True, qkv_bias=True, out_bias=False,
                             use_bias=False, rotary_base=100.0, qk_norm=True,
                             qk_norm_scale_offset=1.0, sinks=True, local_window_size=(2, 0),
                             logits_soft_cap=3.0, scale=0.4, param_dtype=jnp.float64)
  with (jax.enable_x64(True), jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard")):
    x = _x((2, 6, 8), dtype=jnp.float64)
    params, _ = mha.init(jax.random.key(0), x.shape)
    assert sorted(params) == ["key", "key_norm", "out", "query", "query_norm", "sinks",
                              "value"]
    assert "bias" in params["query"] and "bias" not in params["out"]
    np.testing.assert_array_equal(params["query_norm"]["scale"], 0.0)  # applied as 1 + w
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * _x(p.shape, 3, jnp.float64), params)
    pos = jnp.array([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]])

    def plain(params):
      def proj(name, heads):
        p = params[name]
        return (x @ p["kernel"] + p.get("bias", 0)).reshape(2, 6, heads, 2)

      def norm(a, w):
        return a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6) * (1 + w)

      def rope(a):
        theta = pos[:, :, None, None] * 100.0 ** -(jnp.arange(1) / 1)  # one pair: (0, 1)
        c, s = jnp.cos(theta), jnp.sin(theta)
        return jnp.concatenate([a[..., :1] * c - a[..., 1:] * s,
                                a[..., 1:] * c + a[..., :1] * s], -1)

      q = rope(norm(proj("query", 4), params["query_norm"]["scale"]))
      k = jnp.repeat(rope(norm(proj("key", 2), params["key_norm"]["scale"])), 2, axis=2)
      v = jnp.repeat(proj("value", 2), 2, axis=2)
      z = 3.0 * jnp.tanh(jnp.einsum("btnh,bsnh->bnts", q, k) * 0.4 / 3.0)
      i, j = jnp.arange(6)[:, None], jnp.arange(6)[None, :]
      e = jnp.where((j <= i) & (j >= i - 2), jnp.exp(z), 0.0)
      p = e / (e.sum(-1, keepdims=True) + jnp.exp(params["sinks"])[None, :, None, None])
      o = jnp.einsum("bnts,bsnh->btnh", p, v).reshape(2, 6, 8)
      return o @ params["out"]["kernel"]

    def ours(params, impl):
      return mha.apply(params, {}, x, positions=pos, impl=impl)[0]

    np.testing.assert_allclose(ours(params, "manual"), plain(params), rtol=1e-12, atol=1e-13)
    loss = lambda p, impl: jnp.sum(jnp.sin(ours(p, impl)))  # noqa: E731
    assert jlayers.max_grad_difference(lambda p, impl: loss(p, impl), params) <= 1e-12
    grads = jax.grad(lambda p: jnp.sum(jnp.sin(plain(p))))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(jax.grad(loss)(params, "manual")):
      want = functools.reduce(lambda t, k: t[k.key], path, grads)
      np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12)


def test_attention_refuses_positions_without_rotary_and_rotary_options_without_base():
  mha = L.MultiHeadAttention(2)
  params, _ = mha.init(jax.random.key(0), (1, 3, 4))
  with pytest.raises(ValueError, match="positions were given, but the layer has no rotary"):
    mha.apply(params, {}, jnp.ones((1, 3, 4)), positions=jnp.arange(3))
  with pytest.raises(ValueError, match="rotary_dim and rotary_frequencies need rotary_base"):
    L.MultiHeadAttention(2, rotary_dim=2)
  with pytest.raises(ValueError, match="logits_soft_cap must be a positive float"):
    L.MultiHeadAttention(2, logits_soft_cap=-1.0)
