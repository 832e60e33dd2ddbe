"""Grid for ``dropout``: shapes, rates (Python and array), shared-mask axes, both key kinds."""

import itertools

import jax
import jax.numpy as jnp

from jlayers.dropout import dropout_op
from jlayers.testing import MESH_BATCH, Case, Grid, normal

_SHAPES = ((8,), (3, 5), (2, 4, 4, 3))
_RATES = (0.0, 0.1, 0.5, 0.9, "array")
_BROADCAST = {1: ((), (0,)), 2: ((), (0,)), 4: ((), (1, 2))}


def _case(shape, rate, dims, raw_key):
  def make(rng, dtype):
    seed = int(rng.integers(2**31))
    key = jax.random.PRNGKey(seed) if raw_key else jax.random.key(seed)
    return normal(rng, shape, dtype), key

  kwargs = {"rate": jnp.float32(0.3) if rate == "array" else rate, "broadcast_dims": dims}
  ident = (f"{'x'.join(map(str, shape))}-p{rate}-bcast{''.join(map(str, dims)) or 'none'}-"
           f"{'rawkey' if raw_key else 'key'}")
  return Case(ident, make, kwargs)


GRIDS = [
    Grid(
        dropout_op,
        tuple(_case(shape, rate, dims, raw)
              for shape, rate, raw in itertools.product(_SHAPES, _RATES, (False, True))
              for dims in _BROADCAST[len(shape)]
              if not (raw and rate in (0.0, 0.9))),
        representative=("3x5-p0.5-bcastnone-key", "2x4x4x3-parray-bcast12-rawkey"),
        bench=tuple(Case(f"{'x'.join(map(str, s))}-p0.5",
                         lambda rng, dtype, s=s: (normal(rng, s, dtype), jax.random.key(0)),
                         {"rate": 0.5}) for s in ((128, 28, 28, 32), (128, 14, 14, 64))),
        mesh=(_case((MESH_BATCH, 6), 0.5, (), False),
              _case((MESH_BATCH, 4, 4, 3), "array", (1, 2), True)),
    ),
]
