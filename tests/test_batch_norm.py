"""Op-specific checks for batch norm: the diagonal-only slip, edge cases, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit

import jlayers
from jlayers import testing


def _inputs(shape=(6, 3), seed=0):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  return (jnp.asarray(rng.normal(1.0, 2.0, shape)), jnp.asarray(rng.normal(1.0, 0.5, c)),
          jnp.asarray(rng.normal(0.0, 1.0, c)))


def _diagonal_only(x, gamma, g, eps):
  """A common slip, the diagonal-only rule: ∂L/∂x_i = g_i ∂y_i/∂x_i, i.e. only the diagonal of
  the Jacobian, γ·inv·(1 − 1/N − x̂_i²/N)."""
  n = x.shape[0]
  mu = x.mean(0, keepdims=True)
  inv = 1 / jnp.sqrt(((x - mu) ** 2).mean(0, keepdims=True) + eps)
  xhat = (x - mu) * inv
  return g * gamma[None] * inv * (1 - 1 / n - xhat**2 / n)


def test_diagonal_only_backward_disagrees_and_closed_form_agrees():
  with jax.enable_x64(True):
    x, gamma, beta = _inputs()
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape))
    autodiff, manual, diag = map(np.asarray, jax.jit(lambda x, gamma, beta, g: (  # one program
        jax.vjp(lambda x: jlayers.reference.batch_norm(x, gamma, beta)[0], x)[1](g)[0],
        jax.vjp(lambda x: jlayers.batch_norm(x, gamma, beta)[0], x)[1](g)[0],
        _diagonal_only(x, gamma, g, 1e-5)))(x, gamma, beta, g))
    scale = float(np.max(np.abs(autodiff)))
    assert float(np.max(np.abs(manual - autodiff))) / scale < 1e-12
    assert float(np.max(np.abs(diag - autodiff))) / scale > 0.1


def test_gradient_matches_central_finite_differences():
  with jax.enable_x64(True):
    x, gamma, beta = _inputs((5, 2))
    w = jnp.asarray(np.random.default_rng(2).normal(size=x.shape))

    def loss(x):
      y, mean, var = jlayers.batch_norm(x, gamma, beta)
      return jnp.sum(w * y) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))

    grad = np.asarray(jax.jit(jax.grad(loss))(x))
    h, at = 1e-6, jax.jit(loss)  # one program, evaluated at every shifted point
    for idx in np.ndindex(*x.shape):
      e = np.zeros(x.shape)
      e[idx] = h
      fd = (at(np.asarray(x) + e) - at(np.asarray(x) - e)) / (2 * h)
      assert abs(float(fd) - grad[idx]) < 1e-7


def test_hand_values():
  # x = [0, 1, 2] for one feature: μ = 1, σ² = 2/3, x̂ = [-1, 0, 1]·√(3/2) (eps → 0).
  x = jnp.array([[0.0], [1.0], [2.0]])
  y, mean, var = jax.jit(lambda x: jlayers.batch_norm(x, jnp.array([2.0]), jnp.array([0.5]),
                                                      eps=1e-12))(x)
  np.testing.assert_allclose(mean, [1.0])
  np.testing.assert_allclose(var, [2 / 3], rtol=1e-6)
  np.testing.assert_allclose(y[:, 0], 2 * np.sqrt(1.5) * np.array([-1.0, 0.0, 1.0]) + 0.5,
                             rtol=1e-6)
  # L = Σ y: dβ = 3, dγ = Σ x̂ = 0, so dx = γ·inv/N·(N·1 − 3 − 0) = 0.
  dx = jax.jit(jax.grad(
      lambda x: jnp.sum(jlayers.batch_norm(x, jnp.array([2.0]), jnp.array([0.5]))[0])))(x)
  np.testing.assert_allclose(dx, np.zeros((3, 1)), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_constant_input_gives_finite_output_and_gradients(dtype):
  x = np.full((4, 3, 3, 2), 7.0, dtype)
  scale, offset = np.ones(2, dtype), np.full((2,), 0.25, dtype)
  (y, mean, var), grads = jax.jit(lambda x, scale, offset: (
      jlayers.batch_norm(x, scale, offset),
      jax.grad(lambda x, s, o: jnp.sum(jlayers.batch_norm(x, s, o)[0].astype(jnp.float32)),
               argnums=(0, 1, 2))(x, scale, offset)))(x, scale, offset)
  np.testing.assert_array_equal(np.asarray(var), 0.0)
  np.testing.assert_allclose(np.asarray(y, np.float32), 0.25)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_variance_is_accurate_and_nonnegative_for_a_large_mean():
  # E[x²] − E[x]² in float32 cancels catastrophically at mean 1e4; the two-pass form does not.
  rng = np.random.default_rng(3)
  x64 = 1e4 + 1e-2 * rng.standard_normal((256, 4))
  _, _, var = jax.jit(jlayers.batch_norm)(jnp.asarray(x64, jnp.float32), jnp.ones(4),
                                          jnp.zeros(4))
  assert np.all(np.asarray(var) >= 0)
  np.testing.assert_allclose(var, x64.astype(np.float32).astype(np.float64).var(0), rtol=2e-2)


def test_half_precision_input_uses_float32_statistics():
  rng = np.random.default_rng(4)
  x = rng.normal(3.0, 2.0, (64, 5))
  xb = jnp.asarray(x, jnp.bfloat16)
  y, mean, var = jax.jit(jlayers.batch_norm)(xb, jnp.ones(5, jnp.bfloat16),
                                             jnp.zeros(5, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and mean.dtype == jnp.float32 and var.dtype == jnp.float32
  exact = np.asarray(xb, np.float64)
  np.testing.assert_allclose(mean, exact.mean(0), rtol=1e-5)
  np.testing.assert_allclose(var, exact.var(0), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_saves_x_itself_and_per_feature_vectors_only(dtype):
  """Nothing of x's size but x (an argument): x̂ is recomputed in the backward pass."""
  x, scale, offset = jnp.ones((8, 4, 4, 3), dtype), jnp.ones(3), jnp.zeros(3)
  for fn, args in ((jlayers.batch_norm, (x, scale, offset)),
                   (jlayers.batch_norm_inference, (x, scale, offset, scale, scale))):
    saved = testing.saved_residuals(lambda *a: fn(*a), *args)  # noqa: B023
    big = [(a.shape, a.dtype, why) for a, why in saved if a.shape != (3,)]
    assert [(shape, dt) for shape, dt, _ in big] == [((8, 4, 4, 3), dtype)], big
    assert big[0][2].startswith("from the argument"), big


