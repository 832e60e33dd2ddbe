"""Models beyond Sequential: Residual, Composite and Scope, named children, clear errors."""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlayers
from jlayers import layers as L

KEY = jax.random.key(0)


@dataclasses.dataclass(frozen=True)
class TwoBranch(jlayers.Composite):
  """An arbitrary topology as a short class: two branches, concatenated, then a head."""

  features: int

  def forward(self, scope, x):
    a = scope("left", L.Linear(self.features), x)
    b = scope("right", jlayers.Sequential([L.Linear(self.features), L.Dropout(0.5)]), x)
    h = scope("act", L.ReLU(), jnp.concatenate([a, b], axis=-1))
    return scope("head", L.Linear(1), h)


def test_composite_threads_params_state_keys_train_and_impl():
  model = TwoBranch(8)
  params, state = model.init(KEY, (4, 5))
  assert sorted(params) == ["head", "left", "right"] and state == {}
  assert params["head"]["kernel"].shape == (16, 1)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
  y_eval, _ = model.apply(params, state, x)
  y_a, _ = model.apply(params, state, x, key=KEY, train=True)
  y_b, _ = model.apply(params, state, x, key=jax.random.key(1), train=True)
  assert y_eval.shape == (4, 1) and not np.allclose(y_a, y_b)  # dropout active, per key
  loss = lambda p, *, impl: jnp.sum(model.apply(p, state, x, key=KEY, train=True,  # noqa: E731
                                                impl=impl)[0] ** 2)
  assert jlayers.max_grad_difference(loss, params) < 1e-5


def test_children_keys_differ_and_do_not_depend_on_call_order():
  keys = []

  class Spy(L.Layer):
    kind = "spy"

    def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
      keys.append(jax.random.key_data(key))
      return x, state

  @dataclasses.dataclass(frozen=True)
  class Pair(jlayers.Composite):
    swap: bool

    def forward(self, scope, x):
      order = ("b", "a") if self.swap else ("a", "b")
      for name in order:
        x = scope(name, Spy(), x)
      return x

  Pair(False).apply({}, {}, jnp.ones(2), key=KEY)
  Pair(True).apply({}, {}, jnp.ones(2), key=KEY)
  a, b, b2, a2 = keys
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, a2)
  np.testing.assert_array_equal(b, b2)


def test_residual_identity_and_projection():
  body = jlayers.Sequential([L.Linear(4), L.ReLU(), L.Linear(4)])
  block = jlayers.Residual(body)
  params, state = block.init(KEY, (3, 4))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
  y, _ = block.apply(params, state, x)
  np.testing.assert_allclose(y, body.apply(params["body"], {}, x)[0] + x, rtol=1e-6)
  projected = jlayers.Residual(jlayers.Sequential([L.Linear(6)]), shortcut=L.Linear(6))
  params, state = projected.init(KEY, (3, 4))
  assert sorted(params) == ["body", "shortcut"]
  y, _ = projected.apply(params, state, x)
  want = (L.Linear(6).apply(params["body"]["linear_0"], {}, x)[0]
          + L.Linear(6).apply(params["shortcut"], {}, x)[0])
  np.testing.assert_allclose(y, want, rtol=1e-6)


def test_residual_shape_mismatch_and_bad_children_are_clear_errors():
  with pytest.raises(ValueError, match=r"Residual: the body's output has shape \(3, 6\) but x "
                                       r"\(the identity shortcut\) has \(3, 4\)"):
    jlayers.Residual(L.Linear(6)).init(KEY, (3, 4))
  with pytest.raises(TypeError, match="Residual: body must be a jlayers layer, got str"):
    jlayers.Residual("relu")
  with pytest.raises(TypeError, match="Residual: shortcut must be None or a jlayers layer"):
    jlayers.Residual(L.ReLU(), shortcut="identity")

  @dataclasses.dataclass(frozen=True)
  class Clash(jlayers.Composite):
    def forward(self, scope, x):
      return scope("a", L.Linear(2), scope("a", L.Linear(2), x))

  with pytest.raises(ValueError, match="Clash: two different children are named 'a'"):
    Clash().init(KEY, (1, 2))


