r"""The one closed form behind every normalisation: batch, layer, group and RMS norm.

Each of them standardises ``x`` over a set ``R`` of reduced axes (``N`` elements per
statistic) and then applies an affine map:

.. math::
  \hat x = (x - μ)\,r \quad\text{(centred)} \qquad\text{or}\qquad \hat x = x\,r
  \quad\text{(RMS)}, \qquad r = (σ^2 + ε)^{-1/2}

with :math:`μ = \frac1N Σ_R x` and :math:`σ^2 = \frac1N Σ_R (x - μ)^2` (centred) or
:math:`σ^2 = \frac1N Σ_R x^2` (RMS). Batch norm reduces over the batch and space, layer norm
over the features, group norm over one group's channels and space. They differ only in ``R``
and in how the scale ``γ`` is laid out; the backward of ``x̂`` is :func:`standardized_grad`,
derived once in its docstring.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def reduced_sum(v: jax.Array, axes: tuple[int, ...], axis_name=None) -> jax.Array:
  """``Σ_R v`` over ``axes`` (keepdims) and, with ``axis_name``, over that mapped axis."""
  s = jnp.sum(v, axis=axes, keepdims=True)
  return s if axis_name is None else jax.lax.psum(s, axis_name)


def count(x: jax.Array, axes: tuple[int, ...], axis_name=None):
  """``N``, the elements of one statistic: a Python int, or traced with ``axis_name``."""
  n = math.prod(x.shape[a] for a in axes)
  return n if axis_name is None else jax.lax.psum(n, axis_name)


def moments(x: jax.Array, axes: tuple[int, ...], *, centered: bool = True, axis_name=None):
  """``(μ, σ², N, x − μ)`` over ``axes`` (keepdims), two-pass so ``σ² >= 0``; for RMS
  (``centered=False``) ``(None, mean(x²), N, x)``. Computed in ``x``'s dtype: cast it to at
  least float32 first."""
  n = count(x, axes, axis_name)
  if not centered:
    return None, reduced_sum(x * x, axes, axis_name) / n, n, x
  mean = reduced_sum(x, axes, axis_name) / n
  centred = x - mean
  return mean, reduced_sum(centred * centred, axes, axis_name) / n, n, centred


def standardized_grad(ghat: jax.Array, v: jax.Array, rstd: jax.Array, n, *,
                      v_is_xhat: bool = True, axes: tuple[int, ...] = (), sums=None,
                      centered: bool = True):
  r"""``∂L/∂x`` of ``x̂ = (x − μ)·r`` (or ``x·r``) over ``R``, given ``ĝ = ∂L/∂x̂``.

  Centred. From :math:`∂μ/∂x_i = 1/N` and :math:`∂σ^2/∂x_i = 2 (x_i - μ)/N` (the ``μ`` term
  of the derivative of ``σ²`` drops out, as :math:`Σ_R (x - μ) = 0`),
  :math:`∂r/∂x_i = -\tfrac12 r^3 · 2 (x_i - μ)/N = -r^2 \hat x_i / N`, so for ``i, j`` in one
  reduced set

  .. math::
    \frac{∂\hat x_j}{∂x_i} = r\,(δ_{ij} - \tfrac1N) + (x_j - μ)\,\frac{∂r}{∂x_i}
      = r \Big(δ_{ij} - \frac1N - \frac{\hat x_i \hat x_j}{N}\Big)

  The Jacobian is dense within the set (every output of a statistic depends on every input
  of it) and zero across sets. Contracting with ``ĝ``:

  .. math::
    dx_i = Σ_j ĝ_j \frac{∂\hat x_j}{∂x_i}
         = r \Big(ĝ_i - \frac1N Σ_j ĝ_j - \hat x_i · \frac1N Σ_j ĝ_j \hat x_j\Big)

  RMS. With no mean, :math:`∂r/∂x_i = -r^3 x_i / N = -r^2 \hat x_i / N` and
  :math:`∂\hat x_j/∂x_i = r\,(δ_{ij} - \hat x_i \hat x_j / N)`, so the middle term goes:

  .. math::
    dx_i = r \Big(ĝ_i - \hat x_i · \frac1N Σ_j ĝ_j \hat x_j\Big)

  Neither depends on ``ε``: it enters through ``r`` only. With an affine map
  ``y = γ x̂ + β``, ``ĝ = γ · ∂L/∂y`` elementwise, whatever axes ``γ`` varies along.

  The same in the centred input ``c = x − μ`` (``x`` for RMS), with ``x̂ = c r`` substituted:

  .. math::
    dx_i = r \Big(ĝ_i - \frac1N Σ_j ĝ_j\Big) - c_i · r^3 \frac1N Σ_j ĝ_j c_j

  which a rule that keeps ``x`` rather than ``x̂`` evaluates without forming ``x̂`` at all
  (one fused pass over ``ĝ`` and ``c`` for the sums, one for ``dx``).

  Args:
    ghat: float[...] ``ĝ``, at least float32.
    v: float[...] ``x̂`` (``v_is_xhat``), or the centred input ``c``, in ``ghat``'s dtype.
    rstd: float[...] ``r``, keepdims over the reduced axes (broadcasts against ``v``).
    n: ``N`` (a Python int, or a traced count summed over devices).
    v_is_xhat: whether ``v`` is ``x̂`` or ``c``.
    axes: the reduced axes, for the two sums (ignored when ``sums`` is given).
    sums: optional precomputed ``(Σ_R ĝ, Σ_R ĝ v)``, keepdims, e.g. summed over devices or
      with a ``γ`` constant over ``R`` factored out of the sums (batch norm).
    centered: ``False`` for RMS (``Σ_R ĝ`` is then not needed).

  Returns:
    ``dx``, float[...] like ``ghat``.
  """
  if sums is None:
    sum_g = reduced_sum(ghat, axes) if centered else None
    sums = (sum_g, reduced_sum(ghat * v, axes))
  sum_g, sum_gv = sums
  factor = rstd if v_is_xhat else rstd * rstd * rstd
  dx = rstd * ghat - v * (factor * sum_gv / n)
  if centered:
    dx = dx - rstd * sum_g / n
  return dx
