"""The configuration grids of jlayers' ops: each op's manual rule, its twin and its cases.

The generic tests, ``python -m jlayers.check`` and ``python -m jlayers.bench`` iterate
:data:`OPS`; ``import jlayers`` does not import it (layers find their ops in the op table,
:func:`jlayers.op`). A case builds its positional arrays from a NumPy generator and a float
dtype, so the same grid runs in float64 (inside ``jax.enable_x64``) and in low precision.
The types (:class:`~jlayers.testing.Case`, :class:`~jlayers.testing.OpSpec`) live in
:mod:`jlayers.testing`, for users' grids too.
"""

from __future__ import annotations

from jlayers.testing import (MESH_BATCH, Case, OpSpec, away_from_zero,  # noqa: F401
                             normal)

# One grid module per op family, in ``jlayers/_cases/``.
_FAMILIES = ("linear", "activation", "dropout", "batch_norm", "conv", "pool", "loss",
             "normalization", "softmax", "embedding", "attention")


def _collect() -> dict[str, OpSpec]:
  import importlib  # noqa: PLC0415

  specs: dict[str, OpSpec] = {}
  for family in _FAMILIES:
    module = importlib.import_module(f"jlayers._cases.{family}")
    for spec in module.SPECS:
      if spec.name in specs:
        raise RuntimeError(f"op {spec.name!r} registered twice")
      ids = [c.id for c in spec.cases]
      if len(set(ids)) != len(ids):
        raise RuntimeError(f"op {spec.name!r} has duplicate case ids")
      specs[spec.name] = spec
  return specs


OPS: dict[str, OpSpec] = _collect()
