"""The one registry of ops: each op's manual rule, its autodiff twin and its configuration grid.

The generic tests, ``python -m jlayers.check`` and ``python -m jlayers.bench`` all iterate
:data:`OPS`. A case builds its positional arrays from a NumPy generator and a float dtype, so
the same grid runs in float64 (inside ``jax.enable_x64``) and in low precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

MakeArgs = Callable[[np.random.Generator, Any], tuple]


@dataclasses.dataclass(frozen=True)
class Case:
  """One configuration of an op.

  Attributes:
    id: short readable name, unique within its op (used as the pytest id).
    make: ``make(rng, dtype) -> args``, the positional arguments; float arrays in ``dtype``.
    kwargs: the keyword-only (static) configuration.
    diff: positions in ``args`` of the differentiable arguments.
    batched: positions in ``args`` whose axis 0 is the batch (split over a device mesh by the
      mesh tests; the other arguments are replicated).
  """

  id: str
  make: MakeArgs
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  diff: tuple[int, ...] = (0,)
  batched: tuple[int, ...] = (0,)


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """An op family member: manual rule, autodiff twin, grid of cases.

  Attributes:
    name: public name (``jlayers.<name>`` and ``jlayers.reference.<name>``).
    manual: the op with the hand-written ``custom_vjp``.
    reference: the plain-jnp twin with the same signature.
    cases: the configuration grid.
    representative: ids of the cases the costlier generic checks run on (second order, jit,
      vmap, dtypes); default the first case. Choose ones that exercise the real rule.
    bench: realistic-size cases for ``python -m jlayers.bench`` (none: not benchmarked).
    mesh: cases whose batch (``MESH_BATCH``) is split over an 8-device mesh by the mesh tests.
    platform_dependent: the rule has a CPU and a native formulation (see
      :func:`jlayers.formulation`); the tests run both.
    half_precision: the bound on the relative error of bfloat16 and float16 outputs and
      gradients against float64, in units of the format's epsilon (``jnp.finfo(dtype).eps``).
  """

  name: str
  manual: Callable[..., Any]
  reference: Callable[..., Any]
  cases: tuple[Case, ...]
  representative: tuple[str, ...] = ()
  bench: tuple[Case, ...] = ()
  mesh: tuple[Case, ...] = ()
  platform_dependent: bool = False
  half_precision: float = 2.0

  def case(self, case_id: str) -> Case:
    for c in self.cases:
      if c.id == case_id:
        return c
    raise KeyError(f"{self.name} has no case {case_id!r}")

  @property
  def representative_cases(self) -> tuple[Case, ...]:
    if not self.representative:
      return self.cases[:1]
    return tuple(self.case(i) for i in self.representative)


MESH_BATCH = 24
"""The global batch of the mesh cases: 3 examples per device on 8 devices, and no other
dimension of a mesh case has this size (so a gathered batch is recognisable in compiled HLO)."""


def normal(rng: np.random.Generator, shape, dtype, scale: float = 1.0):
  """Standard normal array of ``shape`` in ``dtype`` (drawn in float64, then cast)."""
  return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)


def away_from_zero(rng: np.random.Generator, shape, dtype, gap: float = 0.1):
  """Normal values with ``|v| >= gap``: keeps finite differences off a kink at 0."""
  v = rng.standard_normal(shape)
  v = np.where(np.abs(v) < gap, np.sign(v + 1e-12) * gap, v)
  return jnp.asarray(v, dtype=dtype)


# One grid module per op family, in ``jlayers/_cases/``.
_FAMILIES = ("linear", "activation", "dropout", "batch_norm", "conv", "pool", "loss")


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
