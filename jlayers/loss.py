"""Softmax cross-entropy against integer labels, per example as in optax, with a hand-derived
backward pass.

The op returns one loss per example, exactly as
``optax.softmax_cross_entropy_with_integer_labels`` does; the mean over a batch is the
caller's, so gradients accumulated over micro-batches add up to those of the whole batch.
Probability labels: :mod:`jlayers.loss_soft_labels`.

On GPUs and TPUs the rules stay in XLA, with no Pallas kernel: value and gradient lower to
row reductions, a gather of the label's logit and elementwise work (5 to 11 reductions with
smoothing and masks), all linear in the logits' size and fused by XLA around the reductions;
the work that deserves a kernel is forming the logits, which
:func:`jlayers.linear_cross_entropy` avoids.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlayers import _checks, _logits, _ops

_OP = "softmax_cross_entropy_with_integer_labels"


def _validate_int(logits, labels, axis, where, label_smoothing):
  logits, axis = _checks.class_logits(_OP, logits, axis)
  labels = _checks.as_array(_OP, "labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{_OP}: labels must have an integer dtype, got {labels.dtype}")
  _checks.shape(_OP, "labels", labels, _checks.without_axis(logits.shape, axis),
                "(logits.shape without the class axis)")
  return (logits, _logits.labels_like(labels, logits, axis), axis,
          _logits.where_mask(_OP, where, logits, axis),
          _checks.real(_OP, "label_smoothing", label_smoothing, 0, 1))


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array, labels: jax.Array, *, axis: int = -1, where: jax.Array | None = None,
    label_smoothing: float = 0.0) -> jax.Array:
  r"""Per-example softmax cross-entropy against integer labels, with a manual VJP.

  For an example with logits :math:`x \in \mathbb{R}^C` (along ``axis``), label :math:`y`
  and smoothing :math:`α`, the target is :math:`t = (1 - α)\, e_y + α / n` with
  :math:`e_y` the one-hot vector of :math:`y` and :math:`n = C`, and

  .. math::
    \ell = -\sum_j t_j \log \mathrm{softmax}(x)_j
         = \sum_j t_j \left(\mathrm{logsumexp}(x) - x_j\right)

  which for :math:`α = 0` is :math:`\mathrm{logsumexp}(x) - x_y`, as in
  ``optax.softmax_cross_entropy_with_integer_labels``; for :math:`α > 0` it equals
  ``optax.softmax_cross_entropy(logits, optax.smooth_labels(one_hot(labels), α))``. The
  log-sum-exp subtracts the maximum, so logits of any finite size (±1e4 in float32) give
  finite losses and gradients. bfloat16/float16 logits are computed in float32 and the result
  is cast back.

  ``where``, as in optax, takes one of two shapes:

  * ``logits.shape`` without ``axis`` (one flag per example): a False example has loss 0 and a
    zero gradient row, whatever its logits (NaN, ±inf) and label hold (they are selected
    away, not multiplied by 0; padding labels such as -1 are fine).
  * ``logits.shape`` (one flag per class): the softmax runs over the True classes only;
    False classes get probability 0 and gradient 0, and their logits may hold anything. The
    smoothing mass is spread over the True classes (:math:`n` = their number, as
    ``optax.smooth_labels(..., where=where)``), and target mass on a False class is dropped:
    a label on a False class contributes only the smoothing term (loss 0 for :math:`α = 0`;
    optax's integer-label function would give :math:`\mathrm{logsumexp} - x_y` with a
    gradient on the masked class there, its ``softmax_cross_entropy`` of the one-hot target
    agrees with this one). An example with no True class has loss 0 and gradient 0.

  An example that counts and whose label is outside ``[0, C)`` gets a NaN loss and NaN
  gradients (on its unmasked classes), so bad labels never pass silently (values cannot be
  checked at trace time).

  Args:
    logits: float[..., C, ...], with the C >= 1 classes on ``axis``; the other dimensions
      index the examples.
    labels: int[...] of ``logits.shape`` without ``axis``, any integer dtype. Not
      differentiable.
    axis: the class axis of ``logits`` (an int).
    where: optional bool[...] of ``logits.shape`` without ``axis``, or bool[..., C, ...] of
      ``logits.shape``; see above.
    label_smoothing: :math:`α`, a float in ``[0, 1]``.

  Returns:
    float[...] of ``logits.shape`` without ``axis``, in the dtype of ``logits``: one loss per
    example (take the mean yourself).

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> loss = jlayers.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
    >>> [round(v, 4) for v in loss.tolist()]
    [0.2761, 2.9518]
    >>> logits = jnp.array([[0.0, jnp.log(3.0)]])  # p = [1/4, 3/4]
    >>> smooth = jlayers.softmax_cross_entropy_with_integer_labels(
    ...     logits, jnp.array([1]), label_smoothing=0.5)  # t = [1/4, 3/4] = p
    >>> round(float(smooth[0]), 4)  # the entropy of p
    0.5623
  """
  logits, labels, axis, w, alpha = _validate_int(logits, labels, axis, where, label_smoothing)
  return _xent_int(axis, alpha, logits, labels, w)


def _int_forward(axis, alpha, logits, labels, w):
  """Losses (in ``logits``' dtype), ``m`` and ``log_s`` (both keepdims, at least float32).

  ``log_s`` is NaN for a counted example whose label is out of range, which makes its loss
  and its gradient NaN.
  """
  x = logits.astype(_checks.at_least_float32(logits.dtype))
  idx, in_range = _logits.label_index(labels, x.shape[axis])
  idx, in_range = jnp.expand_dims(idx, axis), jnp.expand_dims(in_range, axis)
  m, log_s = _logits.log_normalizer(x, w, axis)
  good = in_range if w is None else in_range | ~_logits.counted(w, axis)
  log_s = jnp.where(good, log_s, jnp.full_like(log_s, jnp.nan))
  z = _logits.shifted(x, m, w)
  w_y, n = _logits.smoothing_terms(w, x, axis, idx)
  loss = log_s - _logits.at_label(z, idx, axis)
  if w_y is not None:
    loss = w_y * loss
  if alpha:
    loss = (1.0 - alpha) * loss + (alpha / n) * jnp.sum(_logits.masked(w, log_s - z), axis=axis,
                                                         keepdims=True)
  return jnp.squeeze(loss, axis).astype(logits.dtype), m, log_s


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _xent_int(axis, alpha, logits, labels, w):
  return _int_forward(axis, alpha, logits, labels, w)[0]


def _xent_int_fwd(axis, alpha, logits, labels, w):
  """Saves ``logits`` (an input), ``m`` and ``log_s`` (one float each per example),
  ``labels`` and ``where``.

  The backward needs ``p = softmax(x)``. Saving ``p`` would add a new ``[..., C]`` buffer in
  float32 (twice the input for bfloat16 logits), written in the forward and read back in the
  backward. Saving the logits, which exist anyway, plus the two parts of the log-sum-exp (kept
  apart for precision) lets the backward rebuild ``p = exp((x - m) - log_s)`` inside the
  single elementwise pass that also forms ``p T - t``: one exp per element instead of an
  extra ``[..., C]`` write and read. The target ``t`` is rebuilt from the labels, the mask and
  the static ``α``. The residuals are differentiable functions of ``logits`` (no
  ``stop_gradient``), so the rule can be differentiated again.
  """
  loss, m, log_s = _int_forward(axis, alpha, logits, labels, w)
  return loss, (logits, labels, w, m, log_s)


def _xent_int_bwd(axis, alpha, res, g):
  r"""Backward of :math:`\ell = -\sum_j w_j t_j \log p_j` for the per-example cotangent
  :math:`g = ∂J/∂\ell`.

  Write :math:`w_j \in \{0, 1\}` for the class mask (all 1 without one),
  :math:`p_j = w_j e^{x_j} / \sum_k w_k e^{x_k}` and :math:`t_j = (1-α) e_{yj} + α / n`.

  1. Jacobian of the masked log-softmax, for an unmasked :math:`k`: from
     :math:`\log p_k = x_k - \log \sum_l w_l e^{x_l}`,

     .. math:: \frac{∂ \log p_k}{∂ x_j} = δ_{kj} - p_j

     which is 0 for a masked :math:`j` (there :math:`δ_{kj} = 0` and :math:`p_j = 0`):
     masked logits do not enter the loss.
  2. Chain rule, with :math:`T = \sum_k w_k t_k = (1 - α) w_y + α` (1 without a class mask):

     .. math::
       \frac{∂ \ell}{∂ x_j} = -\sum_k w_k t_k (δ_{kj} - p_j) = p_j T - w_j t_j

     zero for a masked :math:`j`. With every class unmasked, :math:`T = 1` and the familiar
     :math:`p - t` (:math:`p - e_y` without smoothing).
  3. Examples do not interact, so :math:`∂J/∂x_j = g\, (p_j T - w_j t_j)` row by row.

  ``p`` is rebuilt as ``exp((x - m) - log_s)``; a counted example with a label out of range
  has ``log_s = NaN`` and so NaN gradients. Masked entries (and masked examples) are selected
  to 0 rather than multiplied by 0, so non-finite logits there never leak into the gradient.
  ``labels`` and ``where`` are not differentiable and get ``None``.
  """
  logits, labels, w, m, log_s = res
  x = logits.astype(m.dtype)
  idx = jnp.expand_dims(_logits.label_index(labels, x.shape[axis])[0], axis)
  g = jnp.expand_dims(g.astype(x.dtype), axis)
  p = jnp.exp(_logits.shifted(x, m, w) - log_s)
  w_y, n = _logits.smoothing_terms(w, x, axis, idx)
  target = _logits.one_hot(idx, x, axis)
  if w_y is not None:
    target = w_y * target
  total = None
  if w is not None and w.shape[axis] > 1:
    total = (1.0 - alpha) * w_y + alpha * _logits.counted(w, axis).astype(x.dtype)
  if alpha:
    target = (1.0 - alpha) * target + alpha / n
  dx = g * (p - target if total is None else p * total - target)
  return _logits.masked(w, dx).astype(logits.dtype), None, None


_xent_int.defvjp(_xent_int_fwd, _xent_int_bwd)


def softmax_cross_entropy_with_integer_labels_reference(
    logits: jax.Array, labels: jax.Array, *, axis: int = -1, where: jax.Array | None = None,
    label_smoothing: float = 0.0) -> jax.Array:
  """Autodiff twin of :func:`softmax_cross_entropy_with_integer_labels`: same signature,
  checks and conventions.

  The target ``(1 - α) one_hot + α / n`` against ``jax.nn.log_softmax(..., where=where)``
  (its ``-inf`` on masked classes selected to 0 first, so that no ``0 · inf`` reaches
  autodiff), summed over the unmasked classes with a select. A counted example with a label
  out of range has its unmasked logits multiplied by NaN, so that autodiff, too, gives a NaN
  loss and NaN gradients there.
  """
  logits, labels, axis, w, alpha = _validate_int(logits, labels, axis, where, label_smoothing)
  x = logits.astype(_checks.at_least_float32(logits.dtype))
  c = x.shape[axis]
  idx, in_range = _logits.label_index(labels, c)
  ok = jnp.expand_dims(in_range, axis)
  if w is not None:
    ok = ok | ~w
  x = x * jnp.where(ok, jnp.ones_like(ok, x.dtype), jnp.full_like(ok, jnp.nan, x.dtype))
  n = c
  if w is not None and w.shape[axis] > 1:
    n = jnp.maximum(jnp.sum(w, axis=axis, keepdims=True).astype(x.dtype), 1)
  target = (1.0 - alpha) * jax.nn.one_hot(idx, c, dtype=x.dtype, axis=axis) + alpha / n
  log_p = _logits.masked(w, jax.nn.log_softmax(x, axis=axis, where=w))
  return -jnp.sum(_logits.masked(w, target * log_p), axis=axis).astype(logits.dtype)


softmax_cross_entropy_with_integer_labels_op = _ops.declare(
    _OP, softmax_cross_entropy_with_integer_labels,
    softmax_cross_entropy_with_integer_labels_reference)