def test_shared_child_reuses_its_params():
  @dataclasses.dataclass(frozen=True)
  class Twice(jlayers.Composite):
    layer: L.Layer = L.Linear(3)

    def forward(self, scope, x):
      return scope("shared", self.layer, scope("shared", self.layer, x))

  params, state = Twice().init(KEY, (2, 3))
  assert list(params) == ["shared"]
  y, _ = Twice().apply(params, state, jnp.ones((2, 3)))
  lin = lambda v: v @ params["shared"]["kernel"] + params["shared"]["bias"][None]  # noqa: E731
  np.testing.assert_allclose(y, lin(lin(jnp.ones((2, 3)))), rtol=1e-6)


def test_scope_rejects_unknown_entries():
  params, state = TwoBranch(2).init(KEY, (1, 3))
  with pytest.raises(ValueError, match=r"TwoBranch: params has entries \['typo'\] that match "
                                       r"no child"):
    TwoBranch(2).apply({**params, "typo": {}}, state, jnp.ones((1, 3)))


@pytest.mark.parametrize("layers", [
    {"conv": L.Conv2d(2, 3), "act": L.ReLU(), "out": L.Linear(3)},
    [("conv", L.Conv2d(2, 3)), ("act", L.ReLU()), ("out", L.Linear(3))],
], ids=["mapping", "pairs"])
def test_sequential_names_are_stable_when_a_layer_is_inserted(layers):
  model = jlayers.Sequential(layers)
  assert model.names == ("conv", "act", "out")
  params, state = model.init(KEY, (1, 4, 4, 1))
  items = list(layers.items()) if isinstance(layers, dict) else list(layers)
  grown = jlayers.Sequential([items[0], ("bn", L.BatchNorm()), *items[1:]])
  g_params, g_state = grown.init(KEY, (1, 4, 4, 1))
  assert set(g_params) == {"conv", "bn", "out"}
  g_params = {**g_params, "conv": params["conv"], "out": params["out"]}  # the old checkpoint
  y, _ = grown.apply(g_params, g_state, jnp.ones((1, 4, 4, 1)))
  assert y.shape == (1, 4, 4, 3)


def test_sequential_name_errors():
  with pytest.raises(ValueError, match=r"Sequential: names must be unique, got \['a', 'a'\]"):
    jlayers.Sequential([("a", L.ReLU()), ("a", L.ReLU())])
  with pytest.raises(TypeError, match="Sequential: the name of layers\\[0\\] must be a "
                                      "non-empty string, got 3"):
    jlayers.Sequential([(3, L.ReLU())])
  with pytest.raises(TypeError, match="Sequential: layers\\[1\\] must be a jlayers layer"):
    jlayers.Sequential({"a": L.ReLU(), "b": jnp.tanh})


@pytest.mark.parametrize("layer, shape, tree, entry", [
    (L.Linear(3), (2, 4), "params", "kernel"),
    (L.Linear(3), (2, 4), "params", "bias"),
    (L.Conv2d(2, 3), (1, 4, 4, 1), "params", "kernel"),
    (L.BatchNorm(), (2, 3), "params", "scale"),
    (L.BatchNorm(), (2, 3), "state", "var"),
], ids=["linear-kernel", "linear-bias", "conv-kernel", "bn-scale", "bn-state-var"])
def test_a_missing_entry_names_the_layer_the_entry_and_what_is_there(layer, shape, tree, entry):
  params, state = layer.init(KEY, shape)
  trees = {"params": dict(params), "state": dict(state)}
  del trees[tree][entry]
  has = sorted(trees[tree])
  with pytest.raises(KeyError, match=rf"{type(layer).__name__}: {tree} has no entry '{entry}' "
                                     rf"\(it has {has!r}".replace("[", r"\[").replace("]", r"\]")):
    jax.jit(lambda p, s: layer.apply(p, s, jnp.ones(shape), train=True))(
        trees["params"], trees["state"])


