"""Golden values, conventions, residuals and bad input of ``softmax`` and ``log_softmax`` (the
generic checks are in test_ops_generic.py; masked log-softmax, whose ``-inf`` outputs the
generic comparison cannot take, is checked against its twin here)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit
from jax.test_util import check_grads

import jlayers
from jlayers.testing import saved_residuals

SOFTMAX = pytest.mark.parametrize("fn", [jlayers.softmax, jlayers.reference.softmax],
                                  ids=["manual", "twin"])
LOG_SOFTMAX = pytest.mark.parametrize(
    "fn", [jlayers.log_softmax, jlayers.reference.log_softmax], ids=["manual", "twin"])
BOTH = pytest.mark.parametrize(
    "fn", [jlayers.softmax, jlayers.reference.softmax, jlayers.log_softmax,
           jlayers.reference.log_softmax],
    ids=["softmax-manual", "softmax-twin", "log_softmax-manual", "log_softmax-twin"])
MANUAL = pytest.mark.parametrize("fn", [jlayers.softmax, jlayers.log_softmax],
                                 ids=["softmax", "log_softmax"])

# Row 0: probabilities 1/6, 2/6, 3/6 and a masked 7; row 1: fully masked.
X = [[0.0, math.log(2.0), math.log(3.0), 7.0], [1.0, 2.0, 3.0, 4.0]]
W = np.array([[True, True, True, False], [False] * 4])
P = [1 / 6, 2 / 6, 3 / 6]


def _vjp(fn, x, cot, **kwargs):
  """``fn``'s output and VJP at ``x``, jitted (one compile rather than one per operation)."""
  def run(x, cot):
    y, pullback = jax.vjp(lambda x: fn(x, **kwargs), x)
    return y, pullback(cot)[0]
  return jax.jit(run)(x, cot)


def _is_log(fn):
  return fn in (jlayers.log_softmax, jlayers.reference.log_softmax)


