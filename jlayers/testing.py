"""Checking hand-written backward passes against autodiff, for jlayers' ops and for yours.

One engine compares a manual op (typically a ``jax.custom_vjp``) with its twin (the same
forward, differentiated by JAX) on the same inputs and a random cotangent: the forward
outputs, the VJP of every differentiable argument, optionally the same under ``jax.vmap``, and
the dtypes and shapes of the gradients. It reports, per argument, the worst absolute and
relative error (:class:`RuleReport`), and raises :class:`RuleMismatch` (an
``AssertionError``, so pytest shows it) when one exceeds the tolerance. Everything that checks
a rule goes through it:

* :func:`check_rule`: your op, its twin and example arguments, in float64;
* :func:`check_case`: one :class:`Case` of a :class:`Grid` (jlayers' own grids in
  :mod:`jlayers.grids`, or your module's ``GRIDS``), in float64 or float32; jlayers' test suite
  and ``python -m jlayers.check`` run every grid through it;
* :func:`grad_differences` / :func:`max_grad_difference`: a whole model's gradients, per param
  leaf, under ``impl="manual"`` and ``impl="autodiff"``.

:func:`vjp_runner` is the one jitted ``(outputs, gradients)`` runner, shared by the checker, the
benchmarks and the tests.

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

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlayers._ops import Op
from jlayers._platform import formulation

MakeArgs = Callable[[np.random.Generator, Any], tuple]

MESH_BATCH = 24
"""The global batch of the mesh cases: 3 examples per device on 8 devices, and no other
dimension of a mesh case has this size (so a gathered batch is recognisable in compiled HLO)."""

PLATFORM_TOLERANCES = {
    "cpu": {"float32": 1e-4, "float64": 1e-10},
    "gpu": {"float32": 5e-3, "float64": 1e-10},
    "tpu": {"float32": 3e-2, "float64": 1e-10},
}
"""Relative-error tolerance per platform and dtype: ``max|manual − autodiff| / max|autodiff|``.
On GPU, float32 products run in TF32 by default (10 mantissa bits, unit roundoff 4.9e-4), and
the manual rule and the twin may pick different algorithms; on TPU, float32 products take one
bfloat16 pass by default (8 bits). Float64 is the proof everywhere."""


def tolerances(platform: str | None = None) -> dict[str, float]:
  """The tolerances of ``platform`` (default: JAX's default backend; CPU's if unknown)."""
  platform = platform or jax.default_backend()
  return PLATFORM_TOLERANCES.get(platform, PLATFORM_TOLERANCES["cpu"])


# ---------------------------------------------------------------------------------------------
# Grids.


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
    keywords: names under which the last ``len(keywords)`` of ``args`` are passed (arrays
      the op takes as keywords, such as attention's ``bias``: they can then be differentiated
      and batched by position like the others).
  """

  id: str
  make: MakeArgs
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  diff: tuple[int, ...] = (0,)
  batched: tuple[int, ...] = (0,)
  keywords: tuple[str, ...] = ()

  def call(self, fn: Callable[..., Any], args) -> Any:
    """``fn`` applied to ``args`` (the last ``len(keywords)`` of them by name) and ``kwargs``."""
    split = len(args) - len(self.keywords)
    return fn(*args[:split], **dict(zip(self.keywords, args[split:])), **self.kwargs)


@dataclasses.dataclass(frozen=True)
class Layout:
  """A case with its parameters sharded as FSDP or tensor parallelism shards them, on the mesh
  tests' 2-D mesh of :data:`LAYOUT_MESH` (``data`` × ``model``, 2 × 4).

  Attributes:
    name: the layout: ``"fsdp"`` (weights split over ``data``), ``"column"``, ``"row"``
      (Megatron's parallel projections), ``"heads"``, ``"vocab"``; with the case's id it
      names the test.
    case: the :class:`Case`; its batch (``MESH_BATCH``) is split over ``data``.
    specs: per argument of ``case.make``, its ``PartitionSpec`` entries (a tuple of mesh axis
      names or ``None`` per axis).
    gathered: positions of the arguments the layout all-gathers whole (FSDP gathers each
      weight before it is used); an all-gather of any other argument's whole shape is a
      collective the layout does not need.
    out: the ``PartitionSpec`` entries of the output that the next layer would read (the
      cotangent the tests pull back is laid out so); ``None``: replicated.
    explicit_only: the rule keeps to the layout's collectives under explicit axes only: it
      reads the parameter's layout from its type, which auto axes leave empty (the result is
      right either way).
  """

  name: str
  case: Case
  specs: tuple[tuple, ...]
  gathered: tuple[int, ...] = ()
  out: tuple | None = None
  explicit_only: bool = False

  @property
  def id(self) -> str:
    return f"{self.case.id}-{self.name}"


