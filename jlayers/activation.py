"""Rectified linear unit with a hand-derived backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlayers import _checks


def relu(x: jax.Array) -> jax.Array:
  r"""Rectified linear unit, elementwise, with a manual VJP.

  .. math::
    \mathrm{relu}(x) = \max(x, 0)

  The gradient at exactly ``x = 0`` is taken to be 0, as in ``jax.nn.relu`` and PyTorch.
  NaN passes through (``relu(nan)`` is NaN, and so is its gradient's product downstream) and
  ``relu(-0.0)`` is ``+0.0``: the forward is ``where(x <= 0, 0, x)``, and the twin computes
  exactly that, so ``impl="autodiff"`` shows the same NaNs.

  Args:
    x: float[...] of any shape.

  Returns:
    float[...] with the shape and dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> jlayers.relu(jnp.array([-1.0, 0.0, 2.0]))
    Array([0., 0., 2.], dtype=float32)
    >>> float(jax.grad(jlayers.relu)(0.0))
    0.0
    >>> jlayers.relu(jnp.array([jnp.nan, -0.0])).tolist()
    [nan, 0.0]
  """
  return _relu(_checks.floating("relu", "x", x))


def _forward(x):
  return jnp.where(x <= 0, jnp.zeros_like(x), x)


@jax.custom_vjp
def _relu(x):
  return _forward(x)


def _relu_fwd(x):
  """Saves the boolean mask ``not (x <= 0)``: one byte per element, half of a bf16 output, a
  quarter of an f32 one. The output itself is not needed."""
  return _forward(x), ~(x <= 0)


def _relu_bwd(mask, g):
  r"""Backward of ``y = max(x, 0)``.

  ``y`` is elementwise, so the Jacobian is diagonal with entries

  .. math::
    \frac{∂y_i}{∂x_i} = \begin{cases} 1 & x_i > 0 \\ 0 & x_i \le 0 \end{cases}

  and ``dx_i = g_i · [x_i > 0]``. The strict inequality is the convention at the kink: the
  gradient at 0 is 0. The mask is stored as ``not (x_i <= 0)``, which also passes ``g`` at
  ``x_i = NaN``, as autodiff of the forward ``where(x <= 0, 0, x)`` does. The rule is linear in ``g``, and its derivative with respect to ``x`` is
  0 almost everywhere, matching autodiff of ``max(x, 0)`` to second order.
  """
  return (jnp.where(mask, g, jnp.zeros_like(g)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu_reference(x: jax.Array) -> jax.Array:
  """Autodiff twin of :func:`relu`: the same forward ``where(x <= 0, 0, x)``, NaN and signed
  zero included, differentiated by JAX (0 at the kink; autodiff of ``jnp.maximum(x, 0)``
  would split the tie and give 0.5)."""
  return _forward(_checks.floating("relu", "x", x))
