"""Rotary position embedding (RoPE) with a hand-derived backward pass.

Each pair of features of a query or key head is turned by an angle proportional to the
token's position, so that the product of a query at position ``m`` and a key at position
``n`` depends on ``m − n`` only. The map is a rotation: its backward pass is the rotation by
the opposite angle, and it needs nothing of ``x``.

On GPUs and TPUs the rule stays in XLA, with no Pallas kernel: it is elementwise (value and
gradient lower to 72 operations, no reduction, no product) and fuses into the kernels that
produce the queries and keys or that read them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlayers import _checks, _ops

_OP = "rotary_embedding"


class _Config(NamedTuple):
  """Static configuration (hashable; goes in ``nondiff_argnums``)."""

  rotary_dim: int
  interleaved: bool
  base: float
  dtype: Any  # x's dtype: the output's and the gradient's


def _validate(x, positions, base, rotary_dim, interleaved, frequencies):
  x = _checks.floating(_OP, "x", x)
  _checks.rank(_OP, "x", x, 4, "(B, T, N, H)")
  b, t, _, h = x.shape
  positions = _checks.as_array(_OP, "positions", positions)
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise TypeError(f"{_OP}: positions must have an integer dtype, got {positions.dtype}")
  if tuple(positions.shape) not in ((t,), (b, t)):
    raise ValueError(f"{_OP}: positions must have shape (T,) = ({t},) or (B, T) = ({b}, {t}) "
                     f"for x of shape {tuple(x.shape)}, got {tuple(positions.shape)}")
  base = _checks.positive_float(_OP, "base", base)
  interleaved = _checks.flag(_OP, "interleaved", interleaved)
  if rotary_dim is None:
    if h % 2:
      raise ValueError(f"{_OP}: x's head size H={h} is odd: pass an even rotary_dim < H to "
                       "rotate the first rotary_dim features only")
    rotary_dim = h
  else:
    rotary_dim = _checks.positive_int(_OP, "rotary_dim", rotary_dim)
    if rotary_dim % 2 or rotary_dim > h:
      raise ValueError(f"{_OP}: rotary_dim must be even and at most H={h} (x's last "
                       f"dimension), got {rotary_dim}")
  if frequencies is not None:
    frequencies = _checks.floating(_OP, "frequencies", frequencies)
    _checks.shape(_OP, "frequencies", frequencies, (rotary_dim // 2,), "(rotary_dim / 2,)")
  return x, positions, frequencies, _Config(rotary_dim, interleaved, base, x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
                     rotary_dim: int | None = None, interleaved: bool = False,
                     frequencies: jax.Array | None = None) -> jax.Array:
  r"""Rotary position embedding of queries or keys, with a manual VJP.

  With ``R = rotary_dim`` and, for ``i < R/2``, the angle of token ``t`` and pair ``i``

  .. math::
    θ_{t,i} = p_t\, f_i, \qquad f_i = \mathrm{base}^{-2i/R}

  (``p_t`` its position), each pair of features ``(a, b)`` of every head becomes

  .. math::
    a' = a \cos θ - b \sin θ, \qquad b' = b \cos θ + a \sin θ

  By default the pairs are ``(i, i + R/2)`` ("rotate half": Llama and GPT-NeoX checkpoints);
  ``interleaved=True`` pairs ``(2i, 2i + 1)`` (GPT-J, Meta's original Llama code). Features
  ``R..H-1`` pass through unchanged. ``frequencies`` replaces ``f`` (Llama 3.1 scaling, NTK,
  YaRN: computed by the caller).

  Angles are computed in float32 (float64 for float64 ``x``) whatever ``x``'s dtype: the
  positions and ``f`` are cast to it, and so are ``cos θ`` and ``sin θ``; the rotation runs in
  that precision and is rounded once to ``x``'s dtype. ``positions`` and ``frequencies`` are
  constants: no gradient flows to them (``frequencies`` gets a zero cotangent).

  Args:
    x: float[B, T, N, H], queries or keys (``N`` heads of size ``H``).
    positions: int[T] (every row alike) or int[B, T] (packed sequences), any integer dtype;
      negative positions turn the other way. Not differentiable.
    base: the wavelength base of the default frequencies, a finite float > 0; static.
    rotary_dim: ``R``, the number of features rotated: even, ``1 ≤ R ≤ H``; default ``H``
      (which must then be even); static.
    interleaved: pair ``(2i, 2i+1)`` (True) or ``(i, i + R/2)`` (False); static.
    frequencies: optional float[R/2], any float dtype: the ``f_i``; ``base`` is then unused.
      Treated as a constant (``stop_gradient``).

  Returns:
    float[B, T, N, H] in the dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> x = jnp.array([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    >>> y = jlayers.rotary_embedding(x, jnp.array([1]), base=1.0)  # every angle is 1 rad
    >>> [round(v, 4) for v in y.ravel().tolist()]  # (cos 1, 0, sin 1, 0)
    [0.5403, 0.0, 0.8415, 0.0]
    >>> y = jlayers.rotary_embedding(x, jnp.array([1]), base=1.0, interleaved=True)
    >>> [round(v, 4) for v in y.ravel().tolist()]
    [0.5403, 0.8415, 0.0, 0.0]
  """
  x, positions, frequencies, config = _validate(x, positions, base, rotary_dim, interleaved,
                                                frequencies)
  return _rotary(config, x, positions, frequencies)


def _cos_sin(config, positions, frequencies):
  """``cos θ`` and ``sin θ`` of ``θ = position · f``, shaped ``[B or 1, T, 1, R/2]`` (they
  broadcast over batch rows and heads), in at least float32. ``f`` is ``frequencies`` under
  ``stop_gradient``, or ``base^(−2i/R)`` computed in float64 on the host and rounded once."""
  acc = _checks.at_least_float32(config.dtype)
  if frequencies is None:
    r = config.rotary_dim
    f = jnp.asarray(config.base ** (-np.arange(0, r, 2, dtype=np.float64) / max(r, 1)), acc)
  else:
    f = lax.stop_gradient(frequencies).astype(acc)
  theta = lax.stop_gradient(positions).astype(acc)[..., None] * f.reshape(
      (1,) * positions.ndim + f.shape)
  theta = theta[:, :, None, :] if positions.ndim == 2 else theta[None, :, None, :]
  return jnp.cos(theta), jnp.sin(theta)


def _rotate(config, x, cos, sin):
  """Each pair ``(a, b)`` of ``x``'s first ``R`` features to ``(a cos − b sin, b cos + a
  sin)`` in ``cos``'s dtype, the rest as it is; rounded once to the config's dtype.

  The pairs are gathered by a reshape of the first ``R`` features: ``[..., 2, R/2]`` (rotate
  half: ``a`` in the first half, ``b`` in the second) or ``[..., R/2, 2]`` (interleaved)."""
  r, lead = config.rotary_dim, x.shape[:3]
  axis = 4 if config.interleaved else 3  # the axis that holds a pair's two members
  pairs = x[..., :r].astype(cos.dtype).reshape(
      lead + ((r // 2, 2) if config.interleaved else (2, r // 2)))
  a = lax.index_in_dim(pairs, 0, axis, keepdims=False)
  b = lax.index_in_dim(pairs, 1, axis, keepdims=False)
  turned = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=axis).reshape(lead + (r,))
  return jnp.concatenate([turned.astype(config.dtype), x[..., r:].astype(config.dtype)],
                         axis=-1)


def _forward(config, x, positions, frequencies):
  cos, sin = _cos_sin(config, positions, frequencies)
  return _rotate(config, x, cos, sin)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rotary(config, x, positions, frequencies):
  return _forward(config, x, positions, frequencies)


def _rotary_fwd(config, x, positions, frequencies):
  """Saves ``positions`` and ``frequencies`` (``None`` for the default ones), nothing else.

  That is the minimum: the map is linear in ``x``, so its Jacobian (a rotation per pair)
  does not depend on ``x`` at all, only on the angles; the angles are a function of
  ``positions`` and ``f``, which are inputs (``T`` or ``B·T`` integers and ``R/2`` floats, no
  memory of the rule's own; the default ``f`` is a constant of the configuration). Saving
  ``cos θ`` and ``sin θ`` instead would keep ``2·T·R/2`` floats (``B·T·R`` with per-row
  positions) to spare one ``cos`` and one ``sin`` per angle, a small cost next to the
  ``B·T·N·R`` products of the rotation itself.
  """
  return _forward(config, x, positions, frequencies), (positions, frequencies)


def _rotary_bwd(config, res, g):
  r"""Backward of the rotation: the rotation by the opposite angle.

  Every pair ``(a, b)`` of every token and head is mapped on its own, by

  .. math::
    \begin{pmatrix} a' \\ b' \end{pmatrix} = Q(θ) \begin{pmatrix} a \\ b \end{pmatrix},
    \qquad Q(θ) = \begin{pmatrix} \cos θ & -\sin θ \\ \sin θ & \cos θ \end{pmatrix}

  so the Jacobian of ``y`` in ``x`` is block diagonal, the block of a pair being
  :math:`∂(a', b')/∂(a, b) = Q(θ)`, and the identity on the features ``R..H-1``. For a
  cotangent ``(g_a, g_b) = (∂L/∂a', ∂L/∂b')``, the chain rule gives

  .. math::
    \frac{∂L}{∂a} = g_a \cos θ + g_b \sin θ, \qquad
    \frac{∂L}{∂b} = -g_a \sin θ + g_b \cos θ

  that is :math:`(∂L/∂a, ∂L/∂b)^T = Q(θ)^T (g_a, g_b)^T`. ``Q`` is orthogonal
  (:math:`Q^T Q = I`, :math:`\cos^2 + \sin^2 = 1`) and :math:`Q(θ)^T = Q(-θ)` (``cos`` is
  even, ``sin`` odd): ``dx`` is ``g`` rotated by ``−θ``, the same map with ``sin θ`` negated,
  and the features past ``R`` pass ``g`` through. ``cos θ`` and ``sin θ`` are recomputed from
  the saved ``positions`` and ``frequencies`` exactly as in the forward; the rotation runs in
  at least float32 and ``dx`` is rounded once to ``x``'s dtype. The rule is linear in ``g``
  and does not depend on ``x`` (zero second derivative, as the twin's). ``positions`` and
  ``frequencies`` are constants: their cotangents are ``None`` (zero).
  """
  positions, frequencies = res
  cos, sin = _cos_sin(config, positions, frequencies)
  return _rotate(config, g, cos, -sin), None, None


_rotary.defvjp(_rotary_fwd, _rotary_bwd)


def rotary_embedding_reference(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
                               rotary_dim: int | None = None, interleaved: bool = False,
                               frequencies: jax.Array | None = None) -> jax.Array:
  """Autodiff twin of :func:`rotary_embedding`: the same checks and forward, with
  ``positions`` and ``frequencies`` under ``stop_gradient``, differentiated by JAX."""
  x, positions, frequencies, config = _validate(x, positions, base, rotary_dim, interleaved,
                                                frequencies)
  return _forward(config, x, positions, frequencies)


rotary_embedding_op = _ops.declare(_OP, rotary_embedding, rotary_embedding_reference)
