"""Grid for ``relu``: shapes of several ranks, values kept off the kink (it has its own test)."""

from jlayers.activation import relu, relu_reference
from jlayers.testing import MESH_BATCH, Case, OpSpec, away_from_zero


def _case(shape):
  return Case("x".join(map(str, shape)), lambda rng, dtype: (away_from_zero(rng, shape, dtype),))


SPECS = [
    OpSpec(
        "relu", relu, relu_reference,
        tuple(_case(s) for s in ((7,), (3, 5), (2, 3, 4), (2, 4, 4, 3), (1, 1))),
        bench=tuple(Case("x".join(map(str, s)),
                         lambda rng, dtype, s=s: (away_from_zero(rng, s, dtype),))
                    for s in ((128, 28, 28, 32), (128, 14, 14, 64))),
        mesh=(_case((MESH_BATCH, 4, 3)),),
    ),
]