LAYOUT_MESH = {"data": 2, "model": 4}
"""The mesh of :class:`Layout` cases: ``data`` × ``model`` on 8 devices."""


@dataclasses.dataclass(frozen=True)
class Grid:
  """An op and its grid of cases.

  Attributes:
    op: the :class:`jlayers.Op` (its manual rule and its twin).
    cases: the configuration grid.
    representative: ids of the cases the costlier generic checks run on (second order, jit,
      vmap, dtypes); default the first case. Choose ones that exercise the real rule.
    bench: realistic-size cases for ``python -m jlayers.bench`` (none: not benchmarked).
    mesh: cases whose batch (``MESH_BATCH``) is split over an 8-device mesh by the mesh tests.
    platform_dependent: the rule has a CPU and a native formulation (see
      :func:`jlayers.formulation`); the tests run both.
    half_precision: the bound on the relative error of bfloat16 and float16 outputs and
      gradients against float64, in units of the format's epsilon (``jnp.finfo(dtype).eps``).
    layouts: cases whose parameters are sharded (:class:`Layout`), run on a 2-D mesh by the
      mesh tests.
  """

  op: Op
  cases: tuple[Case, ...]
  representative: tuple[str, ...] = ()
  bench: tuple[Case, ...] = ()
  mesh: tuple[Case, ...] = ()
  platform_dependent: bool = False
  half_precision: float = 2.0
  layouts: tuple[Layout, ...] = ()

  @property
  def name(self) -> str:
    return self.op.name

  @property
  def manual(self) -> Callable[..., Any]:
    return self.op.manual

  @property
  def reference(self) -> Callable[..., Any]:
    return self.op.reference

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


def random_like(rng: np.random.Generator, tree):
  """A standard-normal pytree with the shapes and dtypes of ``tree``."""
  return jax.tree_util.tree_map(
      lambda a: _host(rng.standard_normal(a.shape), a.dtype), tree)


# ---------------------------------------------------------------------------------------------
# Errors.


class Error(NamedTuple):
  """``absolute = max |a − ref|`` and ``relative = absolute / max |ref|`` over an array or a
  pytree (see :func:`error`)."""

  absolute: float
  relative: float


def error(a, ref) -> Error:
  """The error of ``a`` against ``ref``, computed on the host.

  Entries equal in both count as no error (so a ``-inf`` that both give, a masked
  log-probability, agrees), and the scale is the largest *finite* ``|ref|``, floored at the
  dtype's smallest normal number so an all-zero reference gives the absolute error scaled,
  not inf. An infinity or NaN where the other side differs makes the error inf or NaN.
  """
  wide = np.float64 if ref.dtype == jnp.float64 else np.float32
  a, ref = np.asarray(a).astype(wide), np.asarray(ref).astype(wide)
  if ref.size == 0:
    return Error(0.0, 0.0)
  with np.errstate(invalid="ignore"):  # inf - inf where the two differ is NaN: an error
    diff = float(np.max(np.where(a == ref, 0.0, np.abs(a - ref))))
  scale = max(float(np.max(np.where(np.isfinite(ref), np.abs(ref), 0.0))),
              float(np.finfo(wide).tiny))
  return Error(diff, diff / scale)


def worst(tree, ref_tree) -> Error:
  """The largest absolute and the largest relative :func:`error` over two pytrees' leaves."""
  errors = [error(a, b) for a, b in zip(jax.tree_util.tree_leaves(tree),
                                        jax.tree_util.tree_leaves(ref_tree))]
  return Error(max((e.absolute for e in errors), default=0.0),
               max((e.relative for e in errors), default=0.0))


def _worse(a: Error, b: Error) -> Error:
  return Error(max(a.absolute, b.absolute), max(a.relative, b.relative))


# ---------------------------------------------------------------------------------------------
# Runners.


def restrict(fn, case: Case, args: tuple):
  """``fn`` as a function of the differentiable arguments only, the rest fixed."""

  def f(*diff_args):
    full = list(args)
    for i, v in zip(case.diff, diff_args):
      full[i] = v
    return case.call(fn, full)

  return f


def _vjp(fn, case, args, primals, cot):
  out, pullback = jax.vjp(restrict(fn, case, args), *primals)
  return out, pullback(cot)


