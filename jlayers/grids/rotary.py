"""Grid for ``rotary_embedding``: both pairings, a rotary part shorter than the head, positions
shared by the rows ``[T]`` and per row ``[B, T]`` (restarting, as in packed sequences), given
frequencies.

Positions are int32 whatever float dtype the case is built in; given frequencies are NumPy
float64 constants passed as the ``frequencies`` keyword (a scaled, Llama 3.1-like spectrum).
"""

import jax.numpy as jnp
import numpy as np

from jlayers.rotary import rotary_embedding_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _scaled_frequencies(r):
  """The default spectrum of ``R = r`` with its low frequencies divided by 8."""
  f = 10000.0 ** (-np.arange(0, r, 2) / r)
  return np.where(f < 0.05, f / 8.0, f)


def _case(b, t, n, h, *, per_row=False, suffix="", **kwargs):
  def make(rng, dtype):
    x = normal(rng, (b, t, n, h), dtype)
    if per_row:  # each row a packed pair of sequences: positions restart at a random token
      starts = rng.integers(1, t, b)
      positions = np.where(np.arange(t) < starts[:, None], np.arange(t),
                           np.arange(t) - starts[:, None])
    else:
      positions = rng.integers(0, 300, t)
    return x, jnp.asarray(positions, jnp.int32)

  ident = f"b{b}t{t}n{n}h{h}" + ("-bt" if per_row else "") + suffix
  return Case(ident, make, kwargs, diff=(0,), batched=(0, 1) if per_row else (0,))


GRIDS = [
    Grid(
        rotary_embedding_op,
        (_case(2, 5, 3, 8),
         _case(2, 5, 3, 8, suffix="-interleaved", interleaved=True),
         _case(2, 4, 2, 10, per_row=True, suffix="-rot6", rotary_dim=6),
         _case(2, 4, 2, 10, per_row=True, suffix="-rot4-interleaved", rotary_dim=4,
               interleaved=True),
         _case(1, 6, 2, 8, suffix="-freqs-base500", base=500.0,
               frequencies=_scaled_frequencies(8)),
         _case(3, 1, 1, 2)),
        representative=("b2t4n2h10-bt-rot6", "b1t6n2h8-freqs-base500"),
        bench=(Case("16x512x8x64",
                    lambda rng, dtype: (normal(rng, (16, 512, 8, 64), dtype),
                                        jnp.arange(512, dtype=jnp.int32))),),
        layouts=(Layout("heads", _case(MESH_BATCH, 3, 4, 6), (("data", None, "model"), ()),
                        out=("data", None, "model")),),
        mesh=(_case(MESH_BATCH, 3, 2, 6),
              _case(MESH_BATCH, 4, 2, 8, per_row=True, suffix="-rot4-interleaved",
                    rotary_dim=4, interleaved=True)),
    ),
]
