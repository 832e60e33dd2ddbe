"""Manual-versus-autodiff comparison of one registry case (used by the tests and the check CLI)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jlayers.registry import Case, OpSpec


def restrict(fn, case: Case, args: tuple):
  """``fn`` as a function of the differentiable arguments only, the rest fixed."""

  def f(*diff_args):
    full = list(args)
    for i, v in zip(case.diff, diff_args):
      full[i] = v
    return fn(*full, **case.kwargs)

  return f


def random_like(rng: np.random.Generator, tree):
  """A standard-normal pytree with the shapes and dtypes of ``tree``."""
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape), dtype=a.dtype), tree)


def rel_err(a: jax.Array, ref: jax.Array) -> tuple[float, float]:
  """``(max |a - ref|, max |a - ref| / max |ref|)``; the denominator is floored at the dtype's
  smallest normal number so an all-zero reference gives the absolute error scaled, not inf."""
  wide = jnp.float64 if ref.dtype == jnp.float64 else jnp.float32
  a, ref = a.astype(wide), ref.astype(wide)
  if ref.size == 0:
    return 0.0, 0.0
  diff = float(jnp.max(jnp.abs(a - ref)))
  scale = max(float(jnp.max(jnp.abs(ref))), float(jnp.finfo(wide).tiny))
  return diff, diff / scale


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Errors of one case: forward outputs, and the gradient of each differentiable argument."""

  out: tuple[float, float]
  grads: dict[int, tuple[float, float]]

  @property
  def worst_rel(self) -> float:
    return max([self.out[1], *(r for _, r in self.grads.values())])

  @property
  def worst_abs(self) -> float:
    return max([self.out[0], *(a for a, _ in self.grads.values())])


def compare(spec: OpSpec, case: Case, dtype, seed: int = 0, jit: bool = False) -> Comparison:
  """Runs ``jax.vjp`` of the manual op and of its twin on the same inputs and cotangent.

  Float64 needs the caller to be inside ``jax.enable_x64(True)``.
  """
  rng = np.random.default_rng(seed)
  args = case.make(rng, dtype)
  primals = tuple(args[i] for i in case.diff)

  def vjp_of(fn):
    def run(primals, cot):
      out, pullback = jax.vjp(restrict(fn, case, args), *primals)
      return out, pullback(cot)
    return jax.jit(run) if jit else run

  out_shape = jax.eval_shape(restrict(spec.reference, case, args), *primals)
  cot = random_like(rng, out_shape)
  out_m, g_m = vjp_of(spec.manual)(primals, cot)
  out_r, g_r = vjp_of(spec.reference)(primals, cot)
  return Comparison(_worst(out_m, out_r),
                    {i: _worst(a, b) for i, a, b in zip(case.diff, g_m, g_r)})


def _worst(tree, ref_tree) -> tuple[float, float]:
  """Largest absolute and largest relative error over the leaves of two pytrees."""
  errs = [rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree),
                                        jax.tree_util.tree_leaves(ref_tree))]
  return max(e[0] for e in errs), max(e[1] for e in errs)