def vjp_runner(fn: Callable[..., Any], case: Case, *, jit: bool = True):
  """``run(args, primals, cotangent) -> (outputs, gradients)``: ``jax.vjp`` of ``fn`` in the
  arguments ``case.diff`` (``primals``; the rest of ``args`` as they are), applied to
  ``cotangent``; jitted unless ``jit=False``. ``case.call(fn, args)`` is the call."""
  run = functools.partial(_vjp, fn, case)
  return jax.jit(run) if jit else run


# ---------------------------------------------------------------------------------------------
# The engine.


class RuleMismatch(AssertionError):
  """A manual rule disagrees with autodiff of its twin (or returns gradients of wrong dtypes)."""


@dataclasses.dataclass(frozen=True)
class RuleReport:
  """What the checker measured for one rule (or one case of a grid) in one dtype.

  Attributes:
    name: the op's name (and case id).
    dtype: the dtype the comparison ran in (``"float64"`` for the proof).
    forward: the error of the forward outputs (manual against twin).
    grads: ``{argument position: error of its gradient}``.
    vmap: the error of the manual VJP under ``jax.vmap`` (two examples stacked on a new
      leading axis of the differentiable arguments) against the twin's per example; ``None``
      when not run.
    dtype_problems: gradients whose dtype or shape differ from their argument's.
    rtol: the tolerance the relative errors were held to.
  """

  name: str
  dtype: str
  forward: Error
  grads: dict[int, Error]
  vmap: Error | None
  dtype_problems: tuple[str, ...]
  rtol: float

  def _errors(self) -> list[Error]:
    return [self.forward, *self.grads.values(), *([self.vmap] if self.vmap else [])]

  @property
  def worst(self) -> float:
    """The largest relative error of the report."""
    return max(e.relative for e in self._errors())

  @property
  def worst_absolute(self) -> float:
    """The largest absolute error of the report."""
    return max(e.absolute for e in self._errors())

  @property
  def passed(self) -> bool:
    return self.worst <= self.rtol and not self.dtype_problems

  def __str__(self) -> str:
    def fmt(what, e):
      return f"{what} {e.relative:.2e} (abs {e.absolute:.2e})"

    parts = [fmt("forward", self.forward)]
    parts += [fmt(f"grad of argument {i}", e) for i, e in self.grads.items()]
    if self.vmap is not None:
      parts.append(fmt("vmap", self.vmap))
    parts += list(self.dtype_problems)
    verdict = "passed" if self.passed else "FAILED"
    return (f"{self.name} ({self.dtype}): {verdict} (relative errors, tolerance "
            f"{self.rtol:g}): " + ", ".join(parts))


def _compare(manual, reference, case, make, dtype, *, name, rtol, seed, vmap, dtype_args,
             formulations) -> RuleReport:
  """The engine: ``make(rng, dtype)`` builds the arguments, one ``rng`` seeded with ``seed``
  then draws the cotangent (and, with ``vmap``, a second example); the twin and the manual
  rule (traced in each of ``formulations``), and the vmap comparison, run in ONE jitted
  program, so a case costs one compile."""
  return _compare_many(manual, reference, [(case, make, name, dtype_args)], dtype, rtol=rtol,
                       seed=seed, vmap=vmap, formulations=formulations)[0]


def _compare_many(manual, reference, items, dtype, *, rtol, seed, vmap,
                  formulations) -> list[RuleReport]:
  """:func:`_compare` for several ``(case, make, name, dtype_args)`` of one op at once: each
  case's arguments and cotangents drawn as for it alone, and every case in ONE jitted program
  (a batch of small cases compiles faster as one program than as many)."""
  dtype = jnp.dtype(dtype)
  x64 = jax.enable_x64(True) if dtype == jnp.float64 else contextlib.nullcontext()
  with x64:
    drawn = []
    for case, make, _, _ in items:
      rng = np.random.default_rng(seed)
      args = make(rng, dtype)
      primals = tuple(args[i] for i in case.diff)
      cot = random_like(rng, jax.eval_shape(restrict(reference, case, args), *primals))
      drawn.append((args, primals, cot, _second_example(rng, primals, cot) if vmap else None))

    def paired(drawn):
      results = []
      for (case, *_), (args, primals, cot, second) in zip(items, drawn):
        got = []
        for form in formulations:
          with formulation(form):
            got.append(_vjp(manual, case, args, primals, cot))
        batched = (None if second is None else
                   _vmap_pair(manual, reference, case, args, (primals, cot), second))
        results.append((_vjp(reference, case, args, primals, cot), got, batched))
      return results

    measured = []
    for (case, *_), (_, primals, _, _), ((out_r, g_r), got, batched) in zip(
        items, drawn, jax.jit(paired)(drawn)):
      forward, grads, problems = Error(0.0, 0.0), dict.fromkeys(case.diff, Error(0.0, 0.0)), ()
      for out_m, g_m in got:
        forward = _worse(forward, worst(out_m, out_r))
        grads = {i: _worse(grads[i], worst(a, b)) for i, a, b in zip(case.diff, g_m, g_r)}
        problems += _wrong_gradients(case, primals, g_m, f"{dtype} ")
      measured.append((forward, grads, worst(*batched) if vmap else None, problems))
  reports = []
  for (case, _, name, dtype_args), (forward, grads, vmap_error, problems) in zip(items,
                                                                                 measured):
    if dtype_args is not None:
      problems += _dtype_problems(manual, case, dtype_args)
    reports.append(RuleReport(name, str(dtype), forward, grads, vmap_error,
                              tuple(dict.fromkeys(problems)), rtol))
  return reports


