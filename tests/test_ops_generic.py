"""Generic checks that every op of the registry must pass, driven by ``jlayers.registry.OPS``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jlayers
from jlayers import _verify, check
from jlayers.registry import OPS

ALL_CASES = [pytest.param(spec, case, form, id=f"{spec.name}-{case.id}-{form}")
             for spec in OPS.values() for case in spec.cases
             for form in (("cpu", "native") if spec.platform_dependent else ("auto",))]
REPRESENTATIVE = [pytest.param(spec, case, id=f"{spec.name}-{case.id}")
                  for spec in OPS.values() for case in spec.representative_cases]
DTYPES = ("float32", "bfloat16", "float16", "float64")

F64_RTOL = 1e-10
# float32 agreement of one rule with itself (jit against eager, vmap against a loop): 1e-5 on
# CPU; on GPU and TPU, where float32 products run in TF32 or bfloat16 passes by default and
# batched and unbatched programs may pick different algorithms, the platform's check tolerance.
F32_RTOL = 1e-5 if jax.default_backend() == "cpu" else check.tolerances()["float32"]


@pytest.mark.parametrize("spec, case, form", ALL_CASES)
def test_manual_vjp_equals_reference_vjp_float64(spec, case, form):
  """Every case of every grid; both formulations of the platform-dependent rules (the CPU one
  and the native one that GPUs and TPUs run), forced here on the CPU."""
  with jax.enable_x64(True), jlayers.formulation(form):
    result = _verify.compare(spec, case, jnp.float64, jit=True)
  assert result.out[1] <= F64_RTOL, f"forward differs: {result.out}"
  for argnum, (abs_err, rel) in result.grads.items():
    assert rel <= F64_RTOL, f"grad of arg {argnum}: abs {abs_err:.3g}, rel {rel:.3g}"


@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_check_grads_second_order_float64(spec, case):
  with jax.enable_x64(True):
    args = case.make(np.random.default_rng(1), jnp.float64)
    f = _verify.restrict(spec.manual, case, args)
    check_grads(f, tuple(args[i] for i in case.diff), order=2, modes=("rev",),
                atol=1e-6, rtol=1e-6)


def _grads(fn, case, args, cot):
  out, pullback = jax.vjp(_verify.restrict(fn, case, args), *(args[i] for i in case.diff))
  return out, pullback(cot)


@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_jit_matches_eager(spec, case):
  rng = np.random.default_rng(2)
  args = case.make(rng, jnp.float32)
  cot = _verify.random_like(rng, jax.eval_shape(_verify.restrict(spec.manual, case, args),
                                                *(args[i] for i in case.diff)))
  eager = _grads(spec.manual, case, args, cot)
  jitted = jax.jit(lambda a, c: _grads(spec.manual, case, a, c))(args, cot)
  for e, j in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
    np.testing.assert_allclose(np.asarray(e), np.asarray(j), rtol=F32_RTOL, atol=1e-6)


@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_vmap_matches_loop(spec, case):
  """vmap over a new leading axis of every differentiable argument equals a Python loop."""
  rngs = [np.random.default_rng(3 + k) for k in range(3)]
  batch = [case.make(r, jnp.float32) for r in rngs]
  stacked = tuple(jnp.stack([b[i] for b in batch]) if i in case.diff else batch[0][i]
                  for i in range(len(batch[0])))
  in_axes = tuple(0 if i in case.diff else None for i in range(len(stacked)))

  def value_and_grad(*a):
    out, pullback = jax.vjp(_verify.restrict(spec.manual, case, a), *(a[i] for i in case.diff))
    ones = jax.tree_util.tree_map(jnp.ones_like, out)
    return out, pullback(ones)

  vmapped = jax.vmap(value_and_grad, in_axes=in_axes)(*stacked)
  for k in range(3):
    single = value_and_grad(*(batch[k][i] if i in case.diff else batch[0][i]
                              for i in range(len(stacked))))
    for v, s in zip(jax.tree_util.tree_leaves(vmapped), jax.tree_util.tree_leaves(single)):
      np.testing.assert_allclose(np.asarray(v[k]), np.asarray(s), rtol=F32_RTOL, atol=1e-5)


def _check_dtypes(spec, case, dtype):
  args = case.make(np.random.default_rng(4), dtype)
  primals = tuple(args[i] for i in case.diff)
  out, pullback = jax.vjp(_verify.restrict(spec.manual, case, args), *primals)
  first = jax.tree_util.tree_leaves(out)[0]
  assert first.dtype == args[0].dtype, f"output dtype {first.dtype} for input {args[0].dtype}"
  grads = pullback(jax.tree_util.tree_map(jnp.ones_like, out))
  for i, p, g in zip(case.diff, primals, grads):
    assert g.dtype == p.dtype, f"grad of arg {i} has dtype {g.dtype}, input {p.dtype}"
    assert g.shape == p.shape
    assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_output_and_grad_dtypes_equal_input_dtypes(spec, case, dtype):
  if dtype == "float64":
    with jax.enable_x64(True):
      _check_dtypes(spec, case, jnp.float64)
  else:
    _check_dtypes(spec, case, jnp.dtype(dtype))


HALF = ("bfloat16", "float16")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("spec, case", REPRESENTATIVE)
def test_half_precision_accuracy_against_float64(spec, case, dtype):
  """bfloat16 and float16 outputs and gradients of the manual rule are within
  ``spec.half_precision`` epsilons of the format (normwise, relative to the largest entry) of
  the float64 twin evaluated on the same, exactly representable, inputs and cotangents: only
  the rounding inside the op is measured, not that of its inputs."""
  half = jnp.dtype(dtype)
  bound = spec.half_precision * float(jnp.finfo(half).eps)
  rng = np.random.default_rng(6)
  args = case.make(rng, half)
  primals = tuple(args[i] for i in case.diff)
  out_shape = jax.eval_shape(_verify.restrict(spec.manual, case, args), *primals)
  cot = _verify.random_like(rng, out_shape)
  out, grads = _grads(spec.manual, case, args, cot)
  with jax.enable_x64(True):
    wide = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    args64 = wide(args)
    out64, grads64 = _grads(spec.reference, case, args64, wide(cot))
    errors = {"output": _verify.rel_err(jax.tree_util.tree_leaves(out)[0],
                                        jax.tree_util.tree_leaves(out64)[0])[1]}
    errors.update({f"grad of arg {i}": _verify.rel_err(g, g64)[1]
                   for i, g, g64 in zip(case.diff, grads, grads64)})
  worst = max(errors.values())
  assert worst <= bound, (f"{dtype}: {errors} exceed {spec.half_precision} eps = {bound:.2e}")
