"""Grids for ``swiglu`` and ``geglu`` (both forms): gate and up of a few ranks, rank 0
included, both differentiable."""

from jlayers.gated import geglu_op, swiglu_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal

_SHAPES = ((7,), (3, 5), (2, 3, 4), ())


def _case(shape, suffix="", **kwargs):
  def make(rng, dtype):
    return normal(rng, shape, dtype, scale=2.0), normal(rng, shape, dtype)

  ident = ("x".join(map(str, shape)) or "scalar") + suffix
  return Case(ident, make, kwargs, diff=(0, 1), batched=(0, 1))


_BENCH = (16, 512, 2048)

GRIDS = [
    Grid(
        swiglu_op,
        tuple(_case(s) for s in _SHAPES),
        representative=("2x3x4",),
        bench=(_case(_BENCH),),
        mesh=(_case((MESH_BATCH, 4, 3)),),
        layouts=(Layout("model", _case((MESH_BATCH, 3, 8)), (("data", None, "model"),) * 2,
                        out=("data", None, "model")),),
    ),
    Grid(
        geglu_op,
        tuple(_case(s, f"-{'tanh' if a else 'erf'}", approximate=a)
              for s in _SHAPES[:3] for a in (True, False)) + (_case((), "-tanh"),),
        representative=("3x5-tanh", "2x3x4-erf"),
        bench=(_case(_BENCH, "-tanh", approximate=True),
               _case(_BENCH, "-erf", approximate=False)),
        mesh=(_case((MESH_BATCH, 4, 3), "-tanh", approximate=True),
              _case((MESH_BATCH, 5), "-erf", approximate=False)),
    ),
]
