"""Gated linear units of transformer feed-forward blocks: ``swiglu`` and ``geglu``, with
hand-derived backward passes.

Both multiply an activation of one projection (the gate) by another projection (up),
elementwise: ``act(gate) · up``. The rule keeps the two inputs and nothing else, and
recomputes the activation and its derivative in the backward pass.

On GPUs and TPUs the rule stays in XLA, with no Pallas kernel: it is elementwise (value and
gradient lower to 40 operations for swiglu, 74 for the tanh geglu, no reduction, no product),
and XLA fuses it into one kernel per pass with the projections' outputs it reads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jlayers import _checks, _ops

# The GELU constants of jlayers.activation.gelu (and jax.nn.gelu, PyTorch); a test checks
# that geglu(gate, 1) equals gelu(gate) bit for bit.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _validate(op, gate, up):
  gate = _checks.floating(op, "gate", gate)
  up = _checks.floating(op, "up", up)
  if gate.shape != up.shape:
    raise ValueError(f"{op}: gate and up must have the same shape (no broadcasting), got "
                     f"gate {tuple(gate.shape)} and up {tuple(up.shape)}")
  if gate.dtype != up.dtype:
    raise TypeError(f"{op}: gate and up must have the same dtype, got gate {gate.dtype} and "
                    f"up {up.dtype}")
  return gate, up


# --------------------------------------------------------------------------------------------
# SwiGLU.


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  r"""SwiGLU: the SiLU of ``gate`` times ``up``, elementwise, with a manual VJP.

  .. math::
    \mathrm{swiglu}(g, u) = \mathrm{silu}(g)\, u = g\, σ(g)\, u, \qquad
    σ(g) = \frac{1}{1 + e^{-g}}

  The feed-forward block of Llama, Mistral and Qwen is ``down(swiglu(x W_gate, x W_up))``.
  Computed in at least float32 and rounded once to the inputs' dtype.

  Args:
    gate: float[...] of any shape (rank 0 included).
    up: float[...] with the shape and dtype of ``gate`` (no broadcasting).

  Returns:
    float[...] with the shape and dtype of ``gate``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> y = jlayers.swiglu(jnp.array([-1.0, 0.0, 2.0]), jnp.array([2.0, 5.0, 0.5]))
    >>> [round(v, 4) for v in y.tolist()]  # silu = [-0.2689, 0, 1.7616]
    [-0.5379, 0.0, 0.8808]
  """
  gate, up = _validate("swiglu", gate, up)
  return _swiglu(gate, up)


def _swiglu_forward(gate, up):
  acc = _checks.at_least_float32(gate.dtype)
  z = gate.astype(acc)
  return (z * jax.nn.sigmoid(z) * up.astype(acc)).astype(gate.dtype)


@jax.custom_vjp
def _swiglu(gate, up):
  return _swiglu_forward(gate, up)


def _swiglu_fwd(gate, up):
  """Saves ``gate`` and ``up``, both inputs (no memory of the rule's own). That is the
  minimum: ``d gate`` needs ``up`` and ``σ(gate)``, ``d up`` needs ``silu(gate)``; keeping
  ``σ(gate)`` or ``silu(gate)`` as well would add an array of the inputs' size to spare one
  ``exp`` per element, and the output cannot stand in for ``up`` (it is 0 where ``gate`` is)."""
  return _swiglu_forward(gate, up), (gate, up)


def _swiglu_bwd(res, g):
  r"""Backward of ``y = silu(a) · u`` (``a`` the gate, ``u`` up), elementwise.

  ``y`` depends on ``a_i`` and ``u_i`` only at ``i``, so both Jacobians are diagonal:

  .. math::
    \frac{∂y}{∂u} = \mathrm{silu}(a) = a\,σ(a), \qquad
    \frac{∂y}{∂a} = u\, \mathrm{silu}'(a)

  and with :math:`σ' = σ (1 - σ)`,

  .. math::
    \mathrm{silu}'(a) = σ(a) + a\,σ(a)(1 - σ(a)) = σ(a)\,\big(1 + a\,(1 - σ(a))\big)

  so ``d gate = g · u · σ(a) (1 + a (1 − σ(a)))`` and ``d up = g · a σ(a)``, computed in at
  least float32 from the saved inputs and rounded once each to the inputs' dtype. The rule is
  written in differentiable JAX ops of the inputs (second order).
  """
  gate, up = res
  acc = _checks.at_least_float32(gate.dtype)
  a, u, g = gate.astype(acc), up.astype(acc), g.astype(acc)
  s = jax.nn.sigmoid(a)
  d_gate = g * u * (s * (1.0 + a * (1.0 - s)))
  return d_gate.astype(gate.dtype), (g * (a * s)).astype(up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu_reference(gate: jax.Array, up: jax.Array) -> jax.Array:
  """Autodiff twin of :func:`swiglu`: the same checks and forward, differentiated by JAX."""
  return _swiglu_forward(*_validate("swiglu", gate, up))


# --------------------------------------------------------------------------------------------
# GeGLU.


def geglu(gate: jax.Array, up: jax.Array, *, approximate: bool = True) -> jax.Array:
  r"""GeGLU: the GELU of ``gate`` times ``up``, elementwise, with a manual VJP.

  .. math::
    \mathrm{geglu}(g, u) = \mathrm{gelu}(g)\, u, \qquad
    \mathrm{gelu}(g) = \tfrac12 g \big(1 + \mathrm{erf}(g/\sqrt2)\big)
    \quad \text{(``approximate=False``)}

    \mathrm{gelu}(g) \approx \tfrac12 g \big(1 + \tanh(\sqrt{2/\pi}\,(g + 0.044715\,g^3))\big)
    \quad \text{(``approximate=True``)}

  The GELU is that of :func:`jlayers.gelu` (the same forms and constants; Gemma's
  feed-forward block uses the tanh form). Computed in at least float32 and rounded once to the
  inputs' dtype.

  Args:
    gate: float[...] of any shape (rank 0 included).
    up: float[...] with the shape and dtype of ``gate`` (no broadcasting).
    approximate: the tanh form (True) or the exact erf form (False); static.

  Returns:
    float[...] with the shape and dtype of ``gate``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> y = jlayers.geglu(jnp.array([-1.0, 0.0, 1.0]), jnp.array([2.0, 3.0, 2.0]))
    >>> [round(v, 4) for v in y.tolist()]  # gelu = [-0.1588, 0, 0.8412]
    [-0.3176, 0.0, 1.6824]
    >>> round(float(jlayers.geglu(jnp.array(1.0), jnp.array(1.0), approximate=False)), 4)
    0.8413
  """
  gate, up = _validate("geglu", gate, up)
  return _geglu(_checks.flag("geglu", "approximate", approximate), gate, up)


def _gelu(approximate, z):
  """``gelu(z)`` in ``z``'s dtype."""
  if approximate:
    return 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)))
  return 0.5 * z * (1.0 + jax.lax.erf(z * _INV_SQRT_2))


