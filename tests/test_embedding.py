"""Golden values, conventions (ids out of range, id dtypes, half-precision sums), residuals,
edge cases and bad input of ``embedding`` (the generic checks are in test_ops_generic.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit

import jlayers
from jlayers import testing
from jlayers.grids import GRIDS

BOTH = pytest.mark.parametrize("fn", [jlayers.embedding, jlayers.reference.embedding],
                               ids=["manual", "twin"])


def _grad(fn, ids, table, cot):
  """``∂/∂table Σ cot · fn(ids, table)``; NaN output rows are selected away where cot = 0."""
  def loss(t):
    out = fn(ids, t)
    return jnp.sum(jnp.where(cot != 0, cot * out, jnp.zeros_like(out)))
  return jax.jit(jax.grad(loss))(table)


def _lookup_vjp(fn, ids, table, cot):
  """``fn(ids, table)`` and the pullback of ``cot`` to the table, in one jitted program."""
  def run(ids, table, cot):
    out, pullback = jax.vjp(lambda t: fn(ids, t), table)
    return out, pullback(cot)[0]
  return jax.jit(run)(ids, table, cot)


@BOTH
def test_golden_values(fn):
  table = jnp.array([[1.0, -1.0], [2.0, 0.5], [3.0, 4.0], [-2.0, 7.0]])
  ids = jnp.array([[3, 0], [3, 3]])
  np.testing.assert_array_equal(fn(ids, table), [[[-2.0, 7.0], [1.0, -1.0]],
                                                 [[-2.0, 7.0], [-2.0, 7.0]]])
  cot = jnp.array([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
  # Row 3 is looked up three times: [1, 2] + [5, 6] + [7, 8]; rows 1 and 2 never: zero.
  np.testing.assert_array_equal(_grad(fn, ids, table, cot),
                                [[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [13.0, 16.0]])
  np.testing.assert_array_equal(fn(jnp.array(2), table), [3.0, 4.0])


def test_agrees_with_take_and_a_one_hot_matmul_float64():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    table = jnp.asarray(rng.standard_normal((7, 4)))
    ids = jnp.asarray(rng.integers(0, 7, (3, 5)), jnp.int32)
    cot = jnp.asarray(rng.standard_normal((3, 5, 4)))
    take = lambda t: jnp.take(t, ids, axis=0)  # noqa: E731
    one_hot = lambda t: jax.nn.one_hot(ids, 7, dtype=t.dtype) @ t  # noqa: E731

    @jax.jit
    def vjps(table, cot):  # every output and pullback in one program
      return [(f(table), jax.vjp(f, table)[1](cot)[0]) for f in (
          take, one_hot, lambda t: jlayers.embedding(ids, t),
          lambda t: jlayers.reference.embedding(ids, t))]

    (want, want_g), (_, one_hot_g), *ours = vjps(table, cot)
    np.testing.assert_allclose(one_hot_g, want_g, rtol=1e-14)
    for out, g in ours:
      np.testing.assert_array_equal(out, want)
      np.testing.assert_allclose(g, want_g, rtol=1e-14, atol=1e-15)


def _out_of_range(fn, ids, num, bad):
  """NaN rows exactly at ``bad``, ``table[ids]`` elsewhere, and a gradient made of the good
  positions' cotangent rows only."""
  table = np.arange(num * 2, dtype=np.float32).reshape(num, 2) + 1.0
  out = jax.jit(fn)(ids, table)
  want_bad = np.zeros(ids.shape, bool)
  want_bad[list(bad)] = True
  np.testing.assert_array_equal(np.isnan(np.asarray(out)).all(-1), want_bad)
  assert not np.isnan(np.asarray(out)[~want_bad]).any()
  good = np.asarray(ids)[~want_bad].astype(np.int64)
  np.testing.assert_array_equal(np.asarray(out)[~want_bad], np.asarray(table)[good])
  cot = jnp.asarray(np.where(want_bad[:, None], 0.0, 1.0) * np.ones((1, 2)), jnp.float32)
  want_g = np.zeros((num, 2), np.float32)
  np.add.at(want_g, good, 1.0)
  np.testing.assert_array_equal(_grad(fn, ids, table, cot), want_g)
  # A cotangent on the NaN rows too: still no gradient from them (autodiff drops them alike).
  g = jax.jit(jax.grad(lambda t: jnp.sum(jnp.nan_to_num(fn(ids, t)))))(table)
  np.testing.assert_array_equal(g, want_g)