def _second_example(rng, primals, cot):
  """A second example for the vmap comparison: the primals moved by ``0.1`` times normal
  noise, and a second cotangent."""
  second = tuple(_host(np.asarray(p) + 0.1 * rng.standard_normal(p.shape), p.dtype)
                 for p in primals)
  return second, random_like(rng, cot)


def _vmap_pair(manual, reference, case, args, one, two):
  """Traced: the manual VJP under ``vmap`` over the two examples ``(primals, cotangent)``
  stacked, and the twin's VJP of each, stacked the same way (``(got, want)``)."""
  stack = lambda a, b: jnp.stack([a, b])  # noqa: E731
  batched = jax.tree_util.tree_map(stack, one, two)
  got = jax.vmap(lambda p, c: _vjp(manual, case, args, p, c))(*batched)
  want = [_vjp(reference, case, args, p, c) for p, c in (one, two)]
  return got, jax.tree_util.tree_map(stack, *want)


def _dtype_problems(manual, case, args) -> tuple[str, ...]:
  """Gradients of ``args`` as given whose dtype or shape differ from the argument's (traced
  only, with ``jax.eval_shape``: nothing is compiled)."""
  primals = tuple(args[i] for i in case.diff)

  def grads(primals):
    out, pullback = jax.vjp(restrict(manual, case, args), *primals)
    return pullback(jax.tree_util.tree_map(jnp.ones_like, out))

  return _wrong_gradients(case, primals, jax.eval_shape(grads, primals))


def _wrong_gradients(case, primals, grads, what: str = "") -> tuple[str, ...]:
  """The gradients (arrays or shapes) whose dtype or shape differ from their argument's."""
  return tuple(f"{what}gradient of argument {i} is {g.dtype}{list(g.shape)} for an argument "
               f"{p.dtype}{list(p.shape)}" for i, p, g in zip(case.diff, primals, grads)
               if g.dtype != p.dtype or g.shape != p.shape)


def _floating(a) -> bool:
  return (isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating)
          and not jnp.issubdtype(a.dtype, jax.dtypes.prng_key))


def _cast_floats(args, dtype):
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(a, dtype) if _floating(a) or isinstance(a, float) else a, args)