def _geglu_forward(approximate, gate, up):
  acc = _checks.at_least_float32(gate.dtype)
  return (_gelu(approximate, gate.astype(acc)) * up.astype(acc)).astype(gate.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _geglu(approximate, gate, up):
  return _geglu_forward(approximate, gate, up)


def _geglu_fwd(approximate, gate, up):
  """Saves ``gate`` and ``up``, both inputs (no memory of the rule's own). That is the
  minimum: ``d gate`` needs ``up`` and ``gelu'(gate)``, ``d up`` needs ``gelu(gate)``, both
  functions of ``gate`` alone; keeping either would add an array of the inputs' size to spare
  one ``tanh`` (or ``erf`` and ``exp``) per element."""
  return _geglu_forward(approximate, gate, up), (gate, up)


def _geglu_bwd(approximate, res, g):
  r"""Backward of ``y = gelu(a) · u`` (``a`` the gate, ``u`` up), elementwise.

  Both Jacobians are diagonal: :math:`∂y/∂u = \mathrm{gelu}(a)` and
  :math:`∂y/∂a = u\,\mathrm{gelu}'(a)`, so ``d gate = g · u · gelu'(a)`` and
  ``d up = g · gelu(a)``. Exact form, with :math:`\Phi` the normal distribution function and
  :math:`\phi(a) = e^{-a^2/2}/\sqrt{2\pi} = \Phi'(a)`:

  .. math::
    \mathrm{gelu}'(a) = \frac{∂}{∂a}\big(a\,\Phi(a)\big) = \Phi(a) + a\,\phi(a)

  Tanh form, with :math:`t = \tanh w`, :math:`w = c\,(a + k a^3)`, :math:`c = \sqrt{2/\pi}`,
  :math:`k = 0.044715` and :math:`\tanh' = 1 - \tanh^2`:

  .. math::
    \mathrm{gelu}'(a) = \tfrac12 (1 + t) + \tfrac12 a\,(1 - t^2)\, c\,(1 + 3 k a^2)

  ``t`` (or :math:`\Phi`) serves both ``gelu(a) = ½ a (1 + t)`` and the slope. Computed in at
  least float32 from the saved inputs and rounded once each to the inputs' dtype; written in
  differentiable JAX ops of the inputs (second order).
  """
  gate, up = res
  acc = _checks.at_least_float32(gate.dtype)
  a, u, g = gate.astype(acc), up.astype(acc), g.astype(acc)
  if approximate:
    t = jnp.tanh(_SQRT_2_OVER_PI * (a + _GELU_CUBIC * a * a * a))
    act = 0.5 * a * (1.0 + t)
    slope = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _GELU_CUBIC * a * a)
  else:
    cdf = 0.5 * (1.0 + jax.lax.erf(a * _INV_SQRT_2))
    act = a * cdf
    slope = cdf + a * jnp.exp(-0.5 * a * a) * _INV_SQRT_2PI
  return (g * u * slope).astype(gate.dtype), (g * act).astype(up.dtype)


_geglu.defvjp(_geglu_fwd, _geglu_bwd)


def geglu_reference(gate: jax.Array, up: jax.Array, *, approximate: bool = True) -> jax.Array:
  """Autodiff twin of :func:`geglu`: the same checks and forward, differentiated by JAX."""
  gate, up = _validate("geglu", gate, up)
  return _geglu_forward(_checks.flag("geglu", "approximate", approximate), gate, up)


swiglu_op = _ops.declare("swiglu", swiglu, swiglu_reference)
geglu_op = _ops.declare("geglu", geglu, geglu_reference)
