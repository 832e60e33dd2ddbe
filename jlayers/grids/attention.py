"""Grid for ``dot_product_attention``: multi-head, grouped-query and multi-query heads,
``T ≠ S``, causal, masks of every broadcast shape (with fully masked rows), a given scale, and
sequences longer than one block (64 positions up to 512, 128 beyond) that are no multiple of
it, so that the block loop, its causal skipping and its padding run.

Masks are fixed per case (a NumPy generator seeded by the case) and passed as the ``mask``
keyword.
"""

import numpy as np

from jlayers.attention import dot_product_attention_op
from jlayers.testing import MESH_BATCH, Case, Grid, normal


def _mask(shape, seed, density=0.6, empty_row=False):
  m = np.random.default_rng(seed).random(shape) < density
  if empty_row:  # query row 1 sees no key (in the first batch and head)
    m[0, 0, 1, :] = False
  return m


def _case(b, t, n, s, k, h, *, causal=False, mask=None, scale=None, suffix=""):
  kwargs = {}
  if causal:
    kwargs["causal"] = True
  if mask is not None:
    kwargs["mask"] = mask
  if scale is not None:
    kwargs["scale"] = scale

  def make(rng, dtype):
    return (normal(rng, (b, t, n, h), dtype), normal(rng, (b, s, k, h), dtype),
            normal(rng, (b, s, k, h), dtype))

  heads = "mha" if n == k else ("mqa" if k == 1 else "gqa")
  ident = f"{heads}-b{b}t{t}n{n}s{s}k{k}h{h}" + ("-causal" if causal else "") + suffix
  return Case(ident, make, kwargs, diff=(0, 1, 2), batched=(0, 1, 2))


def _bench(t, causal):
  def make(rng, dtype):
    return tuple(normal(rng, (4, t, 8, 64), dtype) for _ in range(3))
  return Case(f"4x{t}x8x64" + ("-causal" if causal else ""), make,
              {"causal": True} if causal else {}, diff=(0, 1, 2), batched=(0, 1, 2))


GRIDS = [
    Grid(
        dot_product_attention_op,
        (_case(2, 5, 2, 7, 2, 3),
         _case(2, 5, 4, 7, 2, 3, causal=True),
         _case(2, 7, 4, 5, 2, 3, causal=True),
         _case(1, 6, 4, 6, 1, 4, mask=_mask((1, 1, 6, 6), 0), suffix="-mask11ts"),
         _case(2, 4, 4, 5, 2, 3, mask=_mask((2, 4, 4, 5), 1, empty_row=True),
               suffix="-maskfull-emptyrow"),
         _case(2, 3, 2, 4, 2, 2, causal=True, mask=_mask((2, 1, 1, 4), 2, 0.7), scale=0.7,
               suffix="-maskb11s-scale"),
         _case(1, 150, 2, 140, 1, 2, causal=True, suffix="-blocks"),
         _case(1, 130, 2, 200, 2, 2, mask=_mask((1, 2, 130, 1), 3, 0.8), suffix="-blocks-mask"),
         _case(1, 1, 1, 1, 1, 2)),
        representative=("gqa-b2t4n4s5k2h3-maskfull-emptyrow",
                        "mqa-b1t150n2s140k1h2-causal-blocks"),
        bench=(_bench(512, False), _bench(512, True), _bench(2048, False), _bench(2048, True)),
        mesh=(_case(MESH_BATCH, 130, 4, 140, 2, 2, causal=True, suffix="-blocks"),
              _case(MESH_BATCH, 4, 2, 5, 2, 2, mask=_mask((MESH_BATCH, 1, 1, 5), 4, 0.7),
                    suffix="-keymask")),
    ),
]
