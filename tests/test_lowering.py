"""Every op lowers for the accelerators, from this CPU-only machine: the manual rule's value and
gradient for each case of its grid, traced once and lowered for ``cuda``, ``rocm`` and ``tpu``
one platform at a time (``jax.jit(f).trace(...).lower(lowering_platforms=(p,))``, which needs
no device of that kind). A rule with a formulation per platform lowers its native branch there
(``jax.lax.platform_dependent``). An op or case that cannot lower for a platform fails here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlayers import testing
from jlayers.grids import GRIDS

PLATFORMS = ("cuda", "rocm", "tpu")


@functools.cache
def _traced(name: str, dtype: str) -> list:
  """The traced value-and-gradient of every case of ``name``'s grid (float32), or of its
  representative cases (half precision): traced once, lowered per platform."""
  grid = GRIDS[name]
  cases = grid.cases if dtype == "float32" else grid.representative_cases
  traced = []
  for case in cases:
    args = case.make(np.random.default_rng(0), jnp.dtype(dtype))
    primals = tuple(args[i] for i in case.diff)
    fn = testing.restrict(grid.manual, case, args)

    def value_and_grad(*primals, fn=fn):
      out, pullback = jax.vjp(fn, *primals)
      return out, pullback(jax.tree.map(jnp.ones_like, out))

    traced.append((case.id, jax.jit(value_and_grad).trace(*primals)))
  return traced


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_every_case_lowers_for_the_accelerator(name, platform):
  for case_id, traced in _traced(name, "float32"):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "func.func public @main" in text, (case_id, platform)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_representative_cases_lower_in_bfloat16(name, platform):
  for case_id, traced in _traced(name, "bfloat16"):
    traced.lower(lowering_platforms=(platform,))
