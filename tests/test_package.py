"""The package as a user meets it: imports, exports, docstrings, README and CI agree."""

import inspect
import pathlib
import re

import jax
import pytest

import jlayers
from jlayers import reference
from jlayers.registry import OPS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_registered_op_is_exported_with_its_twin():
  for name, spec in OPS.items():
    assert getattr(jlayers, name) is spec.manual
    assert getattr(reference, name) is spec.reference
    assert inspect.signature(spec.manual) == inspect.signature(spec.reference), name
  assert set(reference.__all__) == set(OPS)
  for name in jlayers.__all__:
    assert hasattr(jlayers, name), name


def test_public_functions_document_shapes_and_dtypes():
  for name, spec in OPS.items():
    doc = inspect.getdoc(spec.manual)
    assert "Args:" in doc and "Returns:" in doc, name
    assert re.search(r"float\[", doc), f"{name}: no shapes in the docstring"
    assert "Examples:" in doc, name


def test_every_backward_rule_writes_out_its_derivation():
  for module in {inspect.getmodule(spec.manual) for spec in OPS.values()}:
    bwd_rules = [f for n, f in vars(module).items() if n.endswith("_bwd") and callable(f)]
    assert bwd_rules, module.__name__
    for f in bwd_rules:
      doc = inspect.getdoc(f) or ""
      assert ".. math::" in doc and "∂" in doc, f"{module.__name__}.{f.__name__}"


def _readme_blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_exactly_the_readmes_test_command():
  commands = [c.strip() for c in _readme_blocks("bash") if "pytest" in c]
  assert len(commands) == 1
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert commands[0] in ci


def test_readme_python_blocks_run():
  tour, transformer, composite, own_op = _readme_blocks("python")
  namespace = {}
  with jax.numpy_dtype_promotion("standard"):  # as users run it (optax mixes int and float)
    exec(compile(tour, "README.md", "exec"), namespace)  # noqa: S102
  for a, b in zip(namespace["g_manual"], namespace["g_auto"]):
    assert float(abs(a - b).max() / abs(b).max()) < 1e-5
  assert namespace["worst"] < 1e-3
  namespace = {}
  exec(compile(transformer, "README.md", "exec"), namespace)  # noqa: S102
  differences = namespace["differences"]
  assert len(differences) > 30
  assert max(v for k, v in differences.items() if "'key']['bias'" not in k) < 1e-12
  namespace = {}
  exec(compile(composite, "README.md", "exec"), namespace)  # noqa: S102
  assert sorted(namespace["params"]) == ["bn1", "bn2", "bn_proj", "conv1", "conv2", "proj"]
  namespace = {}
  try:
    exec(compile(own_op, "README.md", "exec"), namespace)  # noqa: S102
  finally:
    jlayers._impl._TABLE.pop("softsign", None)
  assert namespace["report"].passed


def test_the_op_table_holds_every_registry_op():
  """Layers look ops up in the table; the tests and CLIs iterate the registry: they agree."""
  table = jlayers.registered_ops()
  for name, spec in OPS.items():
    assert table[name] == (spec.manual, spec.reference), name


def test_saved_residuals_is_the_one_private_import_and_fails_clearly(monkeypatch):
  import sys  # noqa: PLC0415

  from jlayers import testing  # noqa: PLC0415

  avals = [a.shape for a, _ in testing.saved_residuals(jlayers.relu, jax.numpy.ones(3))]
  assert avals == [(3,)]
  monkeypatch.setitem(sys.modules, "jax._src.ad_checkpoint", None)  # as if it had moved
  with pytest.raises(RuntimeError, match="has no jax._src.ad_checkpoint.saved_residuals; use "
                                         "jax.ad_checkpoint.print_saved_residuals"):
    testing.saved_residuals(jlayers.relu, jax.numpy.ones(3))
  sources = [p for p in (ROOT / "jlayers").rglob("*.py") if "jax._src" in p.read_text()]
  assert [p.name for p in sources] == ["testing.py"]
