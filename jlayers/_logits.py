"""Rows of logits: the pieces shared by softmax, log-softmax and the cross-entropies.

A row is the class axis (or axes) of one example. ``where`` masks may hold False anywhere;
masked entries are *selected* away (never multiplied by 0), so NaN or inf there never reaches
an output or a gradient, and a row without unmasked entries never forms ``0/0`` or ``log 0``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _sharding


def where_mask(op: str, where, logits, axis: int):
  """A cross-entropy's ``where`` checked (:func:`jlayers._checks.example_or_class_mask`: a
  size-1 class axis for one flag per example) and laid out as the logits; ``None`` stays
  ``None``."""
  where = _checks.example_or_class_mask(op, where, logits, axis)
  return None if where is None else _sharding.reshard_like(where, logits)


def labels_like(labels, logits, axis: int | None = None):
  """``labels`` laid out as ``logits`` where the types carry shardings: integer labels (of
  ``logits.shape`` without ``axis``) take the sharding of the logits' other axes, probability
  labels (``axis=None``, ``logits.shape``) that of the logits. Replicated labels, or constants
  a loss closes over, next to batch-split logits would make every select, gather and product
  between them ambiguous; splitting them is a local slice, and autodiff lays the gradient of
  probability labels out as they came."""
  axes = None if axis is None else tuple(a for a in range(logits.ndim) if a != axis)
  return _sharding.reshard_like(labels, logits, axes)


def label_index(labels, num_classes: int):
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


def masked(w, v):
  """``v`` where ``w`` is True, 0 elsewhere (a select: NaN and inf in ``v`` never leak)."""
  return v if w is None else jnp.where(w, v, jnp.zeros_like(v))


def counted(w, axis):
  """Whether each example has at least one unmasked class (keepdims); ``None`` without mask."""
  return None if w is None else jnp.any(w, axis=axis, keepdims=True)


def shifted(x, m, w):
  """``z = x - m``, 0 at masked entries whatever ``x`` holds there."""
  return masked(w, x - m)


def log_normalizer(x, w, axis):
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
  any_class = counted(w, axis)
  m = jnp.max(jnp.where(w, x, jnp.full_like(x, -jnp.inf)), axis=axis, keepdims=True)
  m = jnp.where(any_class, m, jnp.zeros_like(m))
  s = jnp.sum(masked(w, jnp.exp(shifted(x, m, w))), axis=axis, keepdims=True)
  return m, jnp.log(jnp.where(any_class, s, jnp.ones_like(s)))


def one_hot(idx, x, axis):
  """``[j = y]`` in ``x``'s dtype and shape, for ``idx`` of ``x``'s rank (size 1 on ``axis``)."""
  return (idx == lax.broadcasted_iota(jnp.int32, x.shape, axis)).astype(x.dtype)


def at_label(z, idx, axis):
  """``z``'s entry at each example's label ``idx`` (keepdims). With the classes split over
  devices (a vocabulary-parallel layout) a one-hot sum, one number per example added across
  them; else a gather."""
  if _sharding.entry(z, axis) is None:
    return jnp.take_along_axis(z, idx, axis=axis)
  hit = _sharding.reshard_like(idx == lax.broadcasted_iota(jnp.int32, z.shape, axis), z)
  return jnp.sum(jnp.where(hit, z, jnp.zeros_like(z)), axis=axis, keepdims=True)


def smoothing_terms(w, x, axis, idx):
  """``(w_y, n)``: whether the label's class is unmasked (1.0 without a class mask) and the
  number of classes the smoothing mass is spread over (``C``, or the unmasked ones per
  example), both keepdims floats."""
  c = x.shape[axis]
  if w is None:
    return None, c
  if w.shape[axis] == 1:  # an example mask: every class of a counted example is unmasked
    return w.astype(x.dtype), c
  w_y = at_label(w, idx, axis).astype(x.dtype)
  n = jnp.maximum(jnp.sum(w, axis=axis, keepdims=True).astype(x.dtype), 1)
  return w_y, n
