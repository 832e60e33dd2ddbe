"""Grids for ``batch_norm`` and ``batch_norm_inference``: feature axes, ranks, eps."""

import jax.numpy as jnp

from jlayers.batch_norm import batch_norm_inference_op, batch_norm_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal

# (x shape, feature axis)
_LAYOUTS = (((6, 3), -1), ((6, 3), 0), ((2, 4, 4, 3), -1), ((2, 3, 4, 5), 1),
            ((3, 5, 2), 1), ((1, 4), -1), ((2, 3, 3, 4), 3))


def _train_case(shape, axis, eps):
  c = shape[axis]

  def make(rng, dtype):
    x = normal(rng, shape, dtype, scale=2.0) + jnp.asarray(0.5, dtype)
    return x, normal(rng, (c,), dtype) + jnp.asarray(1.0, dtype), normal(rng, (c,), dtype)

  return Case(f"{'x'.join(map(str, shape))}-axis{axis}-eps{eps:g}", make,
              {"axis": axis, "eps": eps}, diff=(0, 1, 2))


def _inference_case(shape, axis):
  c = shape[axis]

  def make(rng, dtype):
    x = normal(rng, shape, dtype, scale=2.0)
    var = jnp.asarray(rng.uniform(0.5, 2.0, c), dtype)
    return x, normal(rng, (c,), dtype), normal(rng, (c,), dtype), normal(rng, (c,), dtype), var

  return Case(f"{'x'.join(map(str, shape))}-axis{axis}", make, {"axis": axis},
              diff=(0, 1, 2, 3, 4))


def _bench(shape):
  def make(rng, dtype):
    return (normal(rng, shape, dtype), normal(rng, shape[-1:], dtype),
            normal(rng, shape[-1:], dtype))
  return make


_BENCH_SHAPES = ((64, 32, 32, 64), (128, 28, 28, 32), (128, 14, 14, 64))


GRIDS = [
    Grid(
        batch_norm_op,
        tuple(_train_case(s, a, e) for s, a in _LAYOUTS for e in (1e-5, 0.1)),
        representative=("6x3-axis-1-eps1e-05", "2x3x4x5-axis1-eps0.1"),
        bench=tuple(Case("x".join(map(str, s)), _bench(s), diff=(0, 1, 2))
                    for s in _BENCH_SHAPES),
        mesh=(_train_case((MESH_BATCH, 3, 3, 4), -1, 1e-5), _train_case((MESH_BATCH, 4, 5), 1, 0.1)),
        layouts=(Layout("fsdp", _train_case((MESH_BATCH, 3, 3, 4), -1, 1e-5),
                        (("data",), ("data",), ("data",)), gathered=(1, 2), out=("data",)),),
    ),
    Grid(
        batch_norm_inference_op,
        tuple(_inference_case(s, a) for s, a in _LAYOUTS),
        representative=("2x3x4x5-axis1",),
        bench=(Case("64x32x32x64", lambda rng, dtype: (*_bench(_BENCH_SHAPES[0])(rng, dtype),
                                                       normal(rng, (64,), dtype),
                                                       jnp.ones((64,), dtype)),
                    diff=(0, 1, 2, 3, 4)),),
        mesh=(_inference_case((MESH_BATCH, 3, 3, 4), -1),),
    ),
]
