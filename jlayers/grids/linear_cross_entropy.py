"""Grid for ``linear_cross_entropy``: leading shapes (none, one, two axes), vocabularies of 1 to
7, the three reductions, a token mask, label smoothing, z-loss and the soft cap.

``x`` and ``w`` are differentiable; the int32 labels (drawn in range) are the third positional
argument, and the mask, fixed per shape (every third token dropped), is the ``where`` keyword.
The small cases fit in one block of tokens; ``tests/test_linear_cross_entropy.py`` shrinks the
block budget to run the same rule over many blocks.
"""

import jax.numpy as jnp
import numpy as np

from jlayers.linear_cross_entropy import linear_cross_entropy_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _case(lead, h, v, *, where=False, suffix="", **kwargs):
  def make(rng, dtype):
    return (normal(rng, (*lead, h), dtype), normal(rng, (h, v), dtype),
            jnp.asarray(rng.integers(0, v, lead), dtype=jnp.int32))

  if where:
    kwargs["where"] = (np.arange(int(np.prod(lead, dtype=int))) % 3 != 2).reshape(lead)
  parts = ["x".join(map(str, lead)) or "vec", f"{h}to{v}", *(["where"] if where else []),
           *([suffix] if suffix else []), kwargs.get("reduction", "none")]
  return Case("-".join(parts), make, kwargs=kwargs, diff=(0, 1), batched=(0, 2))


def _bench(n, h, v, reduction):
  def make(rng, dtype):
    return (normal(rng, (n, h), dtype), normal(rng, (h, v), dtype, scale=h**-0.5),
            jnp.asarray(rng.integers(0, v, (n,)), dtype=jnp.int32))

  return Case(f"{n}x{h}to{v}-{reduction}", make, {"reduction": reduction}, diff=(0, 1),
              batched=(0, 2))


_ALL = {"label_smoothing": 0.2, "z_loss": 0.05, "logits_soft_cap": 2.0}
GRIDS = [
    Grid(
        linear_cross_entropy_op,
        (_case((2, 3), 4, 7), _case((5,), 4, 6, where=True, reduction="mean"),
         _case((2, 3), 4, 7, where=True, suffix="all", **_ALL),
         _case((6,), 3, 5, suffix="all", reduction="sum", **_ALL),
         _case((), 4, 5, suffix="ls0.1", label_smoothing=0.1), _case((4,), 2, 1),
         _case((3, 2), 3, 4, where=True, suffix="z0.1", z_loss=0.1, reduction="mean")),
        representative=("2x3-4to7-where-all-none", "5-4to6-where-mean"),
        bench=(_bench(1024, 512, 8192, "mean"), _bench(1024, 512, 8192, "none")),
        layouts=(  # the vocabulary over model (w's columns), FSDP's rows over data
            Layout("vocab", _case((MESH_BATCH, 2), 4, 8, where=True, suffix="all", **_ALL),
                   (("data",), (None, "model"), ("data",)), out=("data",), explicit_only=True),
            Layout("vocab", _case((MESH_BATCH,), 4, 12, reduction="mean"),
                   (("data",), (None, "model"), ("data",)), explicit_only=True),
            Layout("fsdp", _case((MESH_BATCH,), 4, 12, reduction="sum"),
                   (("data",), ("data", None), ("data",)), gathered=(1,)),
        ),
        mesh=(_case((MESH_BATCH, 2), 4, 7, where=True, suffix="all", **_ALL),
              _case((MESH_BATCH,), 4, 6, reduction="mean"),
              _case((MESH_BATCH,), 4, 6, where=True, suffix="z0.1", z_loss=0.1,
                    reduction="sum")),
    ),
]
