"""Op-specific checks for ``linear`` and ``relu``: hand values, conventions, residuals, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers


def test_linear_hand_values():
  # x = [1, 2], W = [[1, 0, -1], [2, 1, 0]], b = [0, 1, 2]:
  # y = [1 + 4, 0 + 2, -1 + 0] + b = [5, 3, 1].
  x = jnp.array([[1.0, 2.0]])
  w = jnp.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]])
  b = jnp.array([0.0, 1.0, 2.0])
  np.testing.assert_allclose(jlayers.linear(x, w, b), [[5.0, 3.0, 1.0]])
  # L = Σ c ⊙ y with c = [1, 2, 3]: dx = c Wᵀ = [1 - 3, 2 + 2] = [-2, 4],
  # dW = xᵀ c = [[1, 2, 3], [2, 4, 6]], db = c.
  c = jnp.array([[1.0, 2.0, 3.0]])
  dx, dw, db = jax.grad(lambda *a: jnp.sum(c * jlayers.linear(*a)), argnums=(0, 1, 2))(x, w, b)
  np.testing.assert_allclose(dx, [[-2.0, 4.0]])
  np.testing.assert_allclose(dw, [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])
  np.testing.assert_allclose(db, [1.0, 2.0, 3.0])


def test_linear_flattens_leading_dims_for_dw():
  x = jnp.arange(12.0).reshape(2, 3, 2)
  w = jnp.ones((2, 1))
  dw = jax.grad(lambda w: jnp.sum(jlayers.linear(x, w)))(w)
  np.testing.assert_allclose(dw[:, 0], x.reshape(-1, 2).sum(0))


def test_relu_gradient_at_zero_is_zero():
  assert float(jax.grad(jlayers.relu)(0.0)) == 0.0
  assert float(jax.grad(jlayers.reference.relu)(0.0)) == 0.0
  g = jax.grad(lambda x: jnp.sum(jlayers.relu(x)))(jnp.array([-1.0, 0.0, 1e-30, 2.0]))
  np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, 1.0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_relu_saves_at_most_one_byte_per_element(dtype):
  x = jnp.ones((4, 5), dtype)
  avals = residual_avals(jlayers.relu, x)
  assert sum(a.size * a.dtype.itemsize for a in avals) <= x.size
  assert [a.dtype for a in avals] == [jnp.bool_]


def test_linear_saves_only_its_inputs():
  x, w, b = jnp.ones((3, 4)), jnp.ones((4, 2)), jnp.ones(2)
  assert [(a.shape, a.dtype) for a in residual_avals(jlayers.linear, x, w, b)] == [
      ((3, 4), x.dtype), ((4, 2), w.dtype)]


BAD = [
    ("x rank 0", ValueError, r"linear: x must have rank at least 1 \(\.\.\., in\), got shape \(\)",
     (jnp.float32(1.0), jnp.ones((1, 2)))),
    ("w rank 1", ValueError, r"linear: w must have rank 2 \(in, out\), got shape \(3,\)",
     (jnp.ones((2, 3)), jnp.ones(3))),
    ("in mismatch", ValueError, r"x's last dimension must equal w's first.*\(2, 3\).*\(4, 5\)",
     (jnp.ones((2, 3)), jnp.ones((4, 5)))),
    ("bias shape", ValueError, r"linear: b must have shape \(5,\) \(out,\), got \(4,\)",
     (jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.ones(4))),
    ("int x", TypeError, "linear: x must have a floating dtype, got int32",
     (jnp.ones((2, 3), jnp.int32), jnp.ones((3, 5)))),
    ("int w", TypeError, "linear: w must have a floating dtype, got int32",
     (jnp.ones((2, 3)), jnp.ones((3, 5), jnp.int32))),
    ("int b", TypeError, "linear: b must have a floating dtype, got int32",
     (jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.ones(5, jnp.int32))),
]


@pytest.mark.parametrize("name, exc, match, args", BAD, ids=[b[0] for b in BAD])
def test_linear_bad_input(name, exc, match, args):
  raises_eager_and_jit(exc, match, jlayers.linear, *args)


def test_relu_rejects_integer_input():
  raises_eager_and_jit(TypeError, "relu: x must have a floating dtype, got int32", jlayers.relu,
                       jnp.arange(3))
