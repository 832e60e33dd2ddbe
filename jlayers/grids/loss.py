"""Grids for ``softmax_cross_entropy_with_integer_labels`` (:mod:`jlayers.loss`) and
``softmax_cross_entropy`` (:mod:`jlayers.loss_soft_labels`), which share their masks: class
axis, leading shapes, class counts, both shapes of ``where``, label smoothing.

Integer labels are drawn in range and are always int32, whatever float dtype the case is built
in; probability labels are a softmax of normal draws (or one-hot, or not normalised) in the
case's dtype. Masks are fixed per shape and passed as the ``where`` keyword: an example mask
drops every third example; a class mask allows about two classes in three, varying along the
examples, and masks every class of the second example.
"""

import jax.numpy as jnp
import numpy as np

from jlayers.loss import softmax_cross_entropy_with_integer_labels_op
from jlayers.loss_soft_labels import softmax_cross_entropy_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _examples(shape, axis):
  return shape[:axis % len(shape)] + shape[axis % len(shape) + 1:]


def _where(shape, axis, kind):
  """``None``, an example mask (``"where"``) or a class mask (``"classmask"``)."""
  lead = _examples(shape, axis)
  count = int(np.prod(lead, dtype=int))
  if kind == "where":
    return (np.arange(count) % 3 != 2).reshape(lead)
  if kind == "classmask":
    classes = shape[axis]
    k, j = np.meshgrid(np.arange(count), np.arange(classes), indexing="ij")
    allowed = (k + j) % 3 != 0
    if count > 2:
      allowed[1] = False
    return np.moveaxis(allowed.reshape(*lead, classes), -1, axis % len(shape))
  return None


def _case_id(shape, axis, kind, suffix=""):
  parts = ["x".join(map(str, shape))]
  if axis != -1:
    parts.append(f"axis{axis}")
  if kind:
    parts.append(kind)
  if suffix:
    parts.append(suffix)
  return "-".join(parts)


def _int_case(shape, axis=-1, kind=None, smoothing=0.0):
  """Logits ``shape`` (classes on ``axis``) and int32 labels; both batched on axis 0."""
  def make(rng, dtype):
    return (normal(rng, shape, dtype),
            jnp.asarray(rng.integers(0, shape[axis], _examples(shape, axis)), dtype=jnp.int32))

  kwargs = {} if axis == -1 else {"axis": axis}
  if kind:
    kwargs["where"] = _where(shape, axis, kind)
  if smoothing:
    kwargs["label_smoothing"] = smoothing
  return Case(_case_id(shape, axis, kind, f"ls{smoothing:g}" if smoothing else ""), make,
              kwargs=kwargs, diff=(0,), batched=(0, 1))


def _labels(rng, shape, axis, dtype, form):
  if form == "onehot":
    hot = rng.integers(0, shape[axis], _examples(shape, axis))
    return jnp.asarray(np.moveaxis(np.eye(shape[axis])[hot], -1, axis % len(shape)), dtype)
  if form == "unnormalized":
    return jnp.asarray(rng.random(shape), dtype)
  e = np.exp(rng.standard_normal(shape))
  return jnp.asarray(e / e.sum(axis=axis, keepdims=True), dtype)


def _prob_case(shape, axis=-1, kind=None, form="softmax"):
  """Logits and probability labels of ``shape`` (classes on ``axis``); both differentiable
  and batched on axis 0."""
  def make(rng, dtype):
    return normal(rng, shape, dtype), _labels(rng, shape, axis, dtype, form)

  kwargs = {} if axis == -1 else {"axis": axis}
  if kind:
    kwargs["where"] = _where(shape, axis, kind)
  return Case(_case_id(shape, axis, kind, "" if form == "softmax" else form), make,
              kwargs=kwargs, diff=(0, 1), batched=(0, 1))


def _bench_int(rng, dtype):
  return (normal(rng, (128, 10), dtype),
          jnp.asarray(rng.integers(0, 10, (128,)), dtype=jnp.int32))


def _bench_prob(rng, dtype):
  return normal(rng, (128, 10), dtype), _labels(rng, (128, 10), -1, dtype, "softmax")


GRIDS = [
    Grid(
        softmax_cross_entropy_with_integer_labels_op,
        (_int_case((4, 5)), _int_case((4, 5), kind="where"),
         _int_case((4, 5), kind="classmask"), _int_case((4, 5), smoothing=0.1),
         _int_case((4, 5), kind="classmask", smoothing=0.1),
         _int_case((4, 5), kind="where", smoothing=1.0), _int_case((5,)), _int_case((3, 1)),
         _int_case((7, 2)), _int_case((2, 3, 5)), _int_case((2, 3, 5), kind="where"),
         _int_case((5, 4), axis=0),
         _int_case((2, 5, 3), axis=1, kind="classmask", smoothing=0.2)),
        representative=("4x5-classmask-ls0.1", "2x3x5-where"),
        bench=(Case("128x10", _bench_int),),
        layouts=(Layout("vocab", _int_case((MESH_BATCH, 2, 8), smoothing=0.1),
                        (("data", None, "model"), ("data",)), out=("data",)),),
        mesh=(_int_case((MESH_BATCH, 5)), _int_case((MESH_BATCH, 2, 5), smoothing=0.1),
              _int_case((MESH_BATCH, 5), kind="classmask")),
    ),
    Grid(
        softmax_cross_entropy_op,
        (_prob_case((4, 5)), _prob_case((4, 5), kind="where"),
         _prob_case((4, 5), kind="classmask"), _prob_case((4, 5), form="onehot"),
         _prob_case((4, 5), form="unnormalized"), _prob_case((5,)), _prob_case((3, 1)),
         _prob_case((7, 2)), _prob_case((2, 3, 5)), _prob_case((2, 3, 5), kind="where"),
         _prob_case((5, 4), axis=0), _prob_case((2, 5, 3), axis=1, kind="classmask")),
        representative=("4x5-classmask", "2x3x5-where"),
        bench=(Case("128x10", _bench_prob, diff=(0, 1), batched=(0, 1)),),
        layouts=(Layout("vocab", _prob_case((MESH_BATCH, 2, 8)),
                        (("data", None, "model"),) * 2, out=("data",)),),
        mesh=(_prob_case((MESH_BATCH, 5)), _prob_case((MESH_BATCH, 2, 5)),
              _prob_case((MESH_BATCH, 5), kind="where")),
    ),
]