def check_rule(manual: Callable[..., Any], reference: Callable[..., Any], *args,
               diff: tuple[int, ...] | None = None, kwargs: Mapping[str, Any] | None = None,
               rtol: float = 1e-10, vmap: bool = True, dtypes: bool = True, seed: int = 0,
               name: str | None = None, raises: bool = True) -> RuleReport:
  """Compares a manual rule with autodiff of its twin, in float64; see the module docstring.

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
  report = _compare(manual, reference, case, lambda rng, dtype: _cast_floats(args, dtype),
                    jnp.float64, name=case.id, rtol=rtol, seed=seed, vmap=vmap,
                    dtype_args=args if dtypes else None, formulations=("auto",))
  if raises and not report.passed:
    raise RuleMismatch(str(report))
  return report


def check_case(grid: Grid, case: Case, *, dtype=jnp.float64, rtol: float | None = None,
               vmap: bool = True, dtypes: bool = True, seed: int = 0, raises: bool = True,
               formulations: tuple[str, ...] = ("auto",)) -> RuleReport:
  """The checker on one case of a grid: its arguments built in ``dtype`` (float64 by default)
  and compared with a random cotangent.

  Args:
    grid: the :class:`Grid` (its op's manual rule and twin).
    case: one of its cases.
    dtype: ``jnp.float64`` (the proof) or a lower precision.
    rtol: the largest relative error allowed; default the platform's tolerance for ``dtype``
      (:func:`tolerances`).
    vmap: also compare the manual VJP under ``jax.vmap``.
    dtypes: also check that the gradients of the case's float32 arguments are float32 and
      shaped as their arguments.
    seed: seed of the arguments and the cotangent.
    raises: raise :class:`RuleMismatch` on failure (else only return the report).
    formulations: trace the manual rule in each of these (see :func:`jlayers.formulation`),
      against one evaluation of the twin; the report holds the worst of them.

  Returns:
    A :class:`RuleReport`.
  """
  dtype = jnp.dtype(dtype)
  if rtol is None:
    rtol = tolerances().get(str(dtype), tolerances()["float32"])
  dtype_args = case.make(np.random.default_rng(seed), jnp.float32) if dtypes else None
  report = _compare(grid.manual, grid.reference, case, case.make, dtype,
                    name=f"{grid.name}[{case.id}]", rtol=rtol, seed=seed, vmap=vmap,
                    dtype_args=dtype_args, formulations=formulations)
  if raises and not report.passed:
    raise RuleMismatch(str(report))
  return report


def _check_cases(grid: Grid, cases, *, dtype=jnp.float64, rtol: float | None = None,
                 vmap: bool = True, dtypes: bool = True, seed: int = 0,
                 formulations: tuple[str, ...] = ("auto",)) -> list[RuleReport]:
  """:func:`check_case` (``raises=False``) on several cases of ``grid`` compiled as one
  program: the same draws and the same reports as case by case, in less compile time (the
  test suite runs every grid case through it, a few cases at a time)."""
  dtype = jnp.dtype(dtype)
  if rtol is None:
    rtol = tolerances().get(str(dtype), tolerances()["float32"])
  items = [(case, case.make, f"{grid.name}[{case.id}]",
            case.make(np.random.default_rng(seed), jnp.float32) if dtypes else None)
           for case in cases]
  return _compare_many(grid.manual, grid.reference, items, dtype, rtol=rtol, seed=seed,
                       vmap=vmap, formulations=formulations)


# ---------------------------------------------------------------------------------------------
# Whole models.


def grad_differences(loss_fn: Callable[..., jax.Array], params: Any, *args,
                     **kwargs) -> dict[str, float]:
  """Relative difference of the manual and autodiff gradients, per param leaf.

  Computes ``g_m = grad(loss_fn)(params, *args, impl="manual", **kwargs)`` and ``g_a`` with
  ``impl="autodiff"``, both in one ``jax.jit`` (``args`` are traced, ``kwargs`` are static),
  and for every leaf the relative :func:`error` ``max|g_m − g_a| / max|g_a|``. Inside
  ``jax.enable_x64(True)`` with float64 params and inputs the two agree to ~1e-13.

  A leaf whose gradient is zero in exact arithmetic (the bias of a convolution that feeds
  batch norm) compares rounding noise with rounding noise and reads as a large relative
  difference; leave such redundant params out (``use_bias=False``), as is usual anyway.

  Args:
    loss_fn: ``loss_fn(params, *args, impl=..., **kwargs) -> float[]``.
    params: pytree of float arrays, the point where the gradients are taken.
    *args: arrays (pytrees) passed on to ``loss_fn``, e.g. state, batch, key.
    **kwargs: static configuration passed on to ``loss_fn``.

  Returns:
    ``{jax.tree_util.keystr(path): relative difference}`` over the leaves of ``params``.
  """
  def both(params, *args):
    return tuple(jax.grad(functools.partial(loss_fn, impl=impl, **kwargs))(params, *args)
                 for impl in ("manual", "autodiff"))

  manual, autodiff = jax.jit(both)(params, *args)
  return {jax.tree_util.keystr(path): error(a, b).relative
          for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(manual),
                                  jax.tree_util.tree_leaves(autodiff))}


def max_grad_difference(loss_fn: Callable[..., jax.Array], params: Any, *args,
                        **kwargs) -> float:
  """The worst leaf of :func:`grad_differences`: one number for a whole model.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.Sequential([jlayers.Linear(4), jlayers.ReLU(), jlayers.Linear(1)])
    >>> params, state = model.init(jax.random.key(0), (8, 3))
    >>> def loss(params, x, *, impl):
    ...   return jnp.sum(model.apply(params, state, x, impl=impl)[0] ** 2)
    >>> jlayers.max_grad_difference(loss, params, jnp.ones((8, 3))) < 1e-6
    True
  """
  return max(grad_differences(loss_fn, params, *args, **kwargs).values(), default=0.0)


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
