"""Grid for ``linear``: leading-dimension counts, sizes, with and without bias."""

import dataclasses
import itertools

from jax.sharding import PartitionSpec as P

from jlayers.linear import linear_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _case(lead, n_in, n_out, bias):
  def make(rng, dtype):
    args = (normal(rng, (*lead, n_in), dtype), normal(rng, (n_in, n_out), dtype))
    return (*args, normal(rng, (n_out,), dtype)) if bias else args

  lead_id = "x".join(map(str, lead)) or "vec"
  return Case(f"{lead_id}-{n_in}to{n_out}-{'bias' if bias else 'nobias'}", make,
              diff=(0, 1, 2) if bias else (0, 1))


_LEADS = ((), (5,), (2, 3), (2, 1, 3))
_SIZES = ((4, 3), (1, 6), (7, 1))
GRIDS = [
    Grid(
        linear_op,
        tuple(_case(lead, i, o, bias)
              for lead, (i, o), bias in itertools.product(_LEADS, _SIZES, (True, False))),
        representative=("2x3-4to3-bias", "vec-4to3-nobias"),
        bench=(Case("1024x1024", lambda rng, dtype: (normal(rng, (1024, 1024), dtype),
                                                      normal(rng, (1024, 1024), dtype),
                                                      normal(rng, (1024,), dtype)),
                    diff=(0, 1, 2)),),
        mesh=(_case((MESH_BATCH,), 5, 3, True), _case((MESH_BATCH, 2), 5, 3, False)),
        layouts=(
            Layout("fsdp", _case((MESH_BATCH, 2), 8, 12, True),
                   (("data",), ("data", None), ("data",)), gathered=(1, 2), out=("data",)),
            Layout("column", _case((MESH_BATCH,), 8, 12, True),
                   (("data",), (None, "model"), ("model",)), out=("data", "model")),
            Layout("row", _case((MESH_BATCH, 2), 8, 12, False),
                   (("data", None, "model"), ("model", None)), out=("data",)),
            Layout("row-scatter", dataclasses.replace(
                _case((MESH_BATCH,), 8, 12, True), kwargs={"out_sharding": P("data", "model")}),
                   (("data", "model"), ("model", None), (None,)), out=("data", "model")),
        ),
    ),
]