def _finite_close(a, b, rtol):
  """Equal infinities, and finite entries within ``rtol`` of the largest finite one."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
  np.testing.assert_array_equal(a[~np.isfinite(b)], b[~np.isfinite(b)])
  fin = np.isfinite(b)
  assert np.max(np.abs(a[fin] - b[fin])) <= rtol * np.max(np.abs(b[fin]))


# --- golden values -----------------------------------------------------------------------------

@SOFTMAX
def test_softmax_golden_values_and_gradients(fn):
  # softmax([0, log 2, log 3]) = [1, 2, 3] / 6; J = diag(p) - p pᵀ, so for g = [1, 2, 3]:
  # p·g = 14/6 and dx = p ∘ (g - 7/3) = [-2/9, -1/9, 1/3].
  with jax.enable_x64(True):
    x = jnp.array(X[0][:3], jnp.float64)
    y, dx = _vjp(fn, x, jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(y, P, rtol=1e-15)
    np.testing.assert_allclose(dx, [-2 / 9, -1 / 9, 1 / 3], rtol=1e-14)
    p = np.array(P)
    np.testing.assert_allclose(jax.jacrev(fn)(x), np.diag(p) - np.outer(p, p), atol=1e-16)
    # the masked entry gets 0 and no gradient, the fully masked row 0 everywhere
    y, dx = _vjp(fn, jnp.array(X, jnp.float64),
                 jnp.array([[1.0, 2.0, 3.0, 100.0], [1.0, 2.0, 3.0, 4.0]]), where=W)
  y, dx = np.asarray(y), np.asarray(dx)
  np.testing.assert_allclose(y, [P + [0.0], [0.0] * 4], rtol=1e-15)
  np.testing.assert_allclose(dx, [[-2 / 9, -1 / 9, 1 / 3, 0.0], [0.0] * 4], rtol=1e-14)
  assert y[0, 3] == 0.0 and not np.any(np.isnan(dx))


@LOG_SOFTMAX
def test_log_softmax_golden_values_and_gradients(fn):
  # log_softmax = log p; J = I - 1 pᵀ, so for g = [1, 0, 0]: dx = g - p Σg = [5/6, -1/3, -1/2].
  with jax.enable_x64(True):
    x = jnp.array(X[0][:3], jnp.float64)
    y, dx = _vjp(fn, x, jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(y, np.log(P), rtol=1e-15)
    np.testing.assert_allclose(dx, [5 / 6, -1 / 3, -1 / 2], rtol=1e-14)
    np.testing.assert_allclose(jax.jacrev(fn)(x), np.eye(3) - np.outer(np.ones(3), P),
                               atol=1e-15)
    # the masked entry is -inf and its cotangent (100) is left out; the masked row all -inf
    y, dx = _vjp(fn, jnp.array(X, jnp.float64),
                 jnp.array([[1.0, 0.0, 0.0, 100.0], [1.0, 2.0, 3.0, 4.0]]), where=W)
  y, dx = np.asarray(y), np.asarray(dx)
  np.testing.assert_allclose(y[0, :3], np.log(P), rtol=1e-15)
  assert y[0, 3] == -np.inf and np.all(y[1] == -np.inf)
  np.testing.assert_allclose(dx, [[5 / 6, -1 / 3, -1 / 2, 0.0], [0.0] * 4], rtol=1e-14)


# --- agreement with jax.nn ---------------------------------------------------------------------

@pytest.mark.parametrize("axis", [-1, (0, 2)], ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "where"])
@MANUAL
def test_agrees_with_jax_nn_in_float64(fn, axis, masked):
  """Values and VJPs; with a mask that leaves every row (along ``axis``) an unmasked entry."""
  rng = np.random.default_rng(0)
  theirs = jax.nn.log_softmax if _is_log(fn) else jax.nn.softmax
  where = (np.arange(60).reshape(3, 4, 5) % 7 != 3) if masked else None
  with jax.enable_x64(True):
    x = jnp.asarray(3.0 * rng.standard_normal((3, 4, 5)))
    cot = jnp.asarray(rng.standard_normal((3, 4, 5)))
    y, dx = _vjp(fn, x, cot, axis=axis, where=where)
    y_nn, dx_nn = _vjp(theirs, x, cot, axis=axis, where=where)
  _finite_close(y, y_nn, 1e-14)
  np.testing.assert_allclose(dx, dx_nn, rtol=1e-12, atol=1e-14)


# --- conventions -------------------------------------------------------------------------------

@BOTH
def test_fully_masked_rows_and_masked_entries_under_jit(fn):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
  where = np.arange(24).reshape(2, 3, 4) % 3 != 0
  where[1, 2] = False
  cot = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
  y, dx = jax.jit(lambda x, c: _vjp(fn, x, c, where=where))(x, cot)
  np.testing.assert_array_equal(y[~where], -np.inf if _is_log(fn) else 0.0)
  np.testing.assert_array_equal(dx[~where], 0.0)
  assert np.all(np.isfinite(y[where])) and np.all(np.isfinite(dx))


@BOTH
def test_nan_and_inf_in_masked_entries_do_not_leak(fn):
  where = np.array([[True, False, True, False, True], [False] * 5])
  clean = np.array([[0.5, 0.0, -1.0, 0.0, 2.0], [0.0] * 5], np.float32)
  dirty = clean.copy()
  dirty[0, 1], dirty[0, 3] = np.nan, np.inf
  dirty[1] = [np.nan, np.inf, -np.inf, 1.0, np.nan]
  cot = np.arange(1.0, 11.0, dtype=np.float32).reshape(2, 5)
  y, dx = _vjp(fn, dirty, cot, where=where)
  y_clean, dx_clean = _vjp(fn, clean, cot, where=where)
  np.testing.assert_array_equal(y, y_clean)
  np.testing.assert_array_equal(dx, dx_clean)
  assert np.all(np.isfinite(dx)) and np.all(dx[~where] == 0.0)
  hess = jax.jit(jax.hessian(
      lambda x: jnp.sum(jnp.where(where, fn(x, where=where), 0.0) * cot)))(dirty)
  assert np.all(np.isfinite(hess))


@BOTH
def test_logits_of_1e4_are_finite_and_accurate_in_float32(fn):
  rows = [[1e4, 1e4 - 1.0, 1e4 - 2.0, -1e4], [-1e4, -1e4 + 1.0, -1e4 + 2.0, 1e4 - 1e4]]
  y, dx = _vjp(fn, jnp.array(rows, jnp.float32), jnp.ones((2, 4), jnp.float32).at[:, 0].set(2.0))
  with jax.enable_x64(True):
    y64, dx64 = _vjp(fn, jnp.array(rows, jnp.float64),
                     jnp.ones((2, 4), jnp.float64).at[:, 0].set(2.0))
  assert np.all(np.isfinite(y)) and np.all(np.isfinite(dx))
  np.testing.assert_allclose(y, y64, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(dx, dx64, rtol=1e-6, atol=1e-7)
  if _is_log(fn):  # -log(1 + e^-1 + e^-2) for the top logit, to float32's resolution
    assert abs(float(y[0, 0]) + math.log(1 + math.exp(-1) + math.exp(-2))) < 1e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@MANUAL
def test_half_precision_is_computed_in_float32_and_rounded_once(fn, dtype):
  where = np.arange(24).reshape(4, 6) % 5 != 0
  x = jnp.linspace(-6.0, 6.0, 24, dtype=dtype).reshape(4, 6)
  for kwargs in ({}, {"where": where}, {"axis": 0}):
    np.testing.assert_array_equal(fn(x, **kwargs),
                                  fn(x.astype(jnp.float32), **kwargs).astype(dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
@MANUAL
def test_output_and_gradient_dtypes_are_the_inputs(fn, dtype):
  with jax.enable_x64(True):
    x = jnp.linspace(-2.0, 2.0, 12, dtype=dtype).reshape(3, 4)
    y, dx = _vjp(fn, x, jnp.ones((3, 4), dtype), where=np.eye(3, 4, dtype=bool))
  assert y.dtype == dx.dtype == x.dtype and dx.shape == x.shape


@BOTH
def test_axes_are_normalised_and_where_broadcasts_explicitly(fn):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 4, 5)), jnp.float32)
  np.testing.assert_array_equal(fn(x, axis=(3, 1)), fn(x, axis=(-3, -1)))
  np.testing.assert_array_equal(fn(x), fn(x, axis=3))
  where = np.random.default_rng(3).random((2, 1, 4, 5)) > 0.3
  full = np.broadcast_to(where, x.shape)
  cot = jnp.ones(x.shape, jnp.float32).at[:, :, :, 0].set(3.0)
  for a, b in zip(_vjp(fn, x, cot, where=where), _vjp(fn, x, cot, where=full)):
    np.testing.assert_array_equal(a, b)


# --- masked log-softmax against its twin: hessian and check_grads on the finite entries ---------

@pytest.mark.parametrize("axis, shape", [((0, 2), (3, 2, 5))], ids=str)
def test_masked_log_softmax_matches_its_twin_to_second_order(axis, shape):
  where = np.arange(30).reshape(shape) % 3 != 1
  where[:, 1] = False  # fully masked rows for both reductions
  manual = lambda x: jlayers.log_softmax(x, axis=axis, where=where)  # noqa: E731
  twin = lambda x: jlayers.reference.log_softmax(x, axis=axis, where=where)  # noqa: E731
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    x = jnp.asarray(2.0 * rng.standard_normal(shape))
    cot = jnp.asarray(rng.standard_normal(shape))
    (y, dx), (y_t, dx_t) = _vjp(manual, x, cot), _vjp(twin, x, cot)
    _finite_close(y, y_t, 1e-15)
    np.testing.assert_allclose(dx, dx_t, rtol=1e-13, atol=1e-15)
    xs = jnp.stack([x, x + 0.5 * cot])
    batched = jax.jit(jax.vmap(lambda x: _vjp(manual, x, cot)[1]))(xs)
    np.testing.assert_allclose(batched[1], _vjp(twin, xs[1], cot)[1], rtol=1e-13, atol=1e-15)
    finite = lambda f: lambda x: jnp.where(where, f(x), 0.0)  # noqa: E731
    hess = lambda f: jax.jit(jax.hessian(lambda x: jnp.sum(finite(f)(x) * cot)))(x)  # noqa: E731
    np.testing.assert_allclose(hess(manual), hess(twin), rtol=1e-12, atol=1e-13)
    check_grads(jax.jit(finite(manual)), (x,), order=2, modes=("rev",), atol=1e-6, rtol=1e-6)


# --- what is saved -----------------------------------------------------------------------------

def _residuals(fn, x):
  return [(r.shape, r.dtype, why.startswith("from the argument")) for r, why in
          saved_residuals(fn, x)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_saves_its_output_only(dtype):
  x = jnp.ones((2, 3, 4), dtype)
  where = np.ones((2, 1, 4), bool)
  for f in (jlayers.softmax, lambda x: jlayers.softmax(x, axis=(0, 2), where=where)):
    assert _residuals(f, x) == [((2, 3, 4), jnp.dtype(dtype), False)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_log_softmax_saves_its_output_and_the_mask(dtype):
  x = jnp.ones((2, 3, 4), dtype)
  assert _residuals(jlayers.log_softmax, x) == [((2, 3, 4), jnp.dtype(dtype), False)]
  where = jnp.ones((2, 1, 4), bool)
  got = saved_residuals(lambda x, w: jlayers.log_softmax(x, where=w), x, where)
  assert sorted((r.shape, r.dtype.name, why.startswith("from the argument w"))
                for r, why in got) == [((2, 1, 4), "bool", True), ((2, 3, 4), dtype, False)]


# --- bad input ---------------------------------------------------------------------------------

def _bad(op):
  fn = getattr(jlayers, op)
  return [
      (f"{op} int x", TypeError, f"{op}: x must have a floating dtype, got int32",
       lambda x: fn(x.astype(jnp.int32))),
      (f"{op} bool x", TypeError, f"{op}: x must have a floating dtype, got bool",
       lambda x: fn(x > 0)),
      (f"{op} rank 0", ValueError, f"{op}: x must have rank at least 1, got shape ()",
       lambda x: fn(x[0, 0])),
      (f"{op} axis str", TypeError, f"{op}: axis must be an int or a tuple of ints, got '1'",
       lambda x: fn(x, axis="1")),
      (f"{op} axis dict", TypeError,
       f"{op}: axis must be an int or a tuple of ints, got {{0: 1}}", lambda x: fn(x, axis={0: 1})),
      (f"{op} axis float in tuple", TypeError,
       f"{op}: axis must be an int or a tuple of ints, got (0, 1.0)",
       lambda x: fn(x, axis=(0, 1.0))),
      (f"{op} axis out of range", ValueError,
       f"{op}: axis=2 is out of range for an input of rank 2", lambda x: fn(x, axis=2)),
      (f"{op} axis out of range in tuple", ValueError,
       f"{op}: axis=-3 is out of range for an input of rank 2", lambda x: fn(x, axis=(0, -3))),
      (f"{op} repeated axis", ValueError,
       f"{op}: axis must not repeat an axis, got (1, -1) for an input of rank 2",
       lambda x: fn(x, axis=(1, -1))),
      (f"{op} no axis", ValueError, f"{op}: axis must name at least one axis, got ()",
       lambda x: fn(x, axis=())),
      (f"{op} float where", TypeError, f"{op}: where must have dtype bool, got float32",
       lambda x: fn(x, where=jnp.ones((2, 3)))),
      (f"{op} where shape", ValueError,
       f"{op}: where must have the rank of x and each dimension 1 or equal to x's, for x of "
       "shape (2, 3); got shape (2, 4)", lambda x: fn(x, where=np.ones((2, 4), bool))),
      (f"{op} where of lower rank", ValueError,
       f"{op}: where must have the rank of x and each dimension 1 or equal to x's, for x of "
       "shape (2, 3); got shape (3,)", lambda x: fn(x, where=np.ones(3, bool))),
      (f"{op} where list", TypeError, f"{op}: where must be an array, got list",
       lambda x: fn(x, where=[True, False, True])),
  ]


BAD = _bad("softmax") + _bad("log_softmax")


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, "^" + re.escape(match), fn, jnp.ones((2, 3)))


@pytest.mark.parametrize("fn", [jlayers.softmax, jlayers.reference.log_softmax],
                         ids=["softmax", "log_softmax-twin"])
def test_a_python_list_is_refused(fn):
  op = "log_softmax" if fn is jlayers.reference.log_softmax else "softmax"
  raises_eager_and_jit(TypeError, f"^{op}: x must be an array, got list", fn, [1.0, 2.0])
