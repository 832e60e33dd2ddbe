"""Generic checks that every op's grid must pass, driven by ``jlayers.grids.GRIDS``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_vjps_in_one_program

import jlayers
from jlayers import testing
from jlayers.grids import GRIDS

ALL_CASES = [pytest.param(grid, case, id=f"{grid.name}-{case.id}")
             for grid in GRIDS.values() for case in grid.cases]
REPRESENTATIVE = [pytest.param(grid, case, id=f"{grid.name}-{case.id}")
                  for grid in GRIDS.values() for case in grid.representative_cases]

F64_RTOL = 1e-10
# float32 agreement of one rule with itself (jit against eager): 1e-5 on CPU; on GPU and TPU,
# where float32 products run in TF32 or bfloat16 passes by default and batched and unbatched
# programs may pick different algorithms, the platform's check tolerance.
F32_RTOL = 1e-5 if jax.default_backend() == "cpu" else testing.tolerances()["float32"]


CHUNK = 8
"""Cases of a grid checked by one compiled program in the float64 test (see ``_reports``)."""


def _forms(grid):
  return ("cpu", "native") if grid.platform_dependent else ("auto",)


@functools.cache
def _reports(name: str, start: int):
  """The float64 reports of ``GRIDS[name].cases[start:start + CHUNK]``, computed together by
  ``testing._check_cases`` (one program for the chunk: the same draws and reports as case by
  case, in about two thirds of the CPU time), for the tests of those cases to read; None if
  the chunk raised, and each of its tests then runs its case alone."""
  grid = GRIDS[name]
  cases = grid.cases[start:start + CHUNK]
  try:
    reports = testing._check_cases(grid, cases, rtol=F64_RTOL, vmap=False, dtypes=False,
                                   formulations=_forms(grid))
  except Exception:  # noqa: BLE001 - the failing case raises again in its own test
    return None
  return dict(zip((c.id for c in cases), reports))


@pytest.mark.parametrize("grid, case", ALL_CASES)
def test_manual_vjp_equals_reference_vjp_float64(grid, case):
  """Every case of every grid; both formulations of the platform-dependent rules (the CPU one
  and the native one that GPUs and TPUs run), forced here on the CPU, against one twin run."""
  index = [c.id for c in grid.cases].index(case.id)
  reports = _reports(grid.name, index - index % CHUNK)
  report = (reports[case.id] if reports is not None else
            testing.check_case(grid, case, rtol=F64_RTOL, vmap=False, dtypes=False,
                               raises=False, formulations=_forms(grid)))
  assert report.passed, str(report)


@pytest.mark.parametrize("grid, case", REPRESENTATIVE)
def test_public_checker_with_jit_vmap_and_dtypes(grid, case):
  """The checker users run on their own rules (``jlayers.testing.check_case``), in full: float64
  VJPs under jit and vmap against the twin, and float32 gradient dtypes and shapes."""
  testing.check_case(grid, case, rtol=F64_RTOL)


@pytest.mark.parametrize("grid, case", REPRESENTATIVE)
def test_check_grads_second_order_float64(grid, case):
  """``jax.test_util.check_grads(order=2, modes=("rev",))``: its evaluations in one compiled
  program (see ``helpers.check_vjps_in_one_program``). The platform-dependent rules in their
  CPU formulation (what runs here): under jit with both staged, both would be differentiated,
  and JAX has no second derivative of a dilated select-and-gather (the native max-pool rule)."""
  form = "cpu" if grid.platform_dependent else "auto"
  with jax.enable_x64(True), jlayers.formulation(form):
    args = case.make(np.random.default_rng(1), jnp.float64)
    f = testing.restrict(grid.manual, case, args)
    check_vjps_in_one_program(f, tuple(args[i] for i in case.diff), order=2, atol=1e-6,
                              rtol=1e-6)


@pytest.mark.parametrize("grid, case", REPRESENTATIVE)
def test_jit_matches_eager(grid, case):
  rng = np.random.default_rng(2)
  args = case.make(rng, jnp.float32)
  primals = tuple(args[i] for i in case.diff)
  cot = testing.random_like(rng, jax.eval_shape(testing.restrict(grid.manual, case, args),
                                                *primals))
  eager = testing.vjp_runner(grid.manual, case, jit=False)(args, primals, cot)
  jitted = testing.vjp_runner(grid.manual, case)(args, primals, cot)
  for e, j in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=F32_RTOL, atol=1e-6)


HALF = ("bfloat16", "float16")


def _widened(tree):
  """The floating leaves of ``tree`` in float64, converted on the host (no compile); the same
  values, which half-precision ones are exactly in float64."""
  return jax.tree_util.tree_map(
      lambda a: (jax.device_put(np.asarray(a).astype(np.float64))
                 if jnp.issubdtype(a.dtype, jnp.floating) else a), tree)


@pytest.mark.parametrize("grid, case", REPRESENTATIVE)
def test_half_precision_accuracy_against_float64(grid, case):
  """bfloat16 and float16 outputs and gradients of the manual rule have their inputs' dtypes
  and shapes (float32 and float64: the public checker's test) and are within
  ``grid.half_precision`` epsilons of the format (normwise, relative to the largest entry) of
  the float64 twin evaluated on the same, exactly representable, inputs and cotangents: only
  the rounding inside the op is measured, not that of its inputs. Both formats in one test:
  their float64 twin runs are one compiled program."""
  manual, reference = testing.vjp_runner(grid.manual, case), testing.vjp_runner(grid.reference,
                                                                                 case)
  problems = []
  for dtype in HALF:
    half = jnp.dtype(dtype)
    bound = grid.half_precision * float(jnp.finfo(half).eps)
    rng = np.random.default_rng(6)
    args = case.make(rng, half)
    primals = tuple(args[i] for i in case.diff)
    out_shape = jax.eval_shape(testing.restrict(grid.manual, case, args), *primals)
    cot = testing.random_like(rng, out_shape)
    out, grads = manual(args, primals, cot)
    first = jax.tree_util.tree_leaves(out)[0]
    if first.dtype != primals[0].dtype:
      problems.append(f"{dtype}: output dtype {first.dtype} for {primals[0].dtype}")
    problems += [f"{dtype}: grad of arg {i}: {g.dtype}{g.shape}"
                 for i, p, g in zip(case.diff, primals, grads)
                 if g.dtype != p.dtype or g.shape != p.shape]
    with jax.enable_x64(True):
      args64 = _widened(args)
      out64, grads64 = reference(args64, tuple(args64[i] for i in case.diff), _widened(cot))
      errors = {"output": testing.error(jax.tree_util.tree_leaves(out)[0],
                                        jax.tree_util.tree_leaves(out64)[0]).relative}
      errors.update({f"grad of arg {i}": testing.error(g, g64).relative
                     for i, g, g64 in zip(case.diff, grads, grads64)})
    if max(errors.values()) > bound:
      problems.append(f"{dtype}: {errors} exceed {grid.half_precision} eps = {bound:.2e}")
  assert not problems, problems
