"""The configuration grids of jlayers' own ops: one :class:`~jlayers.testing.Grid` per op.

Each op module declares its op (``linear_op`` in :mod:`jlayers.linear`) and a grid module
here, named after the op's module (``jlayers/grids/linear.py``), lists that op's cases in
``GRIDS``; ops that share their case builders share a grid module (both cross-entropies in
``loss.py``). This package collects every grid module it holds, so a new op's grid needs no
list to be added to, and it refuses to load when an op has no grid or two. The generic tests,
``python -m jlayers.check`` and ``python -m jlayers.bench`` iterate :data:`GRIDS`;
``import jlayers`` does not import it.

A case builds its positional arrays from a NumPy generator and a float dtype, so the same grid
runs in float64 (inside ``jax.enable_x64``) and in low precision.
"""

from __future__ import annotations

import importlib
import pkgutil

from jlayers import _ops
from jlayers.testing import Grid


def _collect() -> dict[str, Grid]:
  grids: dict[str, Grid] = {}
  for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    module = importlib.import_module(f"{__name__}.{module_info.name}")
    for grid in module.GRIDS:
      if grid.name in grids:
        raise RuntimeError(f"jlayers.grids: op {grid.name!r} has two grids")
      ids = [c.id for c in grid.cases]
      if len(set(ids)) != len(ids):
        raise RuntimeError(f"jlayers.grids: op {grid.name!r} has duplicate case ids")
      grids[grid.name] = grid
  builtin = _ops.builtin_ops()
  missing = sorted(set(builtin) - set(grids))
  foreign = sorted(set(grids) - set(builtin))
  if missing or foreign:
    raise RuntimeError(f"jlayers.grids: ops without a grid {missing}, grids of no declared op "
                       f"{foreign}")
  for name, grid in grids.items():
    if grid.op is not builtin[name]:
      raise RuntimeError(f"jlayers.grids: the grid of {name!r} holds another op than the one "
                         "its module declares")
  return {name: grids[name] for name in builtin}


GRIDS: dict[str, Grid] = _collect()
"""``{op name: Grid}`` for every op of jlayers, in the order the ops are declared."""
