"""The package as a user meets it: imports, exports, docstrings, README and CI agree."""

import inspect
import pathlib
import re

import jax
import numpy as np
import pytest

import jlayers
from jlayers import reference
from jlayers.grids import GRIDS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_declared_op_is_exported_with_its_twin_and_its_grid():
  ops = jlayers.registered_ops()
  assert list(GRIDS) == list(ops)  # every op has a grid, in the order the ops are declared
  for name, grid in GRIDS.items():
    assert grid.op is ops[name]
    module = inspect.getmodule(grid.manual)
    assert getattr(module, f"{name}_op") is grid.op, f"{module.__name__} declares {name}_op"
    assert getattr(jlayers, name) is grid.manual and name in jlayers.__all__
    assert getattr(reference, name) is grid.reference
    assert inspect.signature(grid.manual) == inspect.signature(grid.reference), name
  assert reference.__all__ == sorted(GRIDS) and dir(reference) == sorted(GRIDS)
  with pytest.raises(AttributeError, match="has no twin 'nosuchop'"):
    reference.nosuchop  # noqa: B018
  for name in jlayers.__all__:
    assert hasattr(jlayers, name), name


def test_public_functions_document_shapes_and_dtypes():
  for name, grid in GRIDS.items():
    doc = inspect.getdoc(grid.manual)
    assert "Args:" in doc and "Returns:" in doc, name
    assert re.search(r"float\[", doc), f"{name}: no shapes in the docstring"
    assert "Examples:" in doc, name


def test_every_backward_rule_writes_out_its_derivation():
  for module in {inspect.getmodule(grid.manual) for grid in GRIDS.values()}:
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
  tour, llama, transformer, generation, composite, own_op, layouts = _readme_blocks("python")
  namespace = {}
  with jax.numpy_dtype_promotion("standard"):  # as users run it (optax mixes int and float)
    exec(compile(tour, "README.md", "exec"), namespace)  # noqa: S102
  for a, b in zip(namespace["g_manual"], namespace["g_auto"]):
    assert float(abs(a - b).max() / abs(b).max()) < 1e-5
  assert namespace["worst"] < 1e-3
  namespace = {}
  exec(compile(llama, "README.md", "exec"), namespace)  # noqa: S102
  assert np.isfinite(float(namespace["loss"]))
  assert sorted(namespace["grads"]) == ["block_0", "block_1", "embed", "head", "norm"]
  namespace = {}
  exec(compile(transformer, "README.md", "exec"), namespace)  # noqa: S102
  differences = namespace["differences"]
  assert len(differences) > 30
  assert max(v for k, v in differences.items() if "'key']['bias'" not in k) < 1e-12
  namespace = {}
  exec(compile(generation, "README.md", "exec"), namespace)  # noqa: S102
  out = namespace["out"]
  assert out.tokens.shape == (2, 20)
  assert all(1 <= n <= 20 for n in out.lengths.tolist())
  namespace = {}
  exec(compile(composite, "README.md", "exec"), namespace)  # noqa: S102
  assert sorted(namespace["params"]) == ["bn1", "bn2", "bn_proj", "conv1", "conv2", "proj"]
  namespace = {}
  try:
    exec(compile(own_op, "README.md", "exec"), namespace)  # noqa: S102
  finally:
    if "softsign" in jlayers.registered_ops():
      jlayers.unregister_op("softsign")
  assert namespace["report"].passed
  namespace = {}
  exec(compile(layouts, "README.md", "exec"), namespace)  # noqa: S102
  assert "head" not in namespace["specs"]  # tied: the embedding is the head
  assert namespace["specs"]["embed"]["embedding"] == jax.sharding.PartitionSpec("model", "data")


def test_layers_import_the_ops_they_run_and_look_nothing_up_by_name():
  """A reader follows a layer's input into its op's module by an import: no layer module calls
  the table (``jlayers.op``) or names an op by a string."""
  for path in (ROOT / "jlayers" / "layers").glob("*.py"):
    text = path.read_text()
    assert "_ops" not in text and "registered_ops" not in text, path.name
    assert not re.search(r"\bop\(\s*[\"']", text), f"{path.name} looks an op up by name"
  assert "from jlayers.linear import linear_op" in (ROOT / "jlayers" / "layers" /
                                                    "dense.py").read_text()


def test_op_modules_read_top_to_bottom_and_stay_short():
  """Every op module: no more than about 350 lines, and no private name imported from another
  op module (shared helpers live in the private ``_*`` modules)."""
  op_modules = {inspect.getmodule(grid.manual) for grid in GRIDS.values()}
  names = {m.__name__.rsplit(".", 1)[1] for m in op_modules}
  for module in op_modules:
    text = pathlib.Path(module.__file__).read_text()
    assert len(text.splitlines()) <= 360, module.__name__
    for other in names:
      assert not re.search(rf"from jlayers\.{other} import .*\b_\w", text), (
          f"{module.__name__} imports a private name of jlayers.{other}")


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
