"""Checking hand-written backward passes against autodiff, for jlayers' ops and for yours.

:func:`check_rule` takes a manual op (typically a ``jax.custom_vjp``), its reference twin (the
same forward, differentiated by JAX) and example arguments, and compares, in float64 with
random cotangents: the forward outputs, the VJP of every differentiable argument, the same
under ``jax.jit`` and under ``jax.vmap``, and the dtypes and shapes of the gradients for the
arguments as given. It returns a :class:`RuleReport` with the worst relative error per
argument, or raises :class:`RuleMismatch` (an ``AssertionError``, so pytest shows it) when one
exceeds the tolerance. :func:`check_case` does the same for one :class:`Case` of an
:class:`OpSpec` grid; jlayers' own test suite runs every op of its registry through it, and
``python -m jlayers.check --module mypkg.ops`` runs the ``SPECS`` of a user's module.

Examples:
  >>> import jax, jax.numpy as jnp, jlayers
  >>> @jax.custom_vjp
  ... def softplus(x):
  ...   return jnp.logaddexp(x, 0.0)
  >>> softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))
  >>> report = jlayers.testing.check_rule(softplus, lambda x: jnp.logaddexp(x, 0.0),
  ...                                      jnp.linspace(-3.0, 3.0, 7))
  >>> report.worst < 1e-12
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MakeArgs = Callable[[np.random.Generator, Any], tuple]

MESH_BATCH = 24
"""The global batch of the mesh cases: 3 examples per device on 8 devices, and no other
dimension of a mesh case has this size (so a gathered batch is recognisable in compiled HLO)."""


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
  """An op: manual rule, autodiff twin, grid of cases.

  Attributes:
    name: the op's name (``jlayers.<name>`` and ``jlayers.reference.<name>`` for jlayers').
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


def _host(v: np.ndarray, dtype) -> jax.Array:
  """``v`` rounded to ``dtype`` by NumPy, then put on the device: no program is compiled for
  the conversion (the suites build thousands of arrays of distinct shapes)."""
  return jax.device_put(np.asarray(v, dtype=jnp.dtype(dtype)))


def normal(rng: np.random.Generator, shape, dtype, scale: float = 1.0):
  """Standard normal array of ``shape`` in ``dtype`` (drawn in float64, then cast)."""
  return _host(scale * rng.standard_normal(shape), dtype)


def away_from_zero(rng: np.random.Generator, shape, dtype, gap: float = 0.1):
  """Normal values with ``|v| >= gap``: keeps finite differences off a kink at 0."""
  v = rng.standard_normal(shape)
  v = np.where(np.abs(v) < gap, np.sign(v + 1e-12) * gap, v)
  return _host(v, dtype)


# ---------------------------------------------------------------------------------------------
# Comparison.


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
      lambda a: _host(rng.standard_normal(a.shape), a.dtype), tree)


def rel_err(a: jax.Array, ref: jax.Array) -> tuple[float, float]:
  """``(max |a - ref|, max |a - ref| / max |ref|)``.

  Entries equal in both count as no error (so a ``-inf`` that both give, a masked
  log-probability, agrees), and the scale is the largest *finite* ``|ref|``, floored at the
  dtype's smallest normal number so an all-zero reference gives the absolute error scaled,
  not inf. An infinity or NaN where the other side differs makes the error inf or NaN.
  """
  wide = np.float64 if ref.dtype == jnp.float64 else np.float32
  a, ref = np.asarray(a).astype(wide), np.asarray(ref).astype(wide)  # on the host
  if ref.size == 0:
    return 0.0, 0.0
  with np.errstate(invalid="ignore"):  # inf - inf where the two differ is NaN: an error
    diff = float(np.max(np.where(a == ref, 0.0, np.abs(a - ref))))
  scale = max(float(np.max(np.where(np.isfinite(ref), np.abs(ref), 0.0))),
              float(np.finfo(wide).tiny))
  return diff, diff / scale


