"""Grid for ``embedding``: ids of rank 0 to 3, many duplicates (``V`` smaller than the number
of ids), ``V = 1``, ``F = 1``, int16 and uint8 ids (the uint8 ones into a table of more rows
than uint8 can name).

Ids are drawn in range (ids out of range give NaN rows: their own tests), in int32 unless the
case says otherwise, whatever float dtype the case is built in; only the table is
differentiable, and the ids' axis 0 is the batch.
"""

import jax.numpy as jnp

from jlayers.embedding import embedding_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _case(ids_shape, num, features, ids_dtype=jnp.int32, suffix=""):
  """Ids of ``ids_shape`` drawn uniformly from the rows ``uint8``/... can name, into a
  normal ``[num, features]`` table."""
  top = min(num, int(jnp.iinfo(ids_dtype).max) + 1)

  def make(rng, dtype):
    return (jnp.asarray(rng.integers(0, top, ids_shape), dtype=ids_dtype),
            normal(rng, (num, features), dtype))

  shape = "x".join(map(str, ids_shape)) or "scalar"
  return Case(f"{shape}-v{num}f{features}{suffix}", make, diff=(1,), batched=(0,))


GRIDS = [
    Grid(
        embedding_op,
        (_case((), 5, 3), _case((7,), 10, 4), _case((3, 4), 6, 5),
         _case((2, 6, 4), 3, 2, suffix="-dup"), _case((9,), 1, 3), _case((6,), 4, 1),
         _case((4, 5), 9, 3, jnp.int16, "-int16"), _case((3, 7), 300, 2, jnp.uint8, "-uint8")),
        representative=("2x6x4-v3f2-dup", "3x7-v300f2-uint8"),
        bench=(_case((16, 512), 50_000, 768),),
        mesh=(_case((MESH_BATCH, 5), 7, 3),),
        layouts=(
            Layout("vocab", _case((MESH_BATCH, 5), 16, 6), (("data",), ("model", None)),
                   out=("data",)),
            Layout("fsdp", _case((MESH_BATCH, 5), 16, 6), (("data",), (None, "data")),
                   gathered=(1,), out=("data",)),
        ),
    ),
]
