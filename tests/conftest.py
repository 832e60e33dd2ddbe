"""Strict numerics for the whole suite: no implicit rank or dtype promotion, x64 only locally.

The suite runs on every core (``pytest -n auto``). The 8-device mesh tests read the report of
one subprocess (``tests/mesh_worker.py``), which one worker starts in the background as soon
as they are collected; they are put last, so that it runs while the workers take the rest.

The suite compiles a few thousand tiny programs, and on the CPU most of each compile is the
generation and optimisation of machine code, which none of the tests measures (they check
values, dtypes and compiled HLO, not speed). For the test process and its subprocesses, set
before JAX starts its backend: LLVM's optimisation level is lowered; fusions are emitted by
XLA's loop emitters rather than through its MLIR fusion pipeline (the same fusions, about a
third of the compile time; a few elementwise functions such as tanh round differently in the
last bits, as they do between optimisation levels); and each program's code is one LLVM
module rather than several compiled in parallel (on two shared cores the split costs more
than it saves).
Benchmarks and examples run with XLA's defaults.
"""

import os

_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
          "--xla_cpu_parallel_codegen_split_count=1")
for _flag in _FLAGS:
  if _flag.split("=")[0] + "=" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


_STARTED = []


def pytest_collection_modifyitems(items):
  """The mesh tests last, their subprocess started now (by one worker, or the one process)."""
  mesh = [item for item in items if item.path.name == "test_mesh.py"]
  if not mesh:
    return
  items[:] = [item for item in items if item.path.name != "test_mesh.py"] + mesh
  if os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
    from helpers import start_mesh_worker  # noqa: PLC0415

    _STARTED.append(start_mesh_worker())


def pytest_unconfigure():
  """The subprocess is waited for (it writes its report even if no test read it)."""
  for process in _STARTED:
    process.wait(timeout=900)
