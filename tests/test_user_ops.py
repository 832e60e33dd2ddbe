"""Users' own ops: the op table, the impl switch, the model-level check and the public checker."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jlayers
from jlayers import check, testing
from jlayers.layers import Layer

KEY = jax.random.key(0)


def _softsign_reference(x):
  return x / (1 + jnp.abs(x))


def _softsign_rule(scale):
  """A custom_vjp softsign whose backward is ``scale`` times the true derivative."""
  @jax.custom_vjp
  def softsign(x):
    return _softsign_reference(x)

  def bwd(x, g):
    return (scale * g / (1 + jnp.abs(x)) ** 2,)

  softsign.defvjp(lambda x: (_softsign_reference(x), x), bwd)
  return softsign


class Softsign(Layer):
  """A user's layer calling a user's op through the table."""

  kind = "softsign"

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    return jlayers.op("softsign", impl)(x), state


@pytest.fixture
def softsign_registered():
  def register(scale):
    jlayers.register_op("softsign", _softsign_rule(scale), _softsign_reference, replace=True)
  yield register
  jlayers.unregister_op("softsign")


def _model_difference():
  model = jlayers.Sequential([jlayers.Linear(4), Softsign(), jlayers.Linear(1)])
  with jax.enable_x64(True):
    params, state = model.init(KEY, (5, 3), input_dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    x = jax.random.normal(KEY, (5, 3), jnp.float64)

    def loss(params, x, *, impl):
      return jnp.sum(model.apply(params, state, x, impl=impl)[0] ** 2)

    return jlayers.max_grad_difference(loss, params, x)


def test_a_users_op_follows_impl_and_max_grad_difference_sees_it(softsign_registered):
  softsign_registered(1.0)
  assert jlayers.op("softsign", "autodiff") is _softsign_reference
  assert _model_difference() < 1e-13
  softsign_registered(1.01)  # a wrong rule: 1 % off
  assert 1e-3 < _model_difference() < 0.1


def test_register_op_refuses_to_overwrite_and_bad_arguments():
  with pytest.raises(ValueError, match="'relu' is one of jlayers' own ops"):
    jlayers.register_op("relu", _softsign_rule(1.0), _softsign_reference, replace=True)
  jlayers.register_op("twice", _softsign_rule(1.0), _softsign_reference)
  try:
    with pytest.raises(ValueError, match="an op named 'twice' is registered already"):
      jlayers.register_op("twice", _softsign_rule(2.0), _softsign_reference)
  finally:
    jlayers.unregister_op("twice")
  with pytest.raises(KeyError, match="no op of yours is registered as 'twice'"):
    jlayers.unregister_op("twice")
  with pytest.raises(TypeError, match="register_op: name must be a non-empty string"):
    jlayers.register_op("", _softsign_rule(1.0), _softsign_reference)
  with pytest.raises(TypeError, match="register_op: reference must be callable, got int"):
    jlayers.register_op("x", _softsign_rule(1.0), 3)
  with pytest.raises(KeyError, match="nosuchop: no op of that name is registered"):
    jlayers.op("nosuchop")


def test_check_rule_passes_a_right_rule_with_errors_per_argument():
  x = jnp.linspace(-2.0, 2.0, 9)
  report = testing.check_rule(_softsign_rule(1.0), _softsign_reference, x)
  assert report.passed and set(report.grads) == {0} and report.dtype == "float64"
  assert report.forward == (0.0, 0.0)
  assert report.grads[0].relative < 1e-14 and report.grads[0].absolute < 1e-14
  assert report.vmap.relative < 1e-14


def test_check_rule_raises_on_a_wrong_rule_naming_the_argument():
  x = jnp.linspace(-2.0, 2.0, 9)
  with pytest.raises(testing.RuleMismatch, match=r"FAILED .* grad of argument 0 1\.0\de-03"):
    testing.check_rule(_softsign_rule(1.001), _softsign_reference, x)
  report = testing.check_rule(_softsign_rule(1.001), _softsign_reference, x, raises=False)
  assert not report.passed and 9e-4 < report.grads[0].relative < 1.1e-3


def test_check_rule_catches_a_gradient_of_the_wrong_dtype():
  @jax.custom_vjp
  def scale(x, w):
    return x * w

  scale.defvjp(lambda x, w: (x * w, (x, w)),
               lambda res, g: ((g * res[1]).astype(jnp.float32), jnp.sum(g * res[0])))
  x, w = jnp.ones(3, jnp.bfloat16), jnp.asarray(2.0, jnp.bfloat16)
  with pytest.raises(testing.RuleMismatch,
                     match=r"gradient of argument 0 is float32\[3\] for an argument bfloat16"):
    testing.check_rule(scale, lambda x, w: x * w, x, w)


USER_MODULE = textwrap.dedent("""
    import jax, jax.numpy as jnp
    import jlayers
    from jlayers.testing import Case, Grid, normal

    def reference(x):
      return x / (1 + jnp.abs(x))

    @jax.custom_vjp
    def softsign(x):
      return reference(x)

    softsign.defvjp(lambda x: (reference(x), x),
                    lambda x, g: (SCALE * g / (1 + jnp.abs(x)) ** 2,))

    GRIDS = [Grid(jlayers.Op("softsign", softsign, reference),
                  (Case("3x4", lambda rng, dtype: (normal(rng, (3, 4), dtype),)),))]
""")


@pytest.mark.parametrize("scale, status", [(1.0, 0), (1.01, 1)])
def test_check_cli_runs_a_users_module(tmp_path, monkeypatch, capsys, scale, status):
  (tmp_path / f"user_ops_{status}.py").write_text(f"SCALE = {scale}\n" + USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  assert check.main(["--module", f"user_ops_{status}"]) == status
  assert "| softsign | 3x4 |" in capsys.readouterr().out


def test_importing_jlayers_imports_no_grid_and_no_bench_peer():
  code = ("import sys, jlayers; print(sorted(m for m in sys.modules if m.startswith("
          "('jlayers.grids', 'flax', 'torch'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}).stdout
  assert out.strip() == "[]"


def test_registering_an_op_never_changes_what_a_built_in_layer_runs(softsign_registered):
  layer = jlayers.ReLU()
  x = jnp.linspace(-1.0, 1.0, 5)
  before = str(jax.make_jaxpr(lambda x: layer.apply({}, {}, x)[0])(x))
  softsign_registered(2.0)
  table = jlayers.registered_ops()
  table["relu"] = table["softsign"]  # the copy a user may edit is not the table
  with pytest.raises(ValueError, match="'relu' is one of jlayers' own ops"):
    jlayers.register_op("relu", _softsign_rule(2.0), _softsign_reference)
  after = str(jax.make_jaxpr(lambda x: layer.apply({}, {}, x)[0])(x))
  assert after == before and "custom_vjp_call" in after
  assert jlayers.op("relu") is jlayers.relu and jlayers.registered_ops()["relu"].manual is (
      jlayers.relu)
