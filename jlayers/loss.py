"""Softmax cross-entropy with integer labels, with a hand-derived backward pass."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks

_OP = "softmax_cross_entropy"


def _validate(logits, labels, where):
  logits = _checks.floating(_OP, "logits", logits)
  _checks.min_rank(_OP, "logits", logits, 1, "(..., C)")
  if logits.shape[-1] == 0:
    raise ValueError(f"{_OP}: logits must have at least one class (C >= 1), "
                     f"got shape {tuple(logits.shape)}")
  labels = _checks.as_array(_OP, "labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{_OP}: labels must have an integer dtype, got {labels.dtype}")
  _checks.shape(_OP, "labels", labels, logits.shape[:-1], "(logits.shape[:-1])")
  if where is not None:
    where = _checks.as_array(_OP, "where", where)
    if where.dtype != jnp.bool_:
      raise TypeError(f"{_OP}: where must have dtype bool, got {where.dtype}")
    _checks.shape(_OP, "where", where, logits.shape[:-1], "(logits.shape[:-1])")
  return logits, labels, where



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


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          where: jax.Array | None = None) -> jax.Array:
  r"""Mean softmax cross-entropy against integer labels, with a manual VJP.

  For examples :math:`i` with logits :math:`x_i \in \mathbb{R}^C`, label :math:`y_i` and
  validity :math:`w_i \in \{0, 1\}` (all 1 without ``where``):

  .. math::
    \ell_i = -\log \mathrm{softmax}(x_i)_{y_i} = \mathrm{logsumexp}(x_i) - x_{i, y_i}
    \qquad
    L = \frac{\sum_i w_i \ell_i}{\max(\sum_i w_i, 1)}

  The log-sum-exp subtracts the row maximum, so logits of any finite size (±1e4 in float32)
  give a finite loss and finite gradients. bfloat16/float16 logits are computed in float32 and
  the result is cast back.

  Conventions:
    * An all-False ``where`` (or an empty batch) gives a loss of 0 and zero gradients: the
      denominator is ``max(count, 1)``.
    * A valid example whose label is outside ``[0, C)`` makes the loss NaN and its row of the
      gradient NaN, so bad labels never pass silently (values cannot be checked at trace time).
      A masked-out example is ignored entirely, whatever its label (e.g. padding labels -1).

  Args:
    logits: float[..., C], C >= 1; the leading dimensions index the examples.
    labels: int[...] of shape ``logits.shape[:-1]``, any integer dtype. Not differentiable.
    where: optional bool[...] of shape ``logits.shape[:-1]``, True for the examples that count.

  Returns:
    A scalar, float[] in the dtype of ``logits``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> logits = jnp.array([[0.0, jnp.log(3.0)]])
    >>> round(float(jlayers.softmax_cross_entropy(logits, jnp.array([1]))), 4)  # -log(3/4)
    0.2877
  """
  logits, labels, where = _validate(logits, labels, where)
  return _softmax_cross_entropy(logits, labels, where)


@jax.custom_vjp
def _softmax_cross_entropy(logits, labels, where):
  return _forward(logits, labels, where)[0]


def _forward(logits, labels, where):
  """Loss, the per-example row maximum ``m`` and ``log Σ exp(x - m)``.

  The log-sum-exp is kept as the two parts ``m + log_s`` and never added up: next to ``m`` of
  size 1e4, float32 would round ``m + log_s`` to steps of ~1e-3, and the loss and ``p`` with
  it, while ``x - m`` is exact. ``log_s`` is NaN for a valid example with a label out of range.
  """
  x = logits.astype(_checks.at_least_float32(logits.dtype))
  idx, in_range = _index(labels, x.shape[-1])
  m = jnp.max(x, axis=-1, keepdims=True)
  log_s = jnp.log(jnp.sum(jnp.exp(x - m), axis=-1))
  poisoned = ~in_range if where is None else where & ~in_range
  log_s = jnp.where(poisoned, jnp.full_like(log_s, jnp.nan), log_s)
  picked = jnp.take_along_axis(x - m, idx[..., None], axis=-1)[..., 0]
  per_example = log_s - picked
  if where is None:
    total = jnp.sum(per_example) / max(per_example.size, 1)
  else:
    total = (jnp.sum(jnp.where(where, per_example, jnp.zeros_like(per_example)))
             / jnp.maximum(jnp.sum(where).astype(x.dtype), 1))
  return total.astype(logits.dtype), m, log_s


def _softmax_cross_entropy_fwd(logits, labels, where):
  """Saves ``logits`` (an input), the row maximum ``m``, ``log_s``, ``labels`` and ``where``.

  The backward needs ``p = softmax(x)``. Saving ``p`` would add a new ``[..., C]`` buffer in
  float32 (twice the input for bfloat16 logits), written in the forward and read back in the
  backward. Saving the logits, which exist anyway, plus two floats per example (the two parts
  of the log-sum-exp, kept apart for precision) lets the backward rebuild
  ``p = exp((x - m) - log_s)`` inside the single elementwise pass that also forms
  ``p - onehot``: one exp per element instead of an extra ``[..., C]`` write and read. The
  residuals are differentiable functions of ``logits`` (no ``stop_gradient``), so the rule
  can be differentiated again.
  """
  loss, m, log_s = _forward(logits, labels, where)
  return loss, (logits, m, log_s, labels, where)


def _softmax_cross_entropy_bwd(res, g):
  r"""Backward of ``L = Σ_i w_i ℓ_i / n`` for the scalar cotangent ``g = ∂J/∂L``.

  Write :math:`p_i = \mathrm{softmax}(x_i)`, :math:`e_i` the one-hot vector of :math:`y_i`
  and :math:`n = \max(\sum_i w_i, 1)`.

  1. The loss of one example picks one entry of the log-softmax:
     :math:`\ell_i = -\sum_k e_{ik} \log p_{ik}`.
  2. Jacobian of log-softmax, from :math:`\log p_{ik} = x_{ik} - \mathrm{lse}(x_i)` and
     :math:`∂\,\mathrm{lse}(x_i)/∂x_{ij} = e^{x_{ij}} / \sum_l e^{x_{il}} = p_{ij}`:

     .. math:: \frac{∂ \log p_{ik}}{∂ x_{ij}} = δ_{kj} - p_{ij}

  3. Chain rule:

     .. math::
       \frac{∂ \ell_i}{∂ x_{ij}} = -\sum_k e_{ik} (δ_{kj} - p_{ij})
                                 = -e_{ij} + p_{ij} \sum_k e_{ik} = p_{ij} - e_{ij}

     The sum collapses because :math:`δ_{kj}` keeps only :math:`k = j`, and the second term
     does not depend on :math:`k` while :math:`\sum_k e_{ik} = 1` (one label per example).
  4. Examples do not interact (:math:`∂\ell_i/∂x_{i'j} = 0` for :math:`i' \ne i`) and ``n``
     depends on the mask only, so

     .. math:: \frac{∂J}{∂x_{ij}} = g \, \frac{w_i}{n} \, (p_{ij} - e_{ij})

  ``p`` is rebuilt as ``exp((x - m) - log_s)``; a valid example with a label out of range has
  ``log_s = NaN`` and so a NaN row. Masked-out rows are selected to 0 rather than multiplied by
  0, so non-finite logits in padding never leak into the gradient. ``labels`` and ``where``
  are not differentiable and get ``None``.
  """
  logits, m, log_s, labels, where = res
  x = logits.astype(m.dtype)
  p = jnp.exp((x - m) - log_s[..., None])
  idx, _ = _index(labels, x.shape[-1])
  onehot = (idx[..., None] == lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)).astype(x.dtype)
  if where is None:
    scale = g.astype(x.dtype) / max(log_s.size, 1)
    dx = (p - onehot) * scale
  else:
    scale = g.astype(x.dtype) / jnp.maximum(jnp.sum(where).astype(x.dtype), 1)
    dx = jnp.where(where[..., None], (p - onehot) * scale, jnp.zeros_like(x))
  return dx.astype(logits.dtype), None, None


_softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)


def softmax_cross_entropy_reference(logits: jax.Array, labels: jax.Array, *,
                                    where: jax.Array | None = None) -> jax.Array:
  """Autodiff twin of :func:`softmax_cross_entropy`: same signature, checks and conventions.

  Written with ``jax.nn.log_softmax`` and ``take_along_axis``. A valid example with a label out
  of range has its logits multiplied by NaN, so that autodiff, too, gives a NaN loss and a NaN
  gradient row; masked-out examples are dropped with a select.
  """
  logits, labels, where = _validate(logits, labels, where)
  x = logits.astype(_checks.at_least_float32(logits.dtype))
  idx, in_range = _index(labels, x.shape[-1])
  ok = in_range if where is None else in_range | ~where
  poison = jnp.where(ok, jnp.ones_like(ok, x.dtype), jnp.full_like(ok, jnp.nan, x.dtype))
  log_p = jax.nn.log_softmax(x * poison[..., None], axis=-1)
  nll = -jnp.take_along_axis(log_p, idx[..., None], axis=-1)[..., 0]
  if where is None:
    total = jnp.sum(nll) / max(nll.size, 1)
  else:
    total = (jnp.sum(jnp.where(where, nll, jnp.zeros_like(nll)))
             / jnp.maximum(jnp.sum(where).astype(x.dtype), 1))
  return total.astype(logits.dtype)
