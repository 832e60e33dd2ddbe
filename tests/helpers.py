"""Small helpers shared by the op-specific test modules."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import jax.test_util
import numpy as np
import pytest

from jlayers.testing import saved_residuals


def raises_eager_and_jit(exc, match, fn, *args):
  """``fn(*args)`` raises ``exc`` matching ``match`` both eagerly and while tracing under jit."""
  with pytest.raises(exc, match=match):
    fn(*args)
  with pytest.raises(exc, match=match):
    jax.jit(fn)(*args)


GRADIENT_CHECK_EPS = 1e-4
"""The finite-difference step of ``jax.test_util.check_grads`` (its default)."""


def check_vjps_in_one_program(f, args, *, order, atol, rtol, eps=GRADIENT_CHECK_EPS):
  """``jax.test_util.check_grads(f, args, order, modes=("rev",), atol=atol, rtol=rtol)``, with
  every evaluation it asks for computed by one jitted program.

  ``check_grads`` runs ``jax.test_util.check_vjp`` on ``f`` and then on its VJP applied to its
  own output (``order`` levels): each compares the VJP against central differences along one
  random tangent, projected on one random cotangent (both drawn from ``RandomState(0)``).
  Run as is, each level compiles a program per primitive of its VJP. Here the values each
  level needs (the function at the arguments and at the arguments plus and minus ``eps`` times
  the tangent, its VJP output and its pullback of the cotangent) come from one program, and
  ``check_vjp`` itself then runs on functions that return them and fail on any other point,
  so the comparisons and tolerances are those of ``check_grads``.
  """
  args = tuple(np.asarray(a) for a in args)
  levels = [jax.jit(f)]  # jitted: traced once for the several points
  for _ in range(order - 1):
    levels.append(jax.jit(_pullback_of_own_output(levels[-1])))
  cotangents = []
  for g in levels:  # check_vjp's draws, in its order: the tangent, then the cotangent
    rng = np.random.RandomState(0)
    tangent = [np.asarray(rng.randn(*a.shape), dtype=a.dtype) for a in args]
    cotangents.append(jax.tree_util.tree_map(
        lambda s, rng=rng: np.asarray(rng.randn(*s.shape), dtype=s.dtype),
        jax.eval_shape(g, *args)))
  delta = [np.multiply(t, np.array(eps, dtype=t.dtype), dtype=t.dtype) for t in tangent]
  plus = tuple(np.array(a + d, dtype=a.dtype) for a, d in zip(args, delta))
  minus = tuple(np.array(a - d, dtype=a.dtype) for a, d in zip(args, delta))

  def values(args, plus, minus, cotangents):
    result = []
    for g, cot in zip(levels, cotangents):
      out, pullback = jax.vjp(g, *args)
      result.append((out, pullback(cot), g(*args), g(*plus), g(*minus)))
    return result

  def same(xs, ys):
    xs, ys = jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(ys)
    return len(xs) == len(ys) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(xs, ys))

  computed = jax.jit(values)(args, plus, minus, cotangents)
  for level, (cot, (out, pulled, at_args, at_plus, at_minus)) in enumerate(
      zip(cotangents, computed)):
    table = ((args, at_args), (plus, at_plus), (minus, at_minus))

    def g(*x, table=table):
      for point, value in table:
        if same(x, point):
          return value
      raise AssertionError("check_vjp evaluated the function at a point not computed")

    def g_vjp(*x, out=out, pulled=pulled, cot=cot):
      assert same(x, args), "check_vjp took the VJP at a point not computed"

      def pullback(c):
        assert same(c, cot), "check_vjp pulled back a cotangent not computed"
        return pulled

      return out, pullback

    jax.test_util.check_vjp(g, g_vjp, args, atol=atol, rtol=rtol, eps=eps,
                            err_msg=" of ".join(["VJP"] * (level + 1)))


def _pullback_of_own_output(f):
  """The function ``check_grads`` checks at the next order: ``f``'s VJP applied to its output."""

  def f_vjp(*args):
    out, pullback = jax.vjp(f, *args)
    return pullback(out)

  return f_vjp


def residual_avals(fn, *args):
  """Shapes and dtypes of what ``fn`` saves for its backward pass (arguments included)."""
  return [aval for aval, _ in saved_residuals(fn, *args)]


def load_example(name):
  """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


MESH_WORKER = pathlib.Path(__file__).with_name("mesh_worker.py")


def mesh_report_path() -> pathlib.Path:
  """Where ``tests/mesh_worker.py`` writes its report: one file per test run, the same for
  every pytest-xdist worker of the run."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
  return pathlib.Path(tempfile.gettempdir()) / f"jlayers-mesh-{run}.json"


def start_mesh_worker() -> subprocess.Popen:
  """Starts ``tests/mesh_worker.py`` on 8 CPU devices in the background and returns at once:
  it runs while the other tests do, and :func:`mesh_report` waits for what it writes."""
  path = mesh_report_path()
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  with open(path.with_suffix(".err"), "w") as err:
    return subprocess.Popen([sys.executable, str(MESH_WORKER), str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=err)


def mesh_report(timeout: float = 900.0) -> dict:
  """The report of the worker :func:`start_mesh_worker` started for this run (starting it if
  nothing has), once it is written."""
  path = mesh_report_path()
  started = None
  if not path.exists() and not path.with_suffix(".err").exists():
    started = start_mesh_worker()
  deadline = time.monotonic() + timeout
  while not path.exists():
    if time.monotonic() > deadline:
      pytest.fail(f"tests/mesh_worker.py wrote no report in {timeout:.0f} s: "
                  + path.with_suffix(".err").read_text()[-4000:])
    time.sleep(0.5)
  if started is not None:
    started.wait()
  report = json.loads(path.read_text())
  assert "error" not in report, report["error"] + path.with_suffix(".err").read_text()[-4000:]
  return report
