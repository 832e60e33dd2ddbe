"""Grids for ``relu`` (values kept off the kink: it has its own test), ``gelu`` (both forms)
and ``silu``: shapes of several ranks."""

from jlayers.activation import gelu_op, relu_op, silu_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, away_from_zero, normal

_SHAPES = ((7,), (3, 5), (2, 3, 4), (2, 4, 4, 3), (1, 1))


def _case(shape, draw=away_from_zero, suffix="", **kwargs):
  return Case("x".join(map(str, shape)) + suffix,
              lambda rng, dtype: (draw(rng, shape, dtype, scale=2.0) if draw is normal
                                  else draw(rng, shape, dtype),), kwargs)


def _bench(shapes, draw=away_from_zero, suffix="", **kwargs):
  return tuple(Case("x".join(map(str, s)) + suffix,
                    lambda rng, dtype, s=s: (draw(rng, s, dtype),), kwargs) for s in shapes)


GRIDS = [
    Grid(
        relu_op,
        tuple(_case(s) for s in _SHAPES),
        bench=_bench(((128, 28, 28, 32), (128, 14, 14, 64))),
        mesh=(_case((MESH_BATCH, 4, 3)),),
        layouts=(Layout("model", _case((MESH_BATCH, 3, 8)), (("data", None, "model"),),
                        out=("data", None, "model")),),
    ),
    Grid(
        gelu_op,
        tuple(_case(s, normal, f"-{'tanh' if a else 'erf'}", approximate=a)
              for s in _SHAPES for a in (True, False)),
        representative=("3x5-tanh", "2x4x4x3-erf"),
        bench=(*_bench(((16, 512, 768),), normal, "-tanh", approximate=True),
               *_bench(((16, 512, 768),), normal, "-erf", approximate=False)),
        mesh=(_case((MESH_BATCH, 4, 3), normal, "-tanh", approximate=True),
              _case((MESH_BATCH, 5), normal, "-erf", approximate=False)),
        layouts=(Layout("model", _case((MESH_BATCH, 3, 8), normal, "-tanh", approximate=True),
                        (("data", None, "model"),), out=("data", None, "model")),),
    ),
    Grid(
        silu_op,
        tuple(_case(s, normal) for s in _SHAPES),
        representative=("2x3x4",),
        bench=_bench(((16, 512, 768),), normal),
        mesh=(_case((MESH_BATCH, 4, 3), normal),),
        layouts=(Layout("model", _case((MESH_BATCH, 3, 8), normal), (("data", None, "model"),),
                        out=("data", None, "model")),),
    ),
]