# --- a ResNet-style digits model -------------------------------------------------------------

def resnet(dtype=None):
  """Two residual blocks (the second with a strided projection shortcut), batch norm inside
  (momentum 0.9: the running statistics settle within an epoch of 44 steps)."""
  def block(features, stride):
    body = jlayers.Sequential({
        "conv1": L.Conv2d(features, 3, stride=stride, use_bias=False, dtype=dtype),
        "bn1": L.BatchNorm(momentum=0.9, dtype=dtype), "relu": L.ReLU(),
        "conv2": L.Conv2d(features, 3, use_bias=False, dtype=dtype),
        "bn2": L.BatchNorm(momentum=0.9, dtype=dtype)})
    shortcut = None if stride == 1 else jlayers.Sequential({
        "proj": L.Conv2d(features, 1, stride=stride, use_bias=False, dtype=dtype),
        "bn": L.BatchNorm(momentum=0.9, dtype=dtype)})
    return jlayers.Sequential({"residual": jlayers.Residual(body, shortcut=shortcut),
                               "relu": L.ReLU()})
  return jlayers.Sequential({
      "stem": L.Conv2d(16, 3, use_bias=False, dtype=dtype), "stem_bn": L.BatchNorm(momentum=0.9, dtype=dtype),
      "stem_relu": L.ReLU(), "block1": block(16, 1), "block2": block(32, 2),
      "pool": L.AvgPool2d(4), "flatten": L.Flatten(), "head": L.Linear(10, dtype=dtype)})


@pytest.fixture(scope="module")
def digits():
  path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
  grid = importlib.util.spec_from_file_location("train_digits", path)
  module = importlib.util.module_from_spec(grid)
  grid.loader.exec_module(module)
  return module.load_data(0)


def _xent(logits, labels, impl):
  return jlayers.op("softmax_cross_entropy_with_integer_labels", impl)(logits, labels).mean()


def test_resnet_manual_and_autodiff_gradients_agree_in_float64(digits):
  x_train, y_train, _, _ = digits
  model = resnet()
  with jax.enable_x64(True):
    params, state = jax.tree_util.tree_map(  # widened on the host: no convert programs
        lambda a: jax.device_put(np.asarray(a, np.float64)), model.init(KEY, (16, 8, 8, 1)))
    assert "shortcut" in params["block2"]["residual"]
    assert "shortcut" not in params["block1"]["residual"]

    def loss(params, state, x, y, *, impl):
      logits, _ = model.apply(params, state, x, train=True, impl=impl)
      return _xent(logits, y, impl)

    worst = jlayers.max_grad_difference(loss, params, state, jnp.asarray(x_train[:16],
                                                                          jnp.float64),
                                        jnp.asarray(y_train[:16]))
  assert worst <= 1e-12, worst


def test_resnet_trains_to_97_percent(digits):
  x_train, y_train, x_test, y_test = digits
  model = resnet()
  params, state = model.init(KEY, (32, 8, 8, 1))
  # 5 epochs reach 98.3 % held-out (8 reach 99.4 %, 3 only 97.2 %): the property with a margin.
  epochs, steps = 5, len(x_train) // 32
  optimizer = optax.adam(optax.cosine_decay_schedule(3e-3, epochs * steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, state, opt_state, x, y):
    def loss(params):
      logits, new_state = model.apply(params, state, x, train=True)
      return _xent(logits, y, "manual"), new_state
    (_, state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state

  rng = np.random.default_rng(0)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and float
    for _ in range(epochs):
      order = rng.permutation(len(x_train))
      for i in range(steps):
        idx = order[i * 32:(i + 1) * 32]
        params, state, opt_state = step(params, state, opt_state, x_train[idx], y_train[idx])
  logits, _ = jax.jit(lambda p, s, x: model.apply(p, s, x))(params, state, x_test)
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == y_test))
  assert accuracy >= 0.97, accuracy
