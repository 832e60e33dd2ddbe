"""Grids for ``layer_norm``, ``rms_norm`` and ``group_norm``: normalised axes (one, several,
not last), with and without scale and offset, eps, group counts, channel axes."""

import jax.numpy as jnp

from jlayers.normalization import group_norm_op, layer_norm_op, rms_norm_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _ident(shape, axis):
  ax = "".join(map(str, axis)) if isinstance(axis, tuple) else str(axis)
  return f"{'x'.join(map(str, shape))}-axis{ax}"


def _layer_case(shape, axis=-1, *, params=("scale", "offset"), eps=None, rms=False):
  """``x`` of ``shape`` (off-centre, so the mean matters), params shaped like the normalised
  axes; ``params`` names those passed (the others are None)."""
  axes = axis if isinstance(axis, tuple) else (axis,)
  pshape = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))

  def make(rng, dtype):
    x = normal(rng, shape, dtype, scale=2.0) + jnp.asarray(0.5, dtype)
    scale = normal(rng, pshape, dtype) + jnp.asarray(1.0, dtype) if "scale" in params else None
    if rms:
      return (x, scale)
    return (x, scale, normal(rng, pshape, dtype) if "offset" in params else None)

  n_args = 2 if rms else 3
  named = ("scale", "offset")[:n_args - 1]
  diff = (0, *(1 + i for i, p in enumerate(named) if p in params))
  kwargs = {"axis": axis} if eps is None else {"axis": axis, "eps": eps}
  suffix = "" if set(named) <= set(params) else "-" + ("noparams" if not params else
                                                       "only" + "".join(params))
  suffix += "" if eps is None else f"-eps{eps:g}"
  return Case(_ident(shape, axis) + suffix, make, kwargs, diff=diff)


def _group_case(shape, groups, axis=-1, eps=None):
  c = shape[axis]

  def make(rng, dtype):
    x = normal(rng, shape, dtype, scale=2.0) + jnp.asarray(0.5, dtype)
    return x, normal(rng, (c,), dtype) + jnp.asarray(1.0, dtype), normal(rng, (c,), dtype)

  kwargs = {"groups": groups, "axis": axis}
  if eps is not None:
    kwargs["eps"] = eps
  return Case(f"{_ident(shape, axis)}-g{groups}" + ("" if eps is None else f"-eps{eps:g}"),
              make, kwargs, diff=(0, 1, 2))


def _bench(shape, n_params, suffix="", **kwargs):
  def make(rng, dtype):
    x = normal(rng, shape, dtype)
    return (x, *(normal(rng, shape[-1:], dtype) for _ in range(n_params)))
  return Case("x".join(map(str, shape)) + suffix, make, kwargs, diff=tuple(range(n_params + 1)))


_TRANSFORMER = (16, 512, 768)

GRIDS = [
    Grid(
        layer_norm_op,
        (_layer_case((2, 3, 8)), _layer_case((5,)), _layer_case((2, 3, 4), 1),
         _layer_case((2, 3, 4), (1, 2)), _layer_case((3, 6), params=()),
         _layer_case((3, 6), params=("scale",)), _layer_case((4, 1, 6), -1, eps=0.5),
         _layer_case((3, 1))),
        representative=("2x3x8-axis-1", "2x3x4-axis12"),
        bench=(_bench(_TRANSFORMER, 2),),
        mesh=(_layer_case((MESH_BATCH, 3, 8)),),
        layouts=(Layout("fsdp", _layer_case((MESH_BATCH, 3, 8)),
                        (("data",), ("data",), ("data",)), gathered=(1, 2), out=("data",)),
                 Layout("model", _layer_case((MESH_BATCH, 3, 8)),
                        (("data", None, "model"), ("model",), ("model",)),
                        out=("data", None, "model"))),
    ),
    Grid(
        rms_norm_op,
        (_layer_case((2, 3, 8), rms=True), _layer_case((5,), rms=True),
         _layer_case((2, 3, 4), (0, 2), rms=True), _layer_case((3, 6), params=(), rms=True),
         _layer_case((4, 6), eps=0.5, rms=True)),
        representative=("2x3x8-axis-1",),
        bench=(_bench(_TRANSFORMER, 1),),
        mesh=(_layer_case((MESH_BATCH, 8), rms=True),),
        layouts=(Layout("fsdp", _layer_case((MESH_BATCH, 3, 8), rms=True),
                        (("data",), ("data",)), gathered=(1,), out=("data",)),
                 Layout("scale-split", _layer_case((MESH_BATCH, 3, 8), rms=True),
                        (("data",), ("model",)), gathered=(1,), out=("data",))),
    ),
    Grid(
        group_norm_op,
        (_group_case((2, 3, 3, 6), 2), _group_case((2, 3, 3, 6), 1),
         _group_case((2, 3, 3, 6), 6), _group_case((2, 4, 3, 3), 2, axis=1),
         _group_case((3, 12), 4), _group_case((2, 5, 4), 2, eps=0.5)),
        representative=("2x3x3x6-axis-1-g2",),
        bench=(_bench(_TRANSFORMER, 2, "-g32", groups=32),),
        mesh=(_group_case((MESH_BATCH, 3, 3, 4), 2),),
        layouts=(Layout("fsdp", _group_case((MESH_BATCH, 3, 3, 4), 2),
                        (("data",), ("data",), ("data",)), gathered=(1, 2), out=("data",)),),
    ),
]
