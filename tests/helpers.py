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
import pytest

from jlayers.testing import saved_residuals


def raises_eager_and_jit(exc, match, fn, *args):
  """``fn(*args)`` raises ``exc`` matching ``match`` both eagerly and while tracing under jit."""
  with pytest.raises(exc, match=match):
    fn(*args)
  with pytest.raises(exc, match=match):
    jax.jit(fn)(*args)


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