def _worst(tree, ref_tree) -> tuple[float, float]:
  """Largest absolute and largest relative error over the leaves of two pytrees."""
  errs = [rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree),
                                        jax.tree_util.tree_leaves(ref_tree))]
  return max((e[0] for e in errs), default=0.0), max((e[1] for e in errs), default=0.0)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Errors of one case: forward outputs, and the gradient of each differentiable argument,
  each as ``(max absolute error, max relative error)``."""

  out: tuple[float, float]
  grads: dict[int, tuple[float, float]]

  @property
  def worst_rel(self) -> float:
    return max([self.out[1], *(r for _, r in self.grads.values())])

  @property
  def worst_abs(self) -> float:
    return max([self.out[0], *(a for a, _ in self.grads.values())])


def _vjp_runner(fn, case: Case, jit: bool):
  def run(args, primals, cot):
    out, pullback = jax.vjp(restrict(fn, case, args), *primals)
    return out, pullback(cot)
  return jax.jit(run) if jit else run


def compare(spec: OpSpec, case: Case, dtype, seed: int = 0, jit: bool = False) -> Comparison:
  """Runs ``jax.vjp`` of the manual op and of its twin on the same inputs and cotangent.

  Float64 needs the caller to be inside ``jax.enable_x64(True)``.
  """
  rng = np.random.default_rng(seed)
  args = case.make(rng, dtype)
  primals = tuple(args[i] for i in case.diff)
  out_shape = jax.eval_shape(restrict(spec.reference, case, args), *primals)
  cot = random_like(rng, out_shape)
  out_m, g_m = _vjp_runner(spec.manual, case, jit)(args, primals, cot)
  out_r, g_r = _vjp_runner(spec.reference, case, jit)(args, primals, cot)
  return Comparison(_worst(out_m, out_r),
                    {i: _worst(a, b) for i, a, b in zip(case.diff, g_m, g_r)})


# ---------------------------------------------------------------------------------------------
# The public checker.


class RuleMismatch(AssertionError):
  """A manual rule disagrees with autodiff of its twin (or returns gradients of wrong dtypes)."""


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """What :func:`check_rule` measured, in float64.

  Attributes:
    name: the op's name (and case id).
    forward: relative error of the forward outputs (manual against twin).
    grads: ``{argument position: relative error of its gradient}`` under ``jax.jit``.
    vmap: relative error of the manual VJP under ``jax.vmap`` (two examples stacked on a new
      leading axis of the differentiable arguments) against the twin's per example; ``None``
      when not run.
    dtype_problems: gradients whose dtype or shape differ from their argument's, for the
      arguments in their given dtypes.
    rtol: the tolerance the errors were held to.
  """

  name: str
  forward: float
  grads: dict[int, float]
  vmap: float | None
  dtype_problems: tuple[str, ...]
  rtol: float

  @property
  def worst(self) -> float:
    return max([self.forward, *self.grads.values(), self.vmap or 0.0])

  @property
  def passed(self) -> bool:
    return self.worst <= self.rtol and not self.dtype_problems

  def __str__(self) -> str:
    parts = [f"forward {self.forward:.2e}"]
    parts += [f"grad of argument {i} {e:.2e}" for i, e in self.grads.items()]
    if self.vmap is not None:
      parts.append(f"vmap {self.vmap:.2e}")
    parts += list(self.dtype_problems)
    verdict = "passed" if self.passed else "FAILED"
    return f"{self.name}: {verdict} (relative errors, tolerance {self.rtol:g}): " + ", ".join(
        parts)


def _float64(tree):
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, jnp.float64)
      if isinstance(a, (jax.Array, np.ndarray, float)) and jnp.issubdtype(
          jnp.asarray(a).dtype, jnp.floating) else a, tree)


def _floating(a) -> bool:
  return (isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating)
          and not jnp.issubdtype(a.dtype, jax.dtypes.prng_key))


def check_rule(manual: Callable[..., Any], reference: Callable[..., Any], *args,
               diff: tuple[int, ...] | None = None, kwargs: Mapping[str, Any] | None = None,
               rtol: float = 1e-10, vmap: bool = True, dtypes: bool = True, seed: int = 0,
               name: str | None = None, raises: bool = True) -> RuleReport:
  """Compares a manual rule with autodiff of its twin; see the module docstring.

  Args:
    manual: the op with the hand-written backward pass.
    reference: the twin: the same signature and forward, differentiated by JAX.
    *args: example positional arguments (arrays of any dtype, keys, ...); float arrays are
      converted to float64 for the comparison.
    diff: positions of the differentiable arguments (default: every floating array).
    kwargs: keyword (static) arguments for both functions.
    rtol: the largest relative error (``max|manual − twin| / max|twin|``) allowed.
    vmap: also compare under ``jax.vmap``.
    dtypes: also check that the gradients of ``args`` as given have their dtypes and shapes.
    seed: seed of the random cotangents.
    name: a name for the report (default: ``manual.__name__``).
    raises: raise :class:`RuleMismatch` on failure (else only return the report).

  Returns:
    A :class:`RuleReport`.
  """
  if diff is None:
    diff = tuple(i for i, a in enumerate(args) if _floating(a))
  case = Case(name or getattr(manual, "__name__", "rule"), lambda rng, dtype: args,
              dict(kwargs or {}), tuple(diff))
  return _check(manual, reference, case, args, rtol=rtol, vmap=vmap, dtypes=dtypes, seed=seed,
                raises=raises)


def check_case(spec: OpSpec, case: Case, *, rtol: float = 1e-10, vmap: bool = True,
               dtypes: bool = True, seed: int = 0, raises: bool = True,
               formulations: tuple[str, ...] = ("auto",)) -> RuleReport:
  """:func:`check_rule` on one case of a grid: its arguments built in float64 (and, for the
  dtype check, in float32). With several ``formulations`` (see :func:`jlayers.formulation`)
  the manual rule is traced in each and compared with one evaluation of the twin; the report
  holds the worst of them."""
  args = case.make(np.random.default_rng(seed), jnp.float32)
  case = dataclasses.replace(case, id=f"{spec.name}[{case.id}]")
  return _check(spec.manual, spec.reference, case, args, rtol=rtol, vmap=vmap, dtypes=dtypes,
                seed=seed, raises=raises, make64=True, formulations=formulations)


def _check(manual, reference, case, args, *, rtol, vmap, dtypes, seed, raises, make64=False,
           formulations=("auto",)):
  from jlayers._platform import formulation  # noqa: PLC0415  (the package imports this module)

  rng = np.random.default_rng(seed + 1)
  with jax.enable_x64(True):
    args64 = case.make(np.random.default_rng(seed), jnp.float64) if make64 else _float64(args)
    primals = tuple(args64[i] for i in case.diff)
    out_shape = jax.eval_shape(restrict(reference, case, args64), *primals)
    cot = random_like(rng, out_shape)
    out_r, g_r = _vjp_runner(reference, case, True)(args64, primals, cot)
    forward, grads, wrong64 = 0.0, dict.fromkeys(case.diff, 0.0), ()
    for name in formulations:
      with formulation(name):
        out_m, g_m = _vjp_runner(manual, case, True)(args64, primals, cot)
      forward = max(forward, _worst(out_m, out_r)[1])
      grads = {i: max(grads[i], _worst(a, b)[1]) for i, a, b in zip(case.diff, g_m, g_r)}
      wrong64 += tuple(f"float64 gradient of argument {i} is {g.dtype}{list(g.shape)}"
                       for i, p, g in zip(case.diff, primals, g_m)
                       if g.dtype != p.dtype or g.shape != p.shape)
    vmap_err = _vmap_error(manual, reference, case, args64, primals, cot, rng) if vmap else None
  problems = wrong64 + (_dtype_problems(manual, case, args) if dtypes else ())
  report = RuleReport(case.id, forward, grads, vmap_err, problems, rtol)
  if raises and not report.passed:
    raise RuleMismatch(str(report))
  return report


def _vmap_error(manual, reference, case, args, primals, cot, rng) -> float:
  """The manual VJP under ``vmap`` over two stacked examples against the twin's per example."""
  second = tuple(_host(np.asarray(p) + 0.1 * rng.standard_normal(p.shape), p.dtype)
                 for p in primals)
  cot2 = random_like(rng, cot)
  stack = lambda a, b: jnp.stack([a, b])  # noqa: E731
  batched = jax.tree_util.tree_map(stack, (primals, cot), (second, cot2))
  runner = _vjp_runner(manual, case, False)
  got = jax.jit(jax.vmap(lambda p, c: runner(args, p, c)))(*batched)
  twin = _vjp_runner(reference, case, True)
  want = [twin(args, p, c) for p, c in ((primals, cot), (second, cot2))]
  want = jax.tree_util.tree_map(stack, *want)
  return _worst(got, want)[1]


