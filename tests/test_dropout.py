"""Op-specific checks for ``dropout``: rate semantics, masks, keys, traced rates, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers

KEY = jax.random.key(7)


def test_rate_zero_is_identity():
  x = jnp.arange(6.0)
  assert jlayers.dropout(x, KEY, rate=0.0) is x
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(jlayers.dropout(x, KEY, rate=0.0)))(x),
                                np.ones(6))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_rate_is_the_probability_of_dropping(rate):
  x = jnp.ones((200, 500))
  y = np.asarray(jax.jit(lambda x: jlayers.dropout(x, KEY, rate=rate))(x))
  dropped = float(np.mean(y == 0))
  assert abs(dropped - rate) < 0.01
  survivors = np.unique(y[y != 0])
  np.testing.assert_allclose(survivors, [1.0 / (1.0 - rate)], rtol=1e-6)
  assert abs(float(np.mean(y)) - 1.0) < 0.03  # inverted scaling keeps the expectation


def test_gradient_is_mask_over_keep_probability():
  x = jax.random.normal(jax.random.key(1), (50,)) + 3.0  # no zeros in x
  y, g = jax.jit(lambda x: (jlayers.dropout(x, KEY, rate=0.3), jax.grad(
      lambda x: jnp.sum(jlayers.dropout(x, KEY, rate=0.3)))(x)))(x)
  np.testing.assert_allclose(g, np.asarray(y) / np.asarray(x), rtol=1e-6)


def test_broadcast_dims_share_the_mask():
  y = jlayers.dropout(jnp.ones((2, 4, 4, 8)), KEY, rate=0.5, broadcast_dims=(1, 2))
  kept = np.asarray(y != 0)
  assert (kept == kept[:, :1, :1, :]).all()
  assert 0 < kept.mean() < 1


def test_typed_and_raw_keys_give_the_same_mask():
  x = jnp.ones(64)
  np.testing.assert_array_equal(jlayers.dropout(x, jax.random.key(3), rate=0.5),
                                jlayers.dropout(x, jax.random.PRNGKey(3), rate=0.5))


def test_one_compile_serves_every_traced_rate():
  f = jax.jit(lambda x, r: jlayers.dropout(x, KEY, rate=r))
  x = jnp.ones((100, 100))
  fractions = [float(jnp.mean(f(x, jnp.float32(r)) == 0)) for r in (0.1, 0.4, 0.7)]
  assert f._cache_size() == 1
  np.testing.assert_allclose(fractions, [0.1, 0.4, 0.7], atol=0.02)


def test_traced_rate_outside_range_gives_nan_and_rate_gets_no_gradient():
  f = jax.jit(lambda x, r: jlayers.dropout(x, KEY, rate=r))
  assert bool(jnp.all(jnp.isnan(f(jnp.ones(4), jnp.float32(1.5)))))
  assert bool(jnp.all(jnp.isnan(f(jnp.ones(4), jnp.float32(-0.5)))))
  np.testing.assert_array_equal(f(jnp.ones(4), jnp.float32(1.0)), np.zeros(4))  # all dropped
  d_rate = jax.grad(lambda r: jnp.sum(jlayers.dropout(jnp.ones(8), KEY, rate=r)))(jnp.float32(0.5))
  assert float(d_rate) == 0.0


def test_saves_a_boolean_mask_of_the_mask_shape():
  x = jnp.ones((2, 4, 4, 8))
  avals = residual_avals(lambda x: jlayers.dropout(x, KEY, rate=0.5, broadcast_dims=(1, 2)), x)
  big = [a for a in avals if a.size > 1]
  assert [(a.shape, a.dtype) for a in big] == [((2, 1, 1, 8), jnp.bool_)]


BAD = [
    ("rate above one", ValueError,
     r"dropout: rate is the probability of dropping and must be in \[0, 1\], got 1.5",
     {"rate": 1.5}, None),
    ("rate negative", ValueError, r"must be in \[0, 1\], got -0.1", {"rate": -0.1}, None),
    ("rate string", TypeError, "dropout: rate must be a float or a scalar float array, got str",
     {"rate": "0.5"}, None),
    ("rate vector", TypeError, r"dropout: rate must be a scalar float array, got float32\[2\]",
     {"rate": jnp.ones(2) * 0.5}, None),
    ("int key", TypeError, r"key must be a typed key .* got int32\[2\]", {"rate": 0.5},
     jnp.zeros(2, jnp.int32)),
    ("raw key shape", TypeError, r"raw uint32\[2\] or uint32\[4\] key .* got uint32\[3\]",
     {"rate": 0.5},
     jnp.zeros(3, jnp.uint32)),
    ("batch of keys", ValueError, r"dropout: key must be a single key, got a key array of shape \(2,\)",
     {"rate": 0.5}, jax.random.split(KEY)),
    ("broadcast int", TypeError, "dropout: broadcast_dims must be a sequence of axes, got 1",
     {"rate": 0.5, "broadcast_dims": 1}, None),
    ("broadcast dim", ValueError, "dropout: broadcast_dims=3 is out of range for an input of rank 2",
     {"rate": 0.5, "broadcast_dims": (3,)}, None),
]


@pytest.mark.parametrize("name, exc, match, kwargs, key", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, kwargs, key):
  key = KEY if key is None else key
  raises_eager_and_jit(exc, match, lambda x, k: jlayers.dropout(x, k, **kwargs),
                       jnp.ones((2, 3)), key)


def test_integer_x_is_rejected():
  raises_eager_and_jit(TypeError, "dropout: x must have a floating dtype, got int32",
                       lambda x: jlayers.dropout(x, KEY, rate=0.5), jnp.arange(4))