def test_inference_hand_values_and_gradients():
  # y = γ (x − m)/√(v + ε) + β with x = 3, m = 1, v = 4, γ = 2, β = 1: y = 2·2/2 + 1 = 3.
  x = jnp.array([[3.0]])
  args = (x, jnp.array([2.0]), jnp.array([1.0]), jnp.array([1.0]), jnp.array([4.0]))
  f = lambda *a: jnp.sum(jlayers.batch_norm_inference(*a, eps=1e-12))  # noqa: E731
  np.testing.assert_allclose(f(*args), 3.0)
  dx, dg, db, dm, dv = jax.grad(f, argnums=(0, 1, 2, 3, 4))(*args)
  # dx = γ/σ = 1, dγ = x̂ = 1, dβ = 1, dm = −γ/σ = −1, dv = −γ (x − m)/(2 σ³) = −2·2/16 = −0.25
  np.testing.assert_allclose([dx[0, 0], dg[0], db[0], dm[0], dv[0]], [1, 1, 1, -1, -0.25],
                             rtol=1e-6)


BAD = [
    ("scale shape", ValueError, r"batch_norm: scale must have shape \(3,\) \(features,\) matching "
     r"x's axis 1, got \(4,\)", lambda x: jlayers.batch_norm(x, jnp.ones(4), jnp.zeros(3))),
    ("offset shape", ValueError, r"batch_norm: offset must have shape \(3,\)",
     lambda x: jlayers.batch_norm(x, jnp.ones(3), jnp.zeros((1, 3)))),
    ("eps zero", ValueError, "batch_norm: eps must be a positive float, got 0",
     lambda x: jlayers.batch_norm(x, jnp.ones(3), jnp.zeros(3), eps=0)),
    ("eps string", TypeError, "batch_norm: eps must be a positive float, got str",
     lambda x: jlayers.batch_norm(x, jnp.ones(3), jnp.zeros(3), eps="1e-5")),
    ("axis range", ValueError, "batch_norm: axis=2 is out of range for an input of rank 2",
     lambda x: jlayers.batch_norm(x, jnp.ones(3), jnp.zeros(3), axis=2)),
    ("axis type", TypeError, "batch_norm: axis must be an int, got tuple",
     lambda x: jlayers.batch_norm(x, jnp.ones(3), jnp.zeros(3), axis=(0, 1))),
    ("int x", TypeError, "batch_norm: x must have a floating dtype, got int32",
     lambda x: jlayers.batch_norm(x.astype(jnp.int32), jnp.ones(3), jnp.zeros(3))),
    ("int scale", TypeError, "batch_norm: scale must have a floating dtype, got int32",
     lambda x: jlayers.batch_norm(x, jnp.ones(3, jnp.int32), jnp.zeros(3))),
    ("inference var shape", ValueError,
     r"batch_norm_inference: var must have shape \(3,\) .* got \(2,\)",
     lambda x: jlayers.batch_norm_inference(x, jnp.ones(3), jnp.zeros(3), jnp.zeros(3),
                                            jnp.ones(2))),
    ("inference eps", ValueError, "batch_norm_inference: eps must be a positive float, got -1.0",
     lambda x: jlayers.batch_norm_inference(x, jnp.ones(3), jnp.zeros(3), jnp.zeros(3),
                                            jnp.ones(3), eps=-1.0)),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, jnp.ones((4, 3)))