def _dtype_problems(manual, case, args) -> tuple[str, ...]:
  primals = tuple(args[i] for i in case.diff)
  out, pullback = jax.vjp(restrict(manual, case, args), *primals)
  grads = pullback(jax.tree_util.tree_map(jnp.ones_like, out))
  problems = []
  for i, p, g in zip(case.diff, primals, grads):
    if g.dtype != p.dtype or g.shape != p.shape:
      problems.append(f"gradient of argument {i} is {g.dtype}{list(g.shape)} for an argument "
                      f"{p.dtype}{list(p.shape)}")
  return tuple(problems)


def saved_residuals(fn: Callable[..., Any], *args) -> list[tuple[Any, str]]:
  """What ``fn`` saves for its backward pass: ``(shape and dtype, why)`` per residual, ``why``
  starting with ``"from the argument"`` for residuals that are ``fn``'s own inputs.

  JAX exposes this list only through a private function (the public
  ``jax.ad_checkpoint.print_saved_residuals`` prints it); this is jlayers' one use of it, so a
  JAX release that moves it breaks here with a clear message and nowhere else.
  """
  try:
    from jax._src.ad_checkpoint import saved_residuals as private  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover (depends on the installed JAX)
    raise RuntimeError(
        f"jlayers.testing.saved_residuals: this JAX ({jax.__version__}) has no "
        "jax._src.ad_checkpoint.saved_residuals; use jax.ad_checkpoint.print_saved_residuals "
        "to see what a function saves") from e
  return private(fn, *args)
