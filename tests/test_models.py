"""Sequential models: structure, training with optax, per-layer keys, the impl switch, and the
model-level manual-versus-autodiff gradient check."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlayers
from jlayers import layers as L
from jlayers.activation import relu_reference
from jlayers.layers import stateless
from jlayers.models import Sequential
from jlayers.testing import grad_differences, max_grad_difference

KEY = jax.random.key(0)
IN_SHAPE = (4, 6, 6, 2)


def _cnn():
  # The convolution feeding batch norm has no bias: its gradient is exactly zero there, and a
  # relative difference of two rounding noises is meaningless.
  return Sequential([
      L.Conv2d(3, 3, use_bias=False), L.BatchNorm(), L.ReLU(), L.MaxPool2d(2),
      L.Conv2d(4, 2, padding="VALID"), L.ReLU(), L.AvgPool2d(2), L.Flatten(),
      L.Dropout(0.3), L.Linear(3),
  ])


def _batch(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(IN_SHAPE), dtype)
  return x, jnp.asarray(rng.integers(0, 3, IN_SHAPE[0]), jnp.int32)


def _loss(model, params, state, x, labels, key, *, impl):
  logits, _ = model.apply(params, state, x, key=key, train=True, impl=impl)
  return jnp.mean(jlayers.reference.softmax_cross_entropy_with_integer_labels(logits, labels))


def _has_custom_vjp(fn, *args):
  return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def _wrong_relu(monkeypatch):
  """Swaps in a relu whose manual rule passes the gradient through negative inputs too."""

  @jax.custom_vjp
  def bad(x):
    return jnp.maximum(x, 0)

  bad.defvjp(lambda x: (jnp.maximum(x, 0), None), lambda _, g: (g,))
  _swap_relu(monkeypatch, bad)


def _swap_relu(monkeypatch, manual):
  """The ReLU layer runs ``manual`` as its rule (the op it imports, swapped in its module)."""
  monkeypatch.setattr(stateless, "relu_op", jlayers.Op("relu", manual, relu_reference))


# --- structure -----------------------------------------------------------------------------------

def test_param_and_state_structure_and_shape_threading():
  model = _cnn()
  params, state = model.init(KEY, IN_SHAPE)
  shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), (params, state))
  assert shapes == (
      {"conv2d_0": {"kernel": (3, 3, 2, 3)},
       "batch_norm_1": {"scale": (3,), "offset": (3,)},
       "conv2d_4": {"kernel": (2, 2, 3, 4), "bias": (4,)},
       "linear_9": {"kernel": (4, 3), "bias": (3,)}},
      {"batch_norm_1": {"mean": (3,), "var": (3,)}})
  assert model.output_shape(IN_SHAPE) == (4, 3)
  assert model.names[:3] == ("conv2d_0", "batch_norm_1", "relu_2")


def test_nested_sequential_and_nchw():
  block = Sequential([L.Conv2d(2, 3, layout="NCHW"), L.BatchNorm(axis=1), L.ReLU()])
  model = Sequential([block, block, L.Flatten(), L.Linear(5)])
  params, state = model.init(KEY, (2, 1, 4, 4))
  assert sorted(params) == ["linear_3", "sequential_0", "sequential_1"]
  assert params["sequential_1"]["conv2d_0"]["kernel"].shape == (2, 2, 3, 3)
  assert sorted(state["sequential_0"]) == ["batch_norm_1"]
  y, _ = jax.jit(model.apply)(params, state, jnp.ones((2, 1, 4, 4)))
  assert y.shape == (2, 5)


def test_train_updates_state_and_eval_keeps_it():
  model = _cnn()
  params, state = model.init(KEY, IN_SHAPE)
  x, _ = _batch()
  eval_state, train_state = jax.jit(lambda params, state, x: (  # one program
      model.apply(params, state, x)[1], model.apply(params, state, x, key=KEY, train=True)[1]))(
          params, state, x)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, eval_state, state))
  assert not np.array_equal(train_state["batch_norm_1"]["mean"], state["batch_norm_1"]["mean"])


def test_bad_models_and_params_raise():
  with pytest.raises(TypeError, match=r"Sequential: layers\[1\] must be a jlayers layer"):
    Sequential([L.ReLU(), jax.nn.relu])
  with pytest.raises(TypeError, match="Sequential: layers must be a list of layers, a mapping"):
    Sequential(L.ReLU())
  model = Sequential([L.Linear(2)])
  params, state = model.init(KEY, (1, 3))
  with pytest.raises(KeyError, match=r"Sequential: params has no entry 'linear_0' for child "
                                    r"'linear_0' \(it has \['linear_1'\]\)"):
    model.apply({"linear_1": params["linear_0"]}, state, jnp.ones((1, 3)))
  with pytest.raises(ValueError, match=r"Sequential: params has entries \['linear_1'\] that "
                                      r"match no child \(children: \['linear_0'\]\)"):
    model.apply({**params, "linear_1": params["linear_0"]}, state, jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="impl must be 'manual' or 'autodiff'"):
    model.apply(params, state, jnp.ones((1, 3)), impl="reference")
  with pytest.raises(ValueError, match="linear: x's last dimension must equal w's first"):
    model.apply(params, state, jnp.ones((1, 4)))


# --- training ------------------------------------------------------------------------------------

def test_optax_adam_steps_reduce_the_loss():
  model = _cnn()
  params, state = model.init(KEY, IN_SHAPE)
  x, labels = _batch()
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, state, opt_state, key):
    def loss_fn(p):
      logits, new_state = model.apply(p, state, x, key=key, train=True)
      xent = jlayers.softmax_cross_entropy_with_integer_labels
      return jnp.mean(xent(logits, labels)), new_state
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # optax's bias correction mixes int32 and float, which the suite's strict mode rejects.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  losses = []
  for i in range(8):
    params, state, opt_state, loss = step(params, state, opt_state, jax.random.fold_in(KEY, i))
    losses.append(float(loss))
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      model.init(KEY, IN_SHAPE)[0])
  assert losses[-1] < losses[0]


# --- keys ----------------------------------------------------------------------------------------

def test_each_dropout_layer_gets_its_own_key():
  model = Sequential([L.Dropout(0.5), L.ReLU(), L.Dropout(0.5)])
  x = jnp.ones((1, 400))
  y, _ = model.apply({}, {}, x, key=KEY, train=True)
  # Child keys are folded from the children's names, as in every Composite.
  keys = [jax.random.fold_in(KEY, zlib.crc32(name.encode()) & 0x7FFFFFFF)
          for name in ("dropout_0", "dropout_2")]
  first, _ = L.Dropout(0.5).apply({}, {}, x, key=keys[0], train=True)
  second, _ = L.Dropout(0.5).apply({}, {}, x, key=keys[1], train=True)
  np.testing.assert_array_equal(y, first * second)
  assert not np.array_equal(first, second)
  # One shared mask would keep half of the entries; two independent ones keep a quarter.
  assert 0.15 < float(jnp.mean(y != 0)) < 0.35


def test_model_dropout_needs_key_only_in_train():
  model = _cnn()
  params, state = model.init(KEY, IN_SHAPE)
  x, _ = _batch()
  with pytest.raises(ValueError, match="Dropout: train=True needs a PRNG key"):
    model.apply(params, state, x, train=True)
  model.apply(params, state, x)


# --- the impl switch -----------------------------------------------------------------------------

def test_jaxpr_of_manual_has_custom_vjp_and_autodiff_has_none():
  model = _cnn()
  params, state = model.init(KEY, IN_SHAPE)
  x, _ = _batch()
  for train in (True, False):
    apply = functools.partial(model.apply, key=KEY, train=train)
    assert _has_custom_vjp(functools.partial(apply, impl="manual"), params, state, x)
    assert not _has_custom_vjp(functools.partial(apply, impl="autodiff"), params, state, x)


def test_switching_impl_on_one_jitted_function(monkeypatch):
  # A distinguishable manual relu (double the output) makes each impl's result recognisable.
  _swap_relu(monkeypatch, lambda x: 2 * relu_reference(x))
  model = Sequential([L.Linear(3), L.ReLU()])
  params, state = model.init(KEY, (2, 4))
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4)), jnp.float32)
  apply = jax.jit(model.apply, static_argnames=("train", "impl"))
  out = {impl: apply(params, state, x, impl=impl)[0]
         for impl in ("manual", "autodiff", "manual", "autodiff")}
  for impl in ("manual", "autodiff"):
    np.testing.assert_array_equal(out[impl], model.apply(params, state, x, impl=impl)[0])
  np.testing.assert_allclose(out["manual"], 2 * out["autodiff"])
  assert float(jnp.max(out["autodiff"])) > 0


def test_train_steps_closing_over_impl_keep_their_own_rule(monkeypatch):
  _wrong_relu(monkeypatch)
  model = Sequential([L.Linear(5), L.ReLU(), L.Linear(1)])
  params, state = model.init(KEY, (6, 3))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 3)), jnp.float32)

  def make_step(impl):
    @jax.jit
    def step(params):
      return jax.grad(lambda p: jnp.sum(model.apply(p, state, x, impl=impl)[0] ** 2))(params)
    return step

  steps = {impl: make_step(impl) for impl in ("autodiff", "manual")}
  grads = {impl: steps[impl](params) for impl in ("manual", "autodiff", "manual")}
  for impl in ("manual", "autodiff"):
    eager = jax.grad(lambda p: jnp.sum(model.apply(p, state, x, impl=impl)[0] ** 2))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads[impl]), jax.tree_util.tree_leaves(eager)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(grads["manual"]["linear_0"]["kernel"],
                         grads["autodiff"]["linear_0"]["kernel"])


# --- the model-level gradient check --------------------------------------------------------------

def _cnn_grad_differences():
  model = _cnn()
  with jax.enable_x64(True):
    params, state = jax.tree_util.tree_map(  # widened on the host: no convert programs
        lambda a: jax.device_put(np.asarray(a, np.float64)),
        model.init(KEY, IN_SHAPE, input_dtype=jnp.float64))
    x, labels = _batch(jnp.float64)
    return grad_differences(functools.partial(_loss, model), params, state, x, labels, KEY)


def test_manual_and_autodiff_model_gradients_agree_in_float64():
  diffs = _cnn_grad_differences()
  assert sorted(diffs)[0] == "['batch_norm_1']['offset']" and len(diffs) == 7
  assert max(diffs.values()) <= 1e-10, diffs


def test_gradient_check_catches_a_wrong_rule(monkeypatch):
  _wrong_relu(monkeypatch)
  assert max(_cnn_grad_differences().values()) > 1e-2


def test_max_grad_difference_passes_kwargs_and_reduces():
  model = Sequential([L.Linear(2)])
  params, state = model.init(KEY, (3, 2))

  def loss(params, x, *, scale, impl):
    return scale * jnp.sum(model.apply(params, state, x, impl=impl)[0])

  assert max_grad_difference(loss, params, jnp.ones((3, 2)), scale=2.0) == 0.0
