"""Activations with hand-derived backward passes: relu, gelu (tanh and exact forms), silu.

On GPUs and TPUs these stay in XLA, with no Pallas kernel: each rule is elementwise (value
and gradient lower to 15 operations for relu, 61 for the tanh gelu, 33 for silu, none of them a
reduction or a product), and XLA fuses elementwise chains into the kernel that produces their
input or consumes their output, so a rule costs no pass over memory of its own. A kernel would
have to be fused with the neighbouring product to gain anything: that is the product's
epilogue, which XLA already emits.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jlayers import _checks, _ops


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


# --------------------------------------------------------------------------------------------
# GELU and SiLU. Both save ``x`` alone (an input: no memory of their own) and recompute the
# derivative's factors in the backward, in at least float32, from it.

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715  # the tanh form's constant, as in jax.nn.gelu and PyTorch


def gelu(x: jax.Array, *, approximate: bool = True) -> jax.Array:
  r"""Gaussian error linear unit, elementwise, with a manual VJP.

  .. math::
    \mathrm{gelu}(x) = x\,\Phi(x) = \tfrac12 x \big(1 + \mathrm{erf}(x/\sqrt2)\big)
    \qquad \text{(exact, ``approximate=False``, PyTorch's default)}

    \mathrm{gelu}(x) \approx \tfrac12 x \big(1 + \tanh u\big), \quad
    u = \sqrt{2/\pi}\,(x + 0.044715\,x^3)
    \qquad \text{(``approximate=True``, ``jax.nn.gelu``'s default)}

  Computed in at least float32 and rounded once to ``x``'s dtype.

  Args:
    x: float[...] of any shape.
    approximate: the tanh form (True) or the exact erf form (False); static.

  Returns:
    float[...] with the shape and dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> [round(v, 4) for v in jlayers.gelu(jnp.array([-1.0, 0.0, 1.0])).tolist()]
    [-0.1588, 0.0, 0.8412]
    >>> round(float(jlayers.gelu(jnp.array(1.0), approximate=False)), 4)
    0.8413
  """
  x = _checks.floating("gelu", "x", x)
  return _gelu(_checks.flag("gelu", "approximate", approximate), x)


def _gelu_forward(approximate, x):
  z = x.astype(_checks.at_least_float32(x.dtype))
  if approximate:
    y = 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)))
  else:
    y = 0.5 * z * (1.0 + jax.lax.erf(z * (1.0 / math.sqrt(2.0))))
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gelu(approximate, x):
  return _gelu_forward(approximate, x)


def _gelu_fwd(approximate, x):
  """Saves ``x`` only: the derivative is a function of ``x`` alone, and ``x`` is an input (no
  memory of the rule's own; saving the output would not spare recomputing ``tanh``/``erf``)."""
  return _gelu_forward(approximate, x), x


def _gelu_bwd(approximate, x, g):
  r"""Backward of the elementwise GELU: ``dx = g · y'(x)``.

  Exact form, with :math:`\phi(x) = e^{-x^2/2}/\sqrt{2\pi}` the normal density and
  :math:`\Phi' = \phi`:

  .. math::
    \frac{∂y}{∂x} = \frac{∂}{∂x}\big(x\,\Phi(x)\big) = \Phi(x) + x\,\phi(x)

  Tanh form, with :math:`t = \tanh u`, :math:`u = c(x + a x^3)`, :math:`c = \sqrt{2/\pi}`,
  :math:`a = 0.044715` and :math:`\tanh' = 1 - \tanh^2`:

  .. math::
    \frac{∂y}{∂x} = \tfrac12 (1 + t) + \tfrac12 x\,(1 - t^2)\, c\,(1 + 3 a x^2)

  The Jacobian is diagonal; the rule is linear in ``g`` and differentiable in ``x`` (second
  order). Computed in at least float32, cast to ``x``'s dtype.
  """
  z = x.astype(_checks.at_least_float32(x.dtype))
  if approximate:
    t = jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z))
    slope = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _GELU_CUBIC * z * z)
  else:
    cdf = 0.5 * (1.0 + jax.lax.erf(z * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
    slope = cdf + z * pdf
  return ((g.astype(z.dtype) * slope).astype(x.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu_reference(x: jax.Array, *, approximate: bool = True) -> jax.Array:
  """Autodiff twin of :func:`gelu`: the same forward, differentiated by JAX."""
  x = _checks.floating("gelu", "x", x)
  return _gelu_forward(_checks.flag("gelu", "approximate", approximate), x)


def silu(x: jax.Array) -> jax.Array:
  r"""Sigmoid linear unit (swish), elementwise, with a manual VJP.

  .. math::
    \mathrm{silu}(x) = x\,\sigma(x), \qquad \sigma(x) = \frac{1}{1 + e^{-x}}

  Computed in at least float32 and rounded once to ``x``'s dtype.

  Args:
    x: float[...] of any shape.

  Returns:
    float[...] with the shape and dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> [round(v, 4) for v in jlayers.silu(jnp.array([-1.0, 0.0, 2.0])).tolist()]
    [-0.2689, 0.0, 1.7616]
  """
  return _silu(_checks.floating("silu", "x", x))


def _silu_forward(x):
  z = x.astype(_checks.at_least_float32(x.dtype))
  return (z * jax.nn.sigmoid(z)).astype(x.dtype)


@jax.custom_vjp
def _silu(x):
  return _silu_forward(x)


def _silu_fwd(x):
  """Saves ``x`` only (an input): the derivative needs ``σ(x)``, one ``exp`` to recompute."""
  return _silu_forward(x), x


def _silu_bwd(x, g):
  r"""Backward of ``y = x σ(x)``, elementwise. With :math:`σ' = σ (1 - σ)`:

  .. math::
    \frac{∂y}{∂x} = σ(x) + x\,σ(x)\,(1 - σ(x)) = σ(x)\,\big(1 + x\,(1 - σ(x))\big)

  so ``dx = g · σ(x) (1 + x (1 − σ(x)))``, computed in at least float32.
  """
  z = x.astype(_checks.at_least_float32(x.dtype))
  s = jax.nn.sigmoid(z)
  return ((g.astype(z.dtype) * (s * (1.0 + z * (1.0 - s)))).astype(x.dtype),)


_silu.defvjp(_silu_fwd, _silu_bwd)


def silu_reference(x: jax.Array) -> jax.Array:
  """Autodiff twin of :func:`silu`: the same forward, differentiated by JAX."""
  return _silu_forward(_checks.floating("silu", "x", x))


relu_op = _ops.declare("relu", relu, relu_reference)
gelu_op = _ops.declare("gelu", gelu, gelu_reference)
silu_op = _ops.declare("silu", silu, silu_reference)