@BOTH
def test_ids_out_of_range_give_nan_rows_and_no_gradient(fn):
  ids = jnp.array([-1, 0, 4, 2, 2**31 - 1, 2, -(2**31)], jnp.int32)
  _out_of_range(fn, ids, 4, bad=(0, 2, 4, 6))


@BOTH
@pytest.mark.parametrize("num, bad", [(300, ()), (200, (0, 2)), (256, ()), (255, (0,))])
def test_uint8_ids_against_tables_of_more_and_fewer_rows_than_uint8_names(fn, num, bad):
  _out_of_range(fn, jnp.array([255, 199, 200, 0, 7], jnp.uint8), num, bad)


@BOTH
def test_int8_ids_into_a_big_table_and_int64_ids_are_never_wrapped(fn):
  _out_of_range(fn, jnp.array([-1, 127, -128, 3], jnp.int8), 1000, bad=(0, 2))
  with jax.enable_x64(True):
    ids = jnp.array([2**32 + 1, 1, -(2**32) + 2, 2**62], jnp.int64)  # int32 casts: 1, 1, 2, 0
    _out_of_range(fn, ids, 4, bad=(0, 2, 3))


def test_bfloat16_repeated_ids_accumulate_in_float32_and_round_once():
  rng = np.random.default_rng(0)
  # Multiples of 1/128 in [0.5, 2): exact in bfloat16, and every partial sum of 1000 of them
  # is exact in float32, so the float32 sum does not depend on the order of the additions.
  g32 = rng.integers(64, 256, (1000, 3)) / 128.0
  g = jnp.asarray(g32, jnp.bfloat16)
  table = jnp.zeros((3, 3), jnp.bfloat16)
  ids = jnp.asarray(np.r_[np.ones(999, int), 2], jnp.int32)
  got = _lookup_vjp(jlayers.embedding, ids, table, g)[1]
  assert got.dtype == jnp.bfloat16
  want = np.stack([np.zeros(3), g32[:999].sum(0), g32[999]]).astype(np.float32)
  np.testing.assert_array_equal(got, jnp.asarray(want).astype(jnp.bfloat16))
  naive = np.zeros(3, jnp.bfloat16)  # a bfloat16 accumulator stalls at a few hundred
  for row in np.asarray(g)[:999]:
    naive = (naive + row).astype(jnp.bfloat16)
  assert np.all(np.abs(naive.astype(np.float32) - want[1]) > 10.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_outputs_are_exact_and_gradients_within_bound(dtype):
  """What the generic half-precision test measures, with the output's dtype compared to the
  table's (argument 1, not 0): the lookup is exact, and the gradient is within
  ``half_precision`` epsilons of the float64 twin."""
  grid, half = GRIDS["embedding"], jnp.dtype(dtype)
  for case in grid.representative_cases:
    rng = np.random.default_rng(6)
    ids, table = case.make(rng, half)
    cot = jnp.asarray(rng.standard_normal(ids.shape + table.shape[1:]), half)
    out, g = _lookup_vjp(jlayers.embedding, ids, table, cot)
    assert out.dtype == g.dtype == half and g.shape == table.shape
    with jax.enable_x64(True):  # widened on the host: the same values
      t64, c64 = np.asarray(table, np.float64), np.asarray(cot, np.float64)
      out64, g64 = _lookup_vjp(jlayers.reference.embedding, ids, t64, c64)
      np.testing.assert_array_equal(np.asarray(out, np.float64), out64)
      err = testing.error(g, g64).relative
    assert err <= grid.half_precision * float(jnp.finfo(half).eps), (case.id, err)


def test_only_the_ids_are_saved():
  table = jnp.ones((50, 8))
  for ids in (jnp.zeros((4, 6), jnp.int32), jnp.zeros((3,), jnp.uint8), jnp.array(1)):
    res = testing.saved_residuals(jlayers.embedding, ids, table)
    assert [(r.shape, r.dtype, why.startswith("from the argument")) for r, why in res] == [
        (ids.shape, ids.dtype, True)]


@BOTH
def test_empty_ids_and_zero_features(fn):
  for ids, table, shape in ((jnp.zeros((0, 3), jnp.int32), jnp.ones((4, 2)), (0, 3, 2)),
                            (jnp.array([1, 0, 1]), jnp.ones((4, 0)), (3, 0)),
                            (jnp.array(3), jnp.ones((4, 2)), (2,))):
    out = jax.jit(fn)(ids, table)
    assert out.shape == shape and out.dtype == table.dtype
    g = jax.jit(jax.grad(lambda t, ids=ids: jnp.sum(fn(ids, t))))(table)
    assert g.shape == table.shape and g.dtype == table.dtype
  g = jax.jit(jax.grad(lambda t: jnp.sum(fn(jnp.zeros((0,), jnp.int32), t))))(
      np.ones((4, 2), np.float32))
  np.testing.assert_array_equal(g, np.zeros((4, 2)))


def test_vmap_over_the_ids():
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(-1, 7, (4, 5)), jnp.int32)
  cot = jnp.asarray(rng.standard_normal((4, 5, 3)), jnp.float32)
  grads = [jax.vmap(lambda i, c, fn=fn: _grad(fn, i, table, c))(ids, cot)
           for fn in (jlayers.embedding, jlayers.reference.embedding)]
  for k in range(4):
    want = _grad(jlayers.reference.embedding, ids[k], table, cot[k])
    for g in grads:
      np.testing.assert_allclose(g[k], want, rtol=1e-6, atol=1e-6)


