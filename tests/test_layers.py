"""Layer objects: shape inference, initialisers, batch-norm statistics, dropout, config checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.nn import initializers

from jlayers import layers as L

KEY = jax.random.key(0)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


# --- shape inference and initialisation --------------------------------------------------------

def test_linear_infers_in_features_and_computes_affine_map():
  layer = L.Linear(3)
  params, state = layer.init(KEY, (2, 4, 5))
  assert _shapes(params) == {"kernel": (5, 3), "bias": (3,)} and state == {}
  np.testing.assert_array_equal(params["bias"], np.zeros(3))
  x = _normal(1, (2, 4, 5))
  y, new_state = layer.apply(params, state, x)
  expected = np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  assert new_state == {}
  assert L.Linear(3, use_bias=False).init(KEY, (2, 5))[0].keys() == {"kernel"}


@pytest.mark.parametrize("layout, kernel_shape, out_shape", [
    ("NHWC", (3, 2, 2, 6), (2, 3, 5, 6)),
    ("NCHW", (6, 2, 3, 2), (2, 6, 3, 5)),
])
def test_conv2d_kernel_layout_and_output_shape(layout, kernel_shape, out_shape):
  layer = L.Conv2d(6, (3, 2), stride=(2, 1), groups=2, layout=layout)
  in_shape = (2, 6, 5, 4) if layout == "NHWC" else (2, 4, 6, 5)
  params, _ = layer.init(KEY, in_shape)
  assert _shapes(params) == {"kernel": kernel_shape, "bias": (6,)}
  assert layer.output_shape(in_shape) == out_shape


def test_conv2d_nchw_kernel_is_the_transposed_nhwc_kernel():
  """The initialiser always sees HWIO (fan-in kh·kw·in), whatever the layout."""
  k_nhwc = L.Conv2d(4, 3).init(KEY, (1, 5, 5, 2))[0]["kernel"]
  k_nchw = L.Conv2d(4, 3, layout="NCHW").init(KEY, (1, 2, 5, 5))[0]["kernel"]
  np.testing.assert_array_equal(np.transpose(np.asarray(k_nhwc), (3, 2, 0, 1)), k_nchw)


def test_conv2d_matches_lax_convolution():
  layer = L.Conv2d(3, 2, stride=2, padding=((1, 0), (0, 1)), use_bias=False)
  x = _normal(2, (2, 5, 5, 2))
  params, state = layer.init(KEY, x.shape)
  y, _ = layer.apply(params, state, x)
  expected = jax.lax.conv_general_dilated(x, params["kernel"], (2, 2), ((1, 0), (0, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_initializers_are_overridable():
  layer = L.Linear(2, kernel_init=initializers.constant(0.5), bias_init=initializers.ones)
  params, _ = layer.init(KEY, (1, 3))
  np.testing.assert_array_equal(params["kernel"], np.full((3, 2), 0.5))
  np.testing.assert_array_equal(params["bias"], np.ones(2))
  bn = L.BatchNorm(scale_init=initializers.zeros, offset_init=initializers.ones)
  params, _ = bn.init(KEY, (4, 3))
  np.testing.assert_array_equal(params["scale"], np.zeros(3))
  np.testing.assert_array_equal(params["offset"], np.ones(3))


def test_param_dtype_and_half_precision_input():
  params, _ = L.Conv2d(2, 3, param_dtype=jnp.bfloat16).init(KEY, (1, 4, 4, 1))
  assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  bn = L.BatchNorm(param_dtype=jnp.bfloat16)
  params, state = bn.init(KEY, (2, 3), input_dtype=jnp.bfloat16)
  assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert {a.dtype for a in jax.tree_util.tree_leaves(state)} == {jnp.dtype(jnp.float32)}
  x = _normal(7, (2, 3)).astype(jnp.bfloat16)
  y, state = bn.apply(params, state, x, train=True)
  assert y.dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree_util.tree_leaves(state)} == {jnp.dtype(jnp.float32)}
  assert bn.apply(params, state, x)[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("layer, shape", [
    (L.Linear(3, dtype=jnp.bfloat16), (4, 5)),
    (L.Conv2d(3, 3, dtype=jnp.bfloat16), (2, 5, 5, 2)),
    (L.BatchNorm(dtype=jnp.bfloat16), (4, 5)),
], ids=["linear", "conv2d", "batch_norm"])
def test_dtype_computes_in_bfloat16_with_float32_params(layer, shape):
  """Flax's mixed precision: params stay float32 (``param_dtype``), the layer computes in
  ``dtype``, and each gradient comes back in its own input's dtype."""
  params, state = layer.init(KEY, shape)
  assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  x = _normal(3, shape)

  def loss(params, x):
    y, _ = layer.apply(params, state, x, train=True)
    assert y.dtype == jnp.bfloat16
    return jnp.sum(jnp.sin(3 * y.astype(jnp.float32)))

  full = type(layer)(**{**{f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)},
                        "dtype": None})
  (g_params, g_x), g_full = jax.jit(lambda params, x: (  # one program
      jax.grad(loss, argnums=(0, 1))(params, x),
      jax.grad(lambda p, x: jnp.sum(jnp.sin(3 * full.apply(p, state, x, train=True)[0])),
               argnums=(0, 1))(params, x)))(params, x)
  assert g_x.dtype == jnp.float32
  assert {a.dtype for a in jax.tree_util.tree_leaves(g_params)} == {jnp.dtype(jnp.float32)}
  for a, b in zip(jax.tree_util.tree_leaves((g_params, g_x)), jax.tree_util.tree_leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("field, value, error", [
    ("dtype", jnp.int32, "Linear: dtype must be None or a float dtype, got"),
    ("param_dtype", None, "Linear: param_dtype must be a float dtype, got None"),
    ("param_dtype", "int8", "Linear: param_dtype must be a float dtype, got .int8."),
    ("precision", "fastest-ever", "Linear: precision must be None, a jax.lax.Precision"),
])
def test_dtype_and_precision_fields_are_validated(field, value, error):
  with pytest.raises(TypeError, match=error):
    L.Linear(3, **{field: value})


@pytest.mark.parametrize("layer, in_shape, out_shape", [
    (L.ReLU(), (2, 3), (2, 3)),
    (L.Flatten(), (2, 3, 4, 5), (2, 60)),
    (L.Dropout(0.5), (2, 3), (2, 3)),
    (L.MaxPool2d(2), (1, 5, 4, 3), (1, 2, 2, 3)),
    (L.AvgPool2d((2, 3), stride=1, layout="NCHW"), (1, 3, 5, 4), (1, 3, 4, 2)),
])
def test_parameter_free_layers(layer, in_shape, out_shape):
  assert layer.init(KEY, in_shape) == ({}, {})
  assert layer.output_shape(in_shape) == out_shape


def test_pools_compute_max_and_mean():
  x = jnp.arange(16.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
  y_max, _ = L.MaxPool2d(2).apply({}, {}, x)
  y_avg, _ = L.AvgPool2d(2).apply({}, {}, x)
  np.testing.assert_array_equal(y_max[0, :, :, 0], [[5.0, 7.0], [13.0, 15.0]])
  np.testing.assert_array_equal(y_avg[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])


# --- batch norm --------------------------------------------------------------------------------

def test_batch_norm_params_and_state_structure():
  params, state = L.BatchNorm(axis=1).init(KEY, (2, 3, 4, 4))
  assert _shapes(params) == {"scale": (3,), "offset": (3,)}
  assert _shapes(state) == {"mean": (3,), "var": (3,)}
  np.testing.assert_array_equal(params["scale"], np.ones(3))
  np.testing.assert_array_equal(state["mean"], np.zeros(3))
  np.testing.assert_array_equal(state["var"], np.ones(3))


def test_batch_norm_train_updates_running_stats_by_hand():
  layer = L.BatchNorm(momentum=0.9)
  x = _normal(3, (6, 2, 3)) * 2.0 + 1.0
  params, _ = layer.init(KEY, x.shape)
  state = {"mean": jnp.array([0.5, -1.0, 2.0]), "var": jnp.array([2.0, 0.5, 1.0])}
  y, new_state = layer.apply(params, state, x, train=True)
  xs = np.asarray(x, np.float64).reshape(-1, 3)
  mu, var = xs.mean(0), xs.var(0)  # biased, as documented
  np.testing.assert_allclose(new_state["mean"], 0.9 * np.array([0.5, -1.0, 2.0]) + 0.1 * mu,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state["var"], 0.9 * np.array([2.0, 0.5, 1.0]) + 0.1 * var,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), (xs - mu) / np.sqrt(var + 1e-5),
                             rtol=1e-4, atol=1e-5)


def test_batch_norm_eval_uses_running_stats_and_keeps_state():
  layer = L.BatchNorm(eps=1e-3)
  x = _normal(4, (5, 2))
  params = {"scale": jnp.array([2.0, 0.5]), "offset": jnp.array([0.1, -0.2])}
  state = {"mean": jnp.array([1.0, -1.0]), "var": jnp.array([4.0, 0.25])}
  y, new_state = layer.apply(params, state, x, train=False)
  expected = (np.asarray(x) - [1.0, -1.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-3) * [2.0, 0.5]
  np.testing.assert_allclose(y, expected + [0.1, -0.2], rtol=1e-5, atol=1e-6)
  assert new_state is state


def test_batch_norm_running_stats_are_not_differentiated():
  layer = L.BatchNorm()
  x = _normal(5, (4, 3))
  params, state = layer.init(KEY, x.shape)
  grad = jax.grad(lambda x: sum(jnp.sum(v) for v in layer.apply(
      params, state, x, train=True)[1].values()))(x)
  np.testing.assert_array_equal(grad, np.zeros_like(x))


# --- dropout -----------------------------------------------------------------------------------

def test_dropout_needs_key_in_train_mode():
  with pytest.raises(ValueError, match="key"):
    L.Dropout(0.5).apply({}, {}, jnp.ones(4), train=True)
  with pytest.raises(ValueError, match="key"):
    jax.jit(lambda x: L.Dropout(0.5).apply({}, {}, x, train=True))(jnp.ones(4))


def test_dropout_is_identity_in_eval_and_inverted_in_train():
  x = _normal(6, (4, 50))
  y, _ = L.Dropout(0.75).apply({}, {}, x)
  assert y is x
  y, _ = L.Dropout(0.75).apply({}, {}, x, key=jax.random.key(1), train=True)
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 4.0 * np.asarray(x)[kept], rtol=1e-6)
  assert 0 < kept.mean() < 0.5


def test_dropout_broadcast_dims_share_the_mask():
  y, _ = L.Dropout(0.5, broadcast_dims=(1,)).apply(
      {}, {}, jnp.ones((8, 5)), key=jax.random.key(2), train=True)
  y = np.asarray(y)
  assert (y == y[:, :1]).all() and {0.0, 2.0} == set(y.ravel().tolist())


# --- apply-time and config checks --------------------------------------------------------------

@pytest.mark.parametrize("layer", [L.Linear(2), L.ReLU(), L.Flatten(), L.Dropout(0.1)])
def test_apply_checks_impl_and_train(layer):
  params, state = layer.init(KEY, (2, 3))
  with pytest.raises(ValueError, match="impl must be 'manual' or 'autodiff', got 'fast'"):
    layer.apply(params, state, jnp.ones((2, 3)), impl="fast")
  with pytest.raises(TypeError, match="train must be a Python bool"):
    jax.jit(lambda t: layer.apply(params, state, jnp.ones((2, 3)), train=t))(True)


@pytest.mark.parametrize("make, error, match", [
    (lambda: L.Linear(0), ValueError, "Linear: features must be positive, got 0"),
    (lambda: L.Linear(2.5), TypeError, "Linear: features must be an int"),
    (lambda: L.Linear(2, use_bias="yes"), TypeError, "use_bias must be a bool"),
    (lambda: L.Linear(2, kernel_init=0.1), TypeError, "kernel_init must be an initializer"),
    (lambda: L.Conv2d(4, 0), ValueError, "Conv2d: kernel_size must be positive"),
    (lambda: L.Conv2d(4, (3, 3, 3)), TypeError, "kernel_size must be an int or a sequence"),
    (lambda: L.Conv2d(4, 3, padding="FULL"), ValueError, "padding must be 'SAME', 'VALID'"),
    (lambda: L.Conv2d(4, 3, padding=-1), ValueError, "padding must be non-negative"),
    (lambda: L.Conv2d(4, 3, groups=3), ValueError, "groups=3 must divide features=4"),
    (lambda: L.Conv2d(4, 3, layout="NWHC"), ValueError, "layout must be 'NHWC' or 'NCHW'"),
    (lambda: L.BatchNorm(momentum=1.5), ValueError, "momentum must be in"),
    (lambda: L.BatchNorm(eps=0.0), ValueError, "eps must be in"),
    (lambda: L.BatchNorm(axis=1.0), TypeError, "axis must be an int"),
    (lambda: L.BatchNorm(axis_name=["i"]), TypeError, "axis_name must be None or a hashable"),
    (lambda: L.Dropout(1.5), ValueError, r"Dropout: rate must be in \[0.0, 1.0\], got 1.5"),
    (lambda: L.Dropout(-0.1), ValueError, "rate must be in"),
    (lambda: L.Dropout("0.5"), TypeError, "rate must be a float"),
    (lambda: L.Dropout(0.5, broadcast_dims=1), TypeError, "broadcast_dims must be a sequence"),
    (lambda: L.MaxPool2d(0), ValueError, "MaxPool2d: window must be positive"),
    (lambda: L.AvgPool2d(2, stride=(1, 0)), ValueError, "stride must be positive"),
    (lambda: L.AvgPool2d(2, count_include_pad=1), TypeError, "count_include_pad must be a bool"),
])
def test_bad_config_raises(make, error, match):
  with pytest.raises(error, match=match):
    make()


@pytest.mark.parametrize("layer, shape, error, match", [
    (L.Conv2d(4, 3), (2, 5, 5), ValueError, "Conv2d: input_shape must have rank 4"),
    (L.Conv2d(4, 3, groups=2), (2, 5, 5, 3), ValueError, r"groups=2 must divide the input"),
    (L.BatchNorm(axis=2), (2, 3), ValueError, "BatchNorm: axis=2 is out of range"),
    (L.Linear(2), (), ValueError, "Linear: input_shape must have rank at least 1"),
    (L.Linear(2), "ab", TypeError, "input_shape must be a sequence of ints"),
    (L.MaxPool2d(2), (2, 4, 4), ValueError, "MaxPool2d: input_shape must have rank 4"),
])
def test_bad_input_shape_raises(layer, shape, error, match):
  with pytest.raises(error, match=match):
    layer.init(KEY, shape)


def test_layers_are_frozen_and_hashable():
  layer = L.Conv2d(4, [3, 3], padding=[[1, 1], [0, 0]])
  assert layer.kernel_size == (3, 3) and layer.padding == ((1, 1), (0, 0))
  assert hash(layer) == hash(L.Conv2d(4, 3, padding=((1, 1), (0, 0))))
  with pytest.raises(dataclasses.FrozenInstanceError):
    layer.features = 8
