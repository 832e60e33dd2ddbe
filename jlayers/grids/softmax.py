"""Grids for ``softmax`` and ``log_softmax``: ranks 1 to 4, the last, a middle, a negative and a
tuple of axes, and ``where`` of ``x``'s shape, broadcast (size-1 dimensions) and with a fully
masked row. Masks are fixed per shape and passed as numpy arrays in the ``where`` keyword.
(Masked log-probabilities are ``-inf`` in the rule and the twin alike, which the comparison
counts as agreement.)
"""

import numpy as np

from jlayers.softmax import log_softmax_op, softmax_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _mask(x_shape, kind, shape=None):
  """A bool mask of ``shape`` (default ``x_shape``): ``"pattern"`` allows about two entries in
  three; ``"row"`` also masks every entry of index 0 on axis 0 (a fully masked row for any
  reduced axes that exclude axis 0)."""
  shape = x_shape if shape is None else shape
  allowed = (np.arange(int(np.prod(shape))).reshape(shape) % 3 != 1)
  if kind == "row":
    allowed[0] = False
  return allowed


def _case(shape, axis=-1, where=None, *, scale=2.0):
  parts = ["x".join(map(str, shape))]
  kwargs = {}
  if axis != -1:
    parts.append("axis" + ",".join(map(str, axis if isinstance(axis, tuple) else (axis,))))
    kwargs["axis"] = axis
  if where is not None:
    parts.append("where" + ("" if where.shape == shape else "x".join(map(str, where.shape))))
    kwargs["where"] = where
  return Case("-".join(parts), lambda rng, dtype: (normal(rng, shape, dtype, scale=scale),),
              kwargs)


def _cases():
  return (
      _case((7,)),
      _case((3, 5)),
      _case((3, 4, 5), axis=1),
      _case((2, 3, 4), axis=-2),
      _case((2, 3, 2, 4), axis=(1, 3)),
      _case((4, 6), where=_mask((4, 6), "pattern")),
      _case((2, 3, 4, 5), where=_mask((2, 3, 4, 5), "pattern", (2, 1, 4, 5))),
      _case((3, 4, 5), axis=(1, 2), where=_mask((3, 4, 5), "row")),
  )


def _mesh(kind):
  shape = (MESH_BATCH, 3, 5)
  return _case(shape, where=_mask(shape, kind, (MESH_BATCH, 1, 5)))


_BENCH = (_case((16, 512, 768), scale=1.0),)

GRIDS = [
    Grid(softmax_op, _cases(),
         representative=("2x3x4x5-where2x1x4x5", "3x4x5-axis1,2-where"),
         bench=_BENCH, mesh=(_mesh("row"),),
         layouts=(Layout("vocab", _case((MESH_BATCH, 2, 8)), (("data", None, "model"),),
                         out=("data", None, "model")),)),
    Grid(log_softmax_op, _cases(),
         representative=("2x3x4x5-where2x1x4x5", "3x4x5-axis1,2-where"),
         bench=_BENCH, mesh=(_mesh("pattern"),),
         layouts=(Layout("vocab", _case((MESH_BATCH, 2, 8)), (("data", None, "model"),),
                         out=("data", None, "model")),)),
]
