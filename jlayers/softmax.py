"""Softmax and log-softmax over one axis or several, with an optional mask, and hand-derived
backward passes that need nothing but the saved output (and the mask).

Both ops follow ``jax.nn.softmax`` / ``jax.nn.log_softmax``: entries where ``where`` is False
get probability 0 (log-probability ``-inf``), and whatever ``x`` holds there (NaN, inf) never
reaches an output or a gradient. A row without unmasked entries is all 0 (all ``-inf``) with
gradient 0, where ``jax.nn`` gives NaN.

On GPUs and TPUs the rules stay in XLA, with no Pallas kernel: value and gradient lower to
3 row reductions and elementwise work (no product). XLA's GPU compiler recognises exactly
this pattern (a row maximum, exponentials, a row sum, a division) and emits it as one fused
Triton kernel of its own; on TPUs the reductions fuse with their elementwise neighbours.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _logits, _ops, _sharding


def _validate(op, x, axis, where):
  """``(x, axes, w)``: floating ``x`` of rank >= 1, its reduced axes, and ``where`` as a bool
  array of ``x``'s rank (each dimension 1 or ``x``'s) laid out as ``x``, or ``None``."""
  x = _checks.floating(op, "x", x)
  _checks.min_rank(op, "x", x, 1)
  axes = _checks.axes(op, "axis", axis, x.ndim)
  if where is None:
    return x, axes, None
  w = _checks.as_array(op, "where", where)
  if not jnp.issubdtype(w.dtype, jnp.bool_):
    raise TypeError(f"{op}: where must have dtype bool, got {w.dtype}")
  if w.ndim != x.ndim or any(d not in (1, n) for d, n in zip(w.shape, x.shape)):
    raise ValueError(f"{op}: where must have the rank of x and each dimension 1 or equal to "
                     f"x's, for x of shape {tuple(x.shape)}; got shape {tuple(w.shape)}")
  return x, axes, _sharding.reshard_like(w, x)


def _exp_shifted(axes, x, w):
  """``(z, e, s)`` in at least float32, for the rows along ``axes``.

  ``z = x - m`` at unmasked entries and ``-inf`` at masked ones (a select: NaN and inf there
  never leak), ``m`` the maximum of the row's unmasked entries under ``stop_gradient`` (both
  ops are invariant to shifting a row, so their derivatives are unchanged; logits of 1e4
  give exact ``z``); ``e = exp z``, 0 at masked entries; ``s = Σ e`` (keepdims), replaced by 1
  in a row without unmasked entries so that neither ``0/0`` nor ``log 0`` is ever formed.
  """
  x = x.astype(_checks.at_least_float32(x.dtype))
  m = lax.stop_gradient(jnp.max(x, axis=axes, where=w, initial=-jnp.inf, keepdims=True))
  z = x - m if w is None else jnp.where(w, x - m, -jnp.inf)
  e = jnp.exp(z)
  s = jnp.sum(e, axis=axes, keepdims=True)
  return z, e, (s if w is None else jnp.where(s > 0, s, jnp.ones_like(s)))


# --- softmax ---------------------------------------------------------------------------------


def softmax(x: jax.Array, *, axis=-1, where: jax.Array | None = None) -> jax.Array:
  r"""Softmax along ``axis``, with a manual VJP.

  .. math::
    \mathrm{softmax}(x)_i = \frac{w_i \exp(x_i)}{\sum_j w_j \exp(x_j)}

  with the sum over the entries of the row (the ``axis`` dimensions) and :math:`w_j \in \{0,
  1\}` the mask (all 1 without ``where``). Masked entries are exactly 0; a row without unmasked
  entries is 0 everywhere (not NaN), and its gradient 0. The row's maximum is subtracted
  first, so logits of ±1e4 are fine in float32. Computed in at least float32 and rounded once
  to ``x``'s dtype.

  Args:
    x: float[..., C] of rank >= 1.
    axis: the axis, or a tuple of distinct axes reduced together; static.
    where: None, or bool[...] of ``x``'s rank with each dimension 1 or equal to ``x``'s (an
      explicit broadcast, e.g. ``[B, 1, T, S]`` for ``x`` of ``[B, N, T, S]``): False masks.

  Returns:
    float[..., C] with the shape and dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> x = jnp.log(jnp.array([1.0, 2.0, 3.0, 4.0]))
    >>> [round(v, 4) for v in jlayers.softmax(x).tolist()]
    [0.1, 0.2, 0.3, 0.4]
    >>> [round(v, 4) for v in jlayers.softmax(x, where=jnp.array([1, 1, 1, 0]) > 0).tolist()]
    [0.1667, 0.3333, 0.5, 0.0]
  """
  x, axes, w = _validate("softmax", x, axis, where)
  return _softmax(axes, x, w)


def _softmax_forward(axes, x, w):
  _, e, s = _exp_shifted(axes, x, w)
  return (e / s).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax(axes, x, w):
  return _softmax_forward(axes, x, w)


def _softmax_fwd(axes, x, w):
  """Saves the output ``y`` only, in ``x``'s dtype: the Jacobian is a function of ``y`` alone,
  and ``y`` is the op's output (kept for the caller anyway), so the rule holds no array of its
  own. The mask is not needed: masked ``y`` is 0, which zeroes their gradient by itself."""
  y = _softmax_forward(axes, x, w)
  return y, y


def _softmax_bwd(axes, y, g):
  r"""Backward of :math:`y_i = w_i e^{x_i} / \sum_k w_k e^{x_k}` along the row.

  1. For an unmasked :math:`j`, :math:`∂ e^{x_i} / ∂x_j = δ_{ij} e^{x_i}` and the denominator's
     derivative is :math:`w_j e^{x_j}`, so

     .. math::
       \frac{∂y_i}{∂x_j} = y_i δ_{ij} - y_i y_j, \qquad J = \mathrm{diag}(y) - y y^\top

     A masked :math:`x_j` enters nothing: its column is 0, which is the same formula with
     :math:`y_j = 0`.
  2. :math:`J` is symmetric, so :math:`dx = J g`:

     .. math::
       dx_j = \sum_i g_i \frac{∂y_i}{∂x_j} = y_j \Big(g_j - \sum_i y_i g_i\Big)

  Rows do not interact. Computed in at least float32 and cast to the cotangent's dtype (that
  of ``x``). The rule is linear in ``g`` and a differentiable function of the residual ``y``,
  itself a differentiable function of ``x``: second order works. ``where`` gets ``None``.
  """
  p = y.astype(_checks.at_least_float32(y.dtype))
  gp = g.astype(p.dtype)
  return (p * (gp - jnp.sum(p * gp, axis=axes, keepdims=True))).astype(g.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax_reference(x: jax.Array, *, axis=-1, where: jax.Array | None = None) -> jax.Array:
  """Autodiff twin of :func:`softmax`: same signature, checks, conventions and forward (the
  maximum under ``stop_gradient``, as ``jax.nn.softmax`` does), differentiated by JAX."""
  x, axes, w = _validate("softmax", x, axis, where)
  return _softmax_forward(axes, x, w)


# --- log-softmax -----------------------------------------------------------------------------


def log_softmax(x: jax.Array, *, axis=-1, where: jax.Array | None = None) -> jax.Array:
  r"""Log-softmax along ``axis``, with a manual VJP.

  .. math::
    \mathrm{log\_softmax}(x)_i = x_i - m - \log \sum_j w_j \exp(x_j - m)
    \qquad (w_i = 1), \qquad -\infty \qquad (w_i = 0)

  with :math:`m` the maximum of the row's unmasked entries (for stability; the value does not
  depend on it) and :math:`w_j \in \{0, 1\}` the mask (all 1 without ``where``). Masked entries
  are ``-inf`` (the log of probability 0, as ``jax.nn.log_softmax``); a row without unmasked
  entries is ``-inf`` everywhere, with gradient 0 (not NaN). Computed in at least float32 and
  rounded once to ``x``'s dtype.

  Args:
    x: float[..., C] of rank >= 1.
    axis: the axis, or a tuple of distinct axes reduced together; static.
    where: None, or bool[...] of ``x``'s rank with each dimension 1 or equal to ``x``'s (an
      explicit broadcast): False masks.

  Returns:
    float[..., C] with the shape and dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> x = jnp.log(jnp.array([1.0, 2.0, 3.0, 4.0]))
    >>> [round(v, 4) for v in jlayers.log_softmax(x).tolist()]
    [-2.3026, -1.6094, -1.204, -0.9163]
    >>> jlayers.log_softmax(x, where=jnp.array([1, 1, 1, 0]) > 0).tolist()[3]
    -inf
  """
  x, axes, w = _validate("log_softmax", x, axis, where)
  return _log_softmax(axes, x, w)


def _log_softmax_forward(axes, x, w):
  z, _, s = _exp_shifted(axes, x, w)
  y = z - jnp.log(s)
  return (y if w is None else jnp.where(w, y, -jnp.inf)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _log_softmax(axes, x, w):
  return _log_softmax_forward(axes, x, w)


def _log_softmax_fwd(axes, x, w):
  """Saves the output ``y`` (in ``x``'s dtype) and ``where`` (an input). The Jacobian needs the
  probabilities ``exp y`` and nothing else; ``y`` is the op's output, so the rule holds no
  array of its own. The mask is needed to leave the cotangents of masked entries (constant
  ``-inf`` outputs) out of the row sum and to select their gradient to 0."""
  y = _log_softmax_forward(axes, x, w)
  return y, (y, w)


def _log_softmax_bwd(axes, res, g):
  r"""Backward of :math:`y_i = x_i - \log \sum_k w_k e^{x_k}` (unmasked :math:`i`).

  1. With :math:`p_j = e^{y_j}` (0 at masked entries) and :math:`∂ \log \sum_k w_k e^{x_k} /
     ∂x_j = w_j e^{x_j} / \sum_k w_k e^{x_k} = p_j`:

     .. math::
       \frac{∂y_i}{∂x_j} = δ_{ij} - p_j \qquad (w_i = w_j = 1)

     A masked output is the constant ``-inf`` (its row of the Jacobian is 0) and a masked
     input enters nothing (its column is 0).
  2. Chain rule over the unmasked outputs:

     .. math::
       dx_j = \sum_i w_i g_i \frac{∂y_i}{∂x_j} = w_j \Big(g_j - p_j \sum_i w_i g_i\Big)

  The masked cotangents are selected out of the sum and the masked gradients selected to 0
  (never multiplied by 0). Computed in at least float32, cast to the cotangent's dtype;
  differentiable in the residual ``y``, so second order works. ``where`` gets ``None``.
  """
  y, w = res
  gw = _logits.masked(w, g.astype(_checks.at_least_float32(y.dtype)))
  dx = gw - jnp.exp(y.astype(gw.dtype)) * jnp.sum(gw, axis=axes, keepdims=True)
  return _logits.masked(w, dx).astype(g.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def log_softmax_reference(x: jax.Array, *, axis=-1,
                          where: jax.Array | None = None) -> jax.Array:
  """Autodiff twin of :func:`log_softmax`: same signature, checks, conventions and forward (the
  maximum under ``stop_gradient``, the final select to ``-inf`` that keeps masked cotangents
  out), differentiated by JAX."""
  x, axes, w = _validate("log_softmax", x, axis, where)
  return _log_softmax_forward(axes, x, w)


softmax_op = _ops.declare("softmax", softmax, softmax_reference)
log_softmax_op = _ops.declare("log_softmax", log_softmax, log_softmax_reference)