BAD = [
    ("float ids", TypeError, "embedding: ids must have an integer dtype, got float32",
     lambda i, t: (i.astype(jnp.float32), t)),
    ("bool ids", TypeError, "embedding: ids must have an integer dtype, got bool",
     lambda i, t: (i > 0, t)),
    ("complex ids", TypeError, "embedding: ids must have an integer dtype, got complex64",
     lambda i, t: (i.astype(jnp.complex64), t)),
    ("rank-1 table", ValueError, "embedding: table must have rank 2 (num_embeddings, "
     "features), got shape (4,)", lambda i, t: (i, t[:, 0])),
    ("rank-3 table", ValueError, "embedding: table must have rank 2 (num_embeddings, "
     "features), got shape (4, 3, 1)", lambda i, t: (i, t[..., None])),
    ("integer table", TypeError, "embedding: table must have a floating dtype, got int32",
     lambda i, t: (i, t.astype(jnp.int32))),
    ("complex table", TypeError, "embedding: table must have a floating dtype, got complex64",
     lambda i, t: (i, t.astype(jnp.complex64))),
    ("empty table", ValueError, "embedding: table must have at least one row "
     "(num_embeddings >= 1), got shape (0, 3)", lambda i, t: (i, t[:0])),
]


@BOTH
@pytest.mark.parametrize("name, exc, message, make", BAD, ids=[b[0] for b in BAD])
def test_bad_input(fn, name, exc, message, make):
  ids, table = make(jnp.array([0, 1, 2]), jnp.ones((4, 3)))
  raises_eager_and_jit(exc, f"^{re.escape(message)}", fn, ids, table)
  with pytest.raises(exc) as info:
    fn(ids, table)
  assert str(info.value) == message  # one string, nothing appended


@BOTH
def test_python_lists_are_refused(fn):
  raises_eager_and_jit(TypeError, "^embedding: table must be an array, got list", fn,
                       jnp.array([0]), [[1.0, 2.0]])
  raises_eager_and_jit(TypeError, "^embedding: ids must be an array, got list", fn,
                       [0, 1], jnp.ones((2, 2)))
