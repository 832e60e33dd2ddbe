"""Small helpers shared by the op-specific test modules."""

import importlib.util
import pathlib

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
