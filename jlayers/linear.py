"""Fully connected layer: ``y = x @ w + b`` with a hand-derived backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlayers import _checks


def _validate(x, w, b):
  x = _checks.floating("linear", "x", x)
  w = _checks.floating("linear", "w", w)
  _checks.min_rank("linear", "x", x, 1, "(..., in)")
  _checks.rank("linear", "w", w, 2, "(in, out)")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"linear: x's last dimension must equal w's first (in features), "
        f"got x {tuple(x.shape)} and w {tuple(w.shape)}")
  if b is not None:
    b = _checks.floating("linear", "b", b)
    _checks.shape("linear", "b", b, (w.shape[1],), "(out,)")
  _checks.same_dtype("linear", x=x, w=w, b=b)
  return x, w, b


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  r"""Affine map over the last axis, with a manual VJP.

  .. math::
    y = x W + b

  Args:
    x: float[..., in]. Any number of leading (batch) dimensions, including none.
    w: float[in, out], same dtype as ``x``.
    b: optional float[out], same dtype as ``x``.

  Returns:
    float[..., out] in the dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.linear(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4)).shape
    (2, 4)
  """
  x, w, b = _validate(x, w, b)
  return _linear(x, w, b)


@jax.custom_vjp
def _linear(x, w, b):
  return _forward(x, w, b)


def _forward(x, w, b):
  y = jnp.matmul(x, w)
  return y if b is None else y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def _linear_fwd(x, w, b):
  """Saves ``x`` and ``w``: dW needs x and dX needs w, and both are inputs (no extra memory)."""
  return _forward(x, w, b), (x, w, b is None)


def _linear_bwd(res, g):
  r"""Backward of ``y = x W + b`` for cotangent ``G = ∂L/∂y``.

  Flatten the leading dimensions so that ``X`` is ``[M, in]`` and ``G`` is ``[M, out]`` with
  ``M`` the product of the batch dimensions. Then ``y_{mj} = Σ_i X_{mi} W_{ij} + b_j`` and

  .. math::
    \frac{∂L}{∂X_{mi}} = Σ_j G_{mj} W_{ij}       \;\Rightarrow\; dX = G W^T

    \frac{∂L}{∂W_{ij}} = Σ_m X_{mi} G_{mj}       \;\Rightarrow\; dW = X^T G

    \frac{∂L}{∂b_j}   = Σ_m G_{mj}

  (The seed notes write ``Y = WᵀX`` with examples as columns; this is the same rule for the
  row-major layout used here.)
  """
  x, w, no_bias = res
  dx = jnp.matmul(g, w.T)
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  dw = jnp.matmul(x2.T, g2)
  db = None if no_bias else jnp.sum(g2, axis=0)
  return dx.astype(x.dtype), dw.astype(w.dtype), None if no_bias else db.astype(w.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_reference(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
  """Autodiff twin of :func:`linear`: same signature, checks and forward, no custom rule."""
  x, w, b = _validate(x, w, b)
  return _forward(x, w, b)
