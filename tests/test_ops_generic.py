"""Generic checks that every op of the registry must pass, driven by ``jlayers.registry.OPS``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jlayers
from jlayers import check, testing
from jlayers.registry import OPS

ALL_CASES = [pytest.param(spec, case, id=f"{spec.name}-{case.id}")
             for spec in OPS.values() for case in spec.cases]
REPRESENTATIVE = [pytest.param(spec, case, id=f"{spec.name}-{case.id}")
                  for spec in OPS.values() for case in spec.representative_cases]

F64_RTOL = 1e-10
# float32 agreement of one rule with itself (jit against eager, vmap against a loop): 1e-5 on
# CPU; on GPU and TPU, where float32 products run in TF32 or bfloat16 passes by default and
# batched and unbatched programs may pick different algorithms, the platform's check tolerance.
F32_RTOL = 1e-5 if jax.default_backend() == "cpu" else check.tolerances()["float32"]


@pytest.mark.parametrize("spec, case", ALL_CASES)
def test_manual_vjp_equals_reference_vjp_float64(spec, case):
  """Every case of every grid; both formulations of the platform-dependent rules (the CPU one
  and the native one that GPUs and TPUs run), forced here on the CPU, against one twin run."""
  forms = ("cpu", "native") if spec.platform_dependent else ("auto",)
  report = testing.check_case(spec, case, rtol=F64_RTOL, vmap=False, dtypes=False,
                              raises=False, formulations=forms)
  assert report.passed, str(report)


@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_public_checker_with_jit_vmap_and_dtypes(spec, case):
  """The checker users run on their own rules (``jlayers.testing.check_case``), in full: float64
  VJPs under jit and vmap against the twin, and float32 gradient dtypes and shapes."""
  testing.check_case(spec, case, rtol=F64_RTOL)


@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_check_grads_second_order_float64(spec, case):
  with jax.enable_x64(True):
    args = case.make(np.random.default_rng(1), jnp.float64)
    f = testing.restrict(spec.manual, case, args)
    # Jitted, one compile per derivative order instead of one per primitive. Eagerly for the
    # platform-dependent rules: under jit both formulations are staged and differentiated, and
    # JAX has no second derivative of a dilated select-and-gather (the native max-pool rule).
    f = f if spec.platform_dependent else jax.jit(f)
    check_grads(f, tuple(args[i] for i in case.diff), order=2, modes=("rev",),
                atol=1e-6, rtol=1e-6)


def _grads(fn, case, args, cot):
  out, pullback = jax.vjp(testing.restrict(fn, case, args), *(args[i] for i in case.diff))
  return out, pullback(cot)


@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_jit_matches_eager(spec, case):
  rng = np.random.default_rng(2)
  args = case.make(rng, jnp.float32)
  cot = testing.random_like(rng, jax.eval_shape(testing.restrict(spec.manual, case, args),
                                                *(args[i] for i in case.diff)))
  eager = _grads(spec.manual, case, args, cot)
  jitted = jax.jit(lambda a, c: _grads(spec.manual, case, a, c))(args, cot)
  for e, j in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=F32_RTOL, atol=1e-6)


HALF = ("bfloat16", "float16")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_half_precision_accuracy_against_float64(spec, case, dtype):
  """bfloat16 and float16 outputs and gradients of the manual rule have their inputs' dtypes
  and shapes (float32 and float64: the public checker's test) and are within
  ``spec.half_precision`` epsilons of the format (normwise, relative to the largest entry) of
  the float64 twin evaluated on the same, exactly representable, inputs and cotangents: only
  the rounding inside the op is measured, not that of its inputs."""
  half = jnp.dtype(dtype)
  bound = spec.half_precision * float(jnp.finfo(half).eps)
  rng = np.random.default_rng(6)
  args = case.make(rng, half)
  primals = tuple(args[i] for i in case.diff)
  out_shape = jax.eval_shape(testing.restrict(spec.manual, case, args), *primals)
  cot = testing.random_like(rng, out_shape)
  out, grads = jax.jit(lambda a, c: _grads(spec.manual, case, a, c))(args, cot)
  first = jax.tree_util.tree_leaves(out)[0]
  assert first.dtype == primals[0].dtype, f"output dtype {first.dtype} for {primals[0].dtype}"
  for i, p, g in zip(case.diff, primals, grads):
    assert g.dtype == p.dtype and g.shape == p.shape, f"grad of arg {i}: {g.dtype}{g.shape}"
  with jax.enable_x64(True):
    wide = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    args64 = wide(args)
    out64, grads64 = jax.jit(lambda a, c: _grads(spec.reference, case, a, c))(args64, wide(cot))
    errors = {"output": testing.rel_err(jax.tree_util.tree_leaves(out)[0],
                                        jax.tree_util.tree_leaves(out64)[0])[1]}
    errors.update({f"grad of arg {i}": testing.rel_err(g, g64)[1]
                   for i, g, g64 in zip(case.diff, grads, grads64)})
  worst = max(errors.values())
  assert worst <= bound, (f"{dtype}: {errors} exceed {spec.half_precision} eps = {bound:.2e}")
