"""Softmax cross-entropy against probability (soft) labels, per example as in optax, with a
hand-derived backward pass.

The op returns one loss per example, exactly as ``optax.softmax_cross_entropy`` does; the mean
over a batch is the caller's. Integer labels: :mod:`jlayers.loss`, whose conventions (masks,
stability, dtypes) this op shares.

On GPUs and TPUs the rule stays in XLA (row reductions and elementwise work, fused by XLA),
as the integer-label losses do (:mod:`jlayers.loss`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlayers import _checks, _logits, _ops

_OP = "softmax_cross_entropy"


def _validate_prob(logits, labels, axis, where):
  logits, axis = _checks.class_logits(_OP, logits, axis)
  labels = _checks.floating(_OP, "labels", labels)
  _checks.shape(_OP, "labels", labels, logits.shape, "(logits.shape)")
  return (logits, _logits.labels_like(labels, logits), axis,
          _logits.where_mask(_OP, where, logits, axis))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *, axis: int = -1,
                          where: jax.Array | None = None) -> jax.Array:
  r"""Per-example softmax cross-entropy against probability labels, with a manual VJP.

  For an example with logits :math:`x \in \mathbb{R}^C` and labels :math:`y \in \mathbb{R}^C`
  (along ``axis``):

  .. math::
    \ell = -\sum_j y_j \log \mathrm{softmax}(x)_j
         = \sum_j y_j \left(\mathrm{logsumexp}(x) - x_j\right)

  exactly ``optax.softmax_cross_entropy``. The labels need not sum to 1, and they are
  differentiated too (:math:`∂\ell/∂y = -\log \mathrm{softmax}(x)`), as autodiff of optax's
  formula does. The log-sum-exp subtracts the maximum, so logits of any finite size (±1e4 in
  float32) give finite losses and gradients. The computation runs in float32 or wider (the
  wider of the two inputs' dtypes); the result is cast to the dtype of ``logits``.

  ``where``, as in optax, takes one of two shapes:

  * ``logits.shape`` without ``axis`` (one flag per example): a False example has loss 0 and
    zero gradient rows (logits and labels), whatever its logits and labels hold (NaN, ±inf
    are selected away, not multiplied by 0).
  * ``logits.shape`` (one flag per class): the softmax runs over the True classes only and the
    sum over them; False classes get probability 0, gradient 0 for both logits and labels,
    and may hold anything. An example with no True class has loss 0 and gradient 0.

  Args:
    logits: float[..., C, ...], with the C >= 1 classes on ``axis``; the other dimensions
      index the examples.
    labels: float[..., C, ...] of ``logits.shape``, any float dtype; a distribution over the
      classes per example (not checked).
    axis: the class axis (an int).
    where: optional bool[...] of ``logits.shape`` without ``axis``, or bool[..., C, ...] of
      ``logits.shape``; see above.

  Returns:
    float[...] of ``logits.shape`` without ``axis``, in the dtype of ``logits``: one loss per
    example (take the mean yourself).

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> [round(v, 4) for v in jlayers.softmax_cross_entropy(logits, labels).tolist()]
    [0.2761, 2.9518]
  """
  logits, labels, axis, w = _validate_prob(logits, labels, axis, where)
  return _xent_prob(axis, logits, labels, w)


def _compute_dtype(logits, labels):
  """At least float32, and as wide as the wider of the two inputs."""
  return max(_checks.at_least_float32(logits.dtype), _checks.at_least_float32(labels.dtype),
             key=lambda d: d.itemsize)


def _prob_forward(axis, logits, labels, w):
  """Losses (in ``logits``' dtype), ``m`` and ``log_s`` (both keepdims, at least float32)."""
  dtype = _compute_dtype(logits, labels)
  x, y = logits.astype(dtype), labels.astype(dtype)
  m, log_s = _logits.log_normalizer(x, w, axis)
  loss = jnp.sum(_logits.masked(w, y * (log_s - _logits.shifted(x, m, w))), axis=axis)
  return loss.astype(logits.dtype), m, log_s


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _xent_prob(axis, logits, labels, w):
  return _prob_forward(axis, logits, labels, w)[0]


def _xent_prob_fwd(axis, logits, labels, w):
  """Saves ``logits`` and ``labels`` (both inputs), ``m`` and ``log_s`` (one float each per
  example) and ``where``.

  As for integer labels: ``p`` and ``log p`` are rebuilt in the backward from the logits and
  the two parts of the log-sum-exp (kept apart for precision), in the same elementwise pass
  that forms both gradients, instead of a saved ``[..., C]`` float32 buffer. The labels are
  needed for ``∂ℓ/∂x`` and are an input, so saving them costs nothing. No ``stop_gradient``:
  the rule can be differentiated again.
  """
  loss, m, log_s = _prob_forward(axis, logits, labels, w)
  return loss, (logits, labels, w, m, log_s)


def _xent_prob_bwd(axis, res, g):
  r"""Backward of :math:`\ell = -\sum_j w_j y_j \log p_j` for the per-example cotangent
  :math:`g = ∂J/∂\ell`.

  Write :math:`w_j \in \{0, 1\}` for the class mask (all 1 without one) and
  :math:`p_j = w_j e^{x_j} / \sum_k w_k e^{x_k}`.

  1. Jacobian of the masked log-softmax, for an unmasked :math:`k`:

     .. math:: \frac{∂ \log p_k}{∂ x_j} = δ_{kj} - p_j

  2. Chain rule, with :math:`S = \sum_k w_k y_k` (1 for labels that are a distribution over
     the unmasked classes, but not assumed):

     .. math::
       \frac{∂ \ell}{∂ x_j} = -\sum_k w_k y_k (δ_{kj} - p_j) = p_j S - w_j y_j

  3. ``ℓ`` is linear in the labels:

     .. math::
       \frac{∂ \ell}{∂ y_j} = -w_j \log p_j = w_j \left(\log s - (x_j - m)\right)

     with :math:`m` the maximum and :math:`s = \sum_k w_k e^{x_k - m}`.
  4. Examples do not interact, so both are scaled by :math:`g` row by row.

  ``p`` is rebuilt as ``exp((x - m) - log_s)``. Masked entries (and masked examples) are
  selected to 0 rather than multiplied by 0, so non-finite logits or labels there never leak.
  ``where`` is not differentiable and gets ``None``.
  """
  logits, labels, w, m, log_s = res
  x, y = logits.astype(m.dtype), labels.astype(m.dtype)
  g = jnp.expand_dims(g.astype(x.dtype), axis)
  neg_log_p = log_s - _logits.shifted(x, m, w)
  p = jnp.exp(-neg_log_p)
  total = jnp.sum(_logits.masked(w, y), axis=axis, keepdims=True)
  dx = _logits.masked(w, g * (p * total - y))
  dy = _logits.masked(w, g * neg_log_p)
  return dx.astype(logits.dtype), dy.astype(labels.dtype), None


_xent_prob.defvjp(_xent_prob_fwd, _xent_prob_bwd)


def softmax_cross_entropy_reference(logits: jax.Array, labels: jax.Array, *, axis: int = -1,
                                    where: jax.Array | None = None) -> jax.Array:
  """Autodiff twin of :func:`softmax_cross_entropy`: same signature, checks and conventions.

  optax's formula: ``jax.nn.log_softmax(..., where=where)`` times the labels, summed over the
  unmasked classes with a select. The log-softmax's ``-inf`` on masked classes is selected to
  0 first: autodiff of optax's product would give the labels' masked entries ``0 · inf = NaN``
  as gradient, where the op gives 0.
  """
  logits, labels, axis, w = _validate_prob(logits, labels, axis, where)
  dtype = _compute_dtype(logits, labels)
  log_p = _logits.masked(w, jax.nn.log_softmax(logits.astype(dtype), axis=axis, where=w))
  return -jnp.sum(_logits.masked(w, labels.astype(dtype) * log_p), axis=axis).astype(logits.dtype)


softmax_cross_entropy_op = _ops.declare(_OP, softmax_cross_entropy,
                                        softmax_cross_entropy_reference)
