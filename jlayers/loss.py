"""Softmax cross-entropy against integer or probability labels, per example as in optax, with
hand-derived backward passes.

Both ops return one loss per example, exactly as ``optax.softmax_cross_entropy_with_integer_labels``
and ``optax.softmax_cross_entropy`` do; the mean over a batch is the caller's, so gradients
accumulated over micro-batches add up to those of the whole batch.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _sharding

_INT_OP = "softmax_cross_entropy_with_integer_labels"
_PROB_OP = "softmax_cross_entropy"


def _logits(op, logits, axis):
  """Floating logits of rank >= 1 and the class axis normalised into ``[0, ndim)``."""
  logits = _checks.floating(op, "logits", logits)
  _checks.min_rank(op, "logits", logits, 1, "(a class axis)")
  axis = _checks.axis_index(op, "axis", axis, logits.ndim)
  if logits.shape[axis] == 0:
    raise ValueError(f"{op}: logits must have at least one class (C >= 1) on axis {axis}, "
                     f"got shape {tuple(logits.shape)}")
  return logits, axis


def _examples(logits, axis) -> tuple[int, ...]:
  """The shape of the per-example losses: ``logits.shape`` without the class axis."""
  return tuple(logits.shape[:axis]) + tuple(logits.shape[axis + 1:])


def _mask(op, where, logits, axis):
  """``where`` as bool of ``logits``' rank: a class mask as given, an example mask with a
  size-1 class axis (it broadcasts against the logits); ``None`` stays ``None``."""
  if where is None:
    return None
  where = _checks.as_array(op, "where", where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{op}: where must have dtype bool, got {where.dtype}")
  examples = _examples(logits, axis)
  if tuple(where.shape) == examples:
    return _like(jnp.expand_dims(where, axis), logits)
  if where.shape == logits.shape:
    return _like(where, logits)
  raise ValueError(f"{op}: where must have shape {examples} (one flag per example) or "
                   f"{tuple(logits.shape)} (logits.shape, one flag per class), "
                   f"got {tuple(where.shape)}")


def _like(w, logits):
  """The mask laid out as the logits where the types carry shardings (a mask left replicated
  next to batch-split logits makes every select ambiguous); splitting a replicated array is a
  local slice. A size-1 class axis stays unsplit. Elsewhere ``w`` as it is."""
  target = _sharding.spec_like(logits, w.shape)
  if target is None or jax.typeof(w).sharding.spec == target:
    return w
  return jax.sharding.reshard(w, target)


def _smoothing(value) -> float:
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    raise TypeError(f"{_INT_OP}: label_smoothing must be a float in [0, 1], "
                    f"got {type(value).__name__}")
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{_INT_OP}: label_smoothing must be in [0, 1], got {value}")
  return float(value)


def _validate_int(logits, labels, axis, where, label_smoothing):
  logits, axis = _logits(_INT_OP, logits, axis)
  labels = _checks.as_array(_INT_OP, "labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{_INT_OP}: labels must have an integer dtype, got {labels.dtype}")
  _checks.shape(_INT_OP, "labels", labels, _examples(logits, axis),
                "(logits.shape without the class axis)")
  return logits, labels, axis, _mask(_INT_OP, where, logits, axis), _smoothing(label_smoothing)


def _validate_prob(logits, labels, axis, where):
  logits, axis = _logits(_PROB_OP, logits, axis)
  labels = _checks.floating(_PROB_OP, "labels", labels)
  _checks.shape(_PROB_OP, "labels", labels, logits.shape, "(logits.shape)")
  return logits, labels, axis, _mask(_PROB_OP, where, logits, axis)


def _index(labels, num_classes: int):
  """Returns ``(idx, in_range)``: labels clipped into ``[0, C)`` as int32, and ``0 <= label < C``.

  Comparisons stay in the labels' own dtype, so a ``uint8`` label is never compared against a
  ``C`` it cannot represent and an ``int64`` label is never wrapped into range by a cast.
  """
  top = jnp.iinfo(labels.dtype).max
  in_range = labels >= 0
  if num_classes <= top:
    in_range = in_range & (labels < num_classes)
  idx = jnp.clip(labels, 0, min(num_classes - 1, top)).astype(jnp.int32)
  return idx, in_range


def _masked(w, v):
  """``v`` where ``w`` is True, 0 elsewhere (a select: NaN and inf in ``v`` never leak)."""
  return v if w is None else jnp.where(w, v, jnp.zeros_like(v))


def _counted(w, axis):
  """Whether each example has at least one unmasked class (keepdims); ``None`` without mask."""
  return None if w is None else jnp.any(w, axis=axis, keepdims=True)


def _shifted(x, m, w):
  """``z = x - m``, 0 at masked entries whatever ``x`` holds there."""
  return _masked(w, x - m)


def _log_normalizer(x, w, axis):
  """``(m, log_s)``, both keepdims: ``m`` the maximum over the unmasked classes and
  ``log_s = log Σ_j exp(x_j - m)`` over them.

  The log-sum-exp is kept as the two parts ``m + log_s`` and never added up: next to ``m`` of
  size 1e4, float32 would round ``m + log_s`` to steps of ~1e-3, and the loss and ``p`` with
  it, while ``x - m`` is exact. An example without unmasked classes gets ``m = 0`` and
  ``log_s = 0``, so that nothing infinite is ever formed.
  """
  if w is None:
    m = jnp.max(x, axis=axis, keepdims=True)
    return m, jnp.log(jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True))
  counted = _counted(w, axis)
  m = jnp.max(jnp.where(w, x, jnp.full_like(x, -jnp.inf)), axis=axis, keepdims=True)
  m = jnp.where(counted, m, jnp.zeros_like(m))
  s = jnp.sum(_masked(w, jnp.exp(_shifted(x, m, w))), axis=axis, keepdims=True)
  return m, jnp.log(jnp.where(counted, s, jnp.ones_like(s)))


def _onehot(idx, x, axis):
  """``[j = y]`` in ``x``'s dtype and shape, for ``idx`` of ``x``'s rank (size 1 on ``axis``)."""
  return (idx == lax.broadcasted_iota(jnp.int32, x.shape, axis)).astype(x.dtype)


def _smoothing_terms(w, x, axis, idx):
  """``(w_y, n)``: whether the label's class is unmasked (1.0 without a class mask) and the
  number of classes the smoothing mass is spread over (``C``, or the unmasked ones per
  example), both keepdims floats."""
  c = x.shape[axis]
  if w is None:
    return None, c
  if w.shape[axis] == 1:  # an example mask: every class of a counted example is unmasked
    return w.astype(x.dtype), c
  w_y = jnp.take_along_axis(w, idx, axis=axis).astype(x.dtype)
  n = jnp.maximum(jnp.sum(w, axis=axis, keepdims=True).astype(x.dtype), 1)
  return w_y, n


# --- integer labels ---------------------------------------------------------------------------


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
  idx, in_range = _index(labels, x.shape[axis])
  idx, in_range = jnp.expand_dims(idx, axis), jnp.expand_dims(in_range, axis)
  m, log_s = _log_normalizer(x, w, axis)
  good = in_range if w is None else in_range | ~_counted(w, axis)
  log_s = jnp.where(good, log_s, jnp.full_like(log_s, jnp.nan))
  z = _shifted(x, m, w)
  w_y, n = _smoothing_terms(w, x, axis, idx)
  loss = log_s - jnp.take_along_axis(z, idx, axis=axis)
  if w_y is not None:
    loss = w_y * loss
  if alpha:
    loss = (1.0 - alpha) * loss + (alpha / n) * jnp.sum(_masked(w, log_s - z), axis=axis,
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
  idx = jnp.expand_dims(_index(labels, x.shape[axis])[0], axis)
  g = jnp.expand_dims(g.astype(x.dtype), axis)
  p = jnp.exp(_shifted(x, m, w) - log_s)
  w_y, n = _smoothing_terms(w, x, axis, idx)
  target = _onehot(idx, x, axis)
  if w_y is not None:
    target = w_y * target
  total = None
  if w is not None and w.shape[axis] > 1:
    total = (1.0 - alpha) * w_y + alpha * _counted(w, axis).astype(x.dtype)
  if alpha:
    target = (1.0 - alpha) * target + alpha / n
  dx = g * (p - target if total is None else p * total - target)
  return _masked(w, dx).astype(logits.dtype), None, None


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
  idx, in_range = _index(labels, c)
  ok = jnp.expand_dims(in_range, axis)
  if w is not None:
    ok = ok | ~w
  x = x * jnp.where(ok, jnp.ones_like(ok, x.dtype), jnp.full_like(ok, jnp.nan, x.dtype))
  n = c
  if w is not None and w.shape[axis] > 1:
    n = jnp.maximum(jnp.sum(w, axis=axis, keepdims=True).astype(x.dtype), 1)
  target = (1.0 - alpha) * jax.nn.one_hot(idx, c, dtype=x.dtype, axis=axis) + alpha / n
  log_p = _masked(w, jax.nn.log_softmax(x, axis=axis, where=w))
  return -jnp.sum(_masked(w, target * log_p), axis=axis).astype(logits.dtype)


# --- probability labels -----------------------------------------------------------------------


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
  m, log_s = _log_normalizer(x, w, axis)
  loss = jnp.sum(_masked(w, y * (log_s - _shifted(x, m, w))), axis=axis)
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
  neg_log_p = log_s - _shifted(x, m, w)
  p = jnp.exp(-neg_log_p)
  total = jnp.sum(_masked(w, y), axis=axis, keepdims=True)
  dx = _masked(w, g * (p * total - y))
  dy = _masked(w, g * neg_log_p)
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
  log_p = _masked(w, jax.nn.log_softmax(logits.astype(dtype), axis=axis, where=w))
  return -jnp.sum(_masked(w, labels.astype(dtype) * log_p), axis=axis).astype(logits.dtype)
