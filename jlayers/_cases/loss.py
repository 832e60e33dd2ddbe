"""Grid for ``softmax_cross_entropy``: batch shapes, class counts, with and without a mask.

Labels are drawn in range and are always int32, whatever float dtype the case is built in.
The mask is fixed per shape (every third example invalid) and passed as the ``where`` keyword.
"""

import jax.numpy as jnp
import numpy as np

from jlayers.loss import softmax_cross_entropy, softmax_cross_entropy_reference
from jlayers.registry import MESH_BATCH, Case, OpSpec, normal


def _mask(lead):
  """Every third example masked out; at least one example stays valid."""
  return (np.arange(int(np.prod(lead, dtype=int))) % 3 != 2).reshape(lead)


def _case(lead, classes, masked):
  """Logits ``[*lead, classes]`` and int32 labels ``lead``; both batched on axis 0."""
  def make(rng, dtype):
    return (normal(rng, (*lead, classes), dtype),
            jnp.asarray(rng.integers(0, classes, lead), dtype=jnp.int32))

  lead_id = "x".join(map(str, lead)) or "vec"
  return Case(f"{lead_id}-c{classes}{'-where' if masked else ''}", make,
              kwargs={"where": _mask(lead)} if masked else {}, diff=(0,), batched=(0, 1))


_GRID = (
    ((4,), 5, True), ((1,), 2, False), ((4,), 5, False), ((7,), 10, False), ((4,), 10, False),
    ((7,), 2, False), ((7,), 10, True), ((2, 3), 5, False), ((2, 3), 5, True), ((), 5, False),
)
SPECS = [
    OpSpec(
        "softmax_cross_entropy", softmax_cross_entropy, softmax_cross_entropy_reference,
        tuple(_case(*c) for c in _GRID),
        representative=("4-c5-where", "2x3-c5"),
        bench=(Case("128x10", lambda rng, dtype: (
            normal(rng, (128, 10), dtype),
            jnp.asarray(rng.integers(0, 10, (128,)), dtype=jnp.int32))),),
        mesh=(_case((MESH_BATCH,), 5, False), _case((MESH_BATCH, 2), 5, False)),
    ),
]
