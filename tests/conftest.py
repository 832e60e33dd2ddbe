"""Strict numerics for the whole suite: no implicit rank or dtype promotion, x64 only locally.

The suite runs on every core (``pytest -n auto --dist loadgroup``): the 8-device mesh tests
form one group, so one worker starts their subprocess once, and they are collected first, so
that it runs while the other workers take the rest.

The suite compiles a few thousand tiny programs, and on the CPU most of each compile is LLVM's
optimisation of the generated code, which none of the tests measures (they check values,
dtypes and compiled HLO, not speed): the backend's optimisation level is lowered for the test
process and its subprocesses, before JAX starts its backend. Benchmarks and examples run
with XLA's defaults.
"""

import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_collection_modifyitems(items):
  """The mesh group first (its one subprocess is the longest single task)."""
  items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
