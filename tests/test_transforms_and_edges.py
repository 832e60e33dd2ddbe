"""Every op under JAX's other transformations (forward mode, hessian, remat, scan), and the
sharp edges: NaN through relu, empty batch norms, per-device scales, other PRNG keys, rate 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlayers
from jlayers import layers as L
from jlayers import testing
from jlayers.grids import GRIDS

FIRST = [pytest.param(grid, grid.representative_cases[0], id=grid.name)
         for grid in GRIDS.values()]


def _args(grid, case, dtype=jnp.float32, seed=0):
  args = case.make(np.random.default_rng(seed), dtype)
  return args, tuple(args[i] for i in case.diff)


def _scalar(fn, case, args):
  """A scalar loss of the op's outputs: a fixed random projection of every float leaf."""
  def loss(*primals):
    out = testing.restrict(fn, case, args)(*primals)
    total = 0.0
    for k, leaf in enumerate(jax.tree_util.tree_leaves(out)):
      w = jnp.cos(jnp.arange(leaf.size, dtype=leaf.dtype) + k).reshape(leaf.shape)
      total = total + jnp.sum(w * leaf)
    return total
  return loss


# --- forward mode ------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, case", FIRST)
def test_forward_mode_raises_for_the_rule_and_works_for_the_twin(grid, case):
  """``jax.jvp`` / ``jacfwd`` of a custom_vjp rule raise (JAX has no forward mode for it); the
  twin, i.e. ``impl="autodiff"``, supports forward mode. Traced under jit: the rule raises while
  tracing, before anything is compiled, and the twin's JVP is one program."""
  args, primals = _args(grid, case)
  tangents = tuple(jax.device_put(np.ones(p.shape, p.dtype)) for p in primals)
  manual, twin = (testing.restrict(fn, case, args) for fn in (grid.manual, grid.reference))
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jit(lambda p, t: jax.jvp(manual, p, t))(primals, tangents)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jit(jax.jacfwd(manual))(*primals)
  out, _ = jax.jit(lambda p, t: jax.jvp(twin, p, t))(primals, tangents)
  assert jax.tree_util.tree_leaves(out)


@pytest.mark.parametrize("grid, case", FIRST)
def test_hessian_forward_over_reverse_equals_the_twins(grid, case):
  with jax.enable_x64(True):
    args, primals = _args(grid, case, jnp.float64)
    hess = lambda fn: jax.jit(jax.hessian(_scalar(fn, case, args)))(*primals[:1])  # noqa: E731
    assert testing.error(hess(grid.manual), hess(grid.reference)).relative <= 1e-9


def test_a_model_on_the_twins_supports_forward_mode():
  model = jlayers.Sequential([L.Conv2d(2, 3), L.BatchNorm(), L.ReLU(), L.Flatten(), L.Linear(2)])
  params, state = model.init(jax.random.key(0), (2, 4, 4, 1))
  x = jnp.ones((2, 4, 4, 1))
  f = lambda impl: lambda x: model.apply(params, state, x, train=True, impl=impl)[0]  # noqa: E731
  y, dy = jax.jit(lambda x: jax.jvp(f("autodiff"), (x,), (jnp.ones_like(x),)))(x)
  assert dy.shape == y.shape == (2, 2)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jit(lambda x: jax.jvp(f("manual"), (x,), (jnp.ones_like(x),)))(x)


# --- remat and scan ----------------------------------------------------------------------------

CHECKPOINT_POLICIES = (None, "nothing_saveable", "dots_saveable")


@pytest.mark.parametrize("grid, case", FIRST)
def test_checkpoint_leaves_gradients_unchanged(grid, case):
  """Under ``jax.checkpoint`` with each policy of ``CHECKPOINT_POLICIES``, the gradients of the
  plain function (computed once)."""
  args, primals = _args(grid, case)
  loss = _scalar(grid.manual, case, args)
  argnums = tuple(range(len(primals)))
  plain = jax.jit(jax.grad(loss, argnums=argnums))(*primals)
  for policy in CHECKPOINT_POLICIES:
    policy_fn = None if policy is None else getattr(jax.checkpoint_policies, policy)
    remat = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy_fn), argnums=argnums))(*primals)
    for a, b in zip(plain, remat):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"policy {policy}")


@pytest.mark.parametrize("grid, case", FIRST)
def test_the_op_inside_lax_scan(grid, case):
  """Scanning the op over two stacked sets of differentiable inputs (the others fixed) gives
  each set's result and gradient."""
  (args, first), (_, second) = (_args(grid, case, seed=s) for s in (0, 1))
  stacked = jax.tree_util.tree_map(  # on the host: no program compiled per shape
      lambda a, b: jax.device_put(np.stack([np.asarray(a), np.asarray(b)])), first, second)
  loss = _scalar(grid.manual, case, args)

  def scanned(stacked):
    def body(total, primals):
      return total + loss(*primals), None
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), stacked)[0]

  value, grads = jax.jit(jax.value_and_grad(scanned))(stacked)
  each = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(first)))))
  values = []
  for k, primals in enumerate((first, second)):
    v, g = each(*primals)
    values.append(float(v))
    for a, b in zip(jax.tree_util.tree_map(lambda t: np.asarray(t)[k], grads), g):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(value, sum(values), rtol=1e-5)


# --- relu --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [jlayers.relu, jlayers.reference.relu], ids=["manual", "twin"])
def test_relu_passes_nan_and_gives_positive_zero(fn):
  x = jnp.array([jnp.nan, -0.0, 0.0, -jnp.inf, jnp.inf, -1.0, 2.0])
  y = fn(x)
  assert bool(jnp.isnan(y[0]))
  np.testing.assert_array_equal(y[1:], [0.0, 0.0, 0.0, jnp.inf, 0.0, 2.0])
  assert not bool(jnp.any(jnp.signbit(y[1:])))
  g = jax.grad(lambda x: jnp.sum(fn(x) * jnp.arange(1.0, 8.0)))(x)
  np.testing.assert_array_equal(g, [1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 7.0])


# --- batch norm --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [jlayers.batch_norm, jlayers.reference.batch_norm],
                         ids=["manual", "twin"])
def test_batch_norm_on_zero_features_gives_empty_outputs(fn):
  x = jnp.ones((4, 0))
  (y, mean, var), g = jax.jit(lambda x: (
      fn(x, jnp.ones(0), jnp.zeros(0)),
      jax.grad(lambda x: jnp.sum(fn(x, jnp.ones(0), jnp.zeros(0))[0]))(x)))(x)
  assert y.shape == (4, 0) and mean.shape == var.shape == (0,)
  assert g.shape == (4, 0)


def test_batch_norm_layer_keeps_its_running_statistics_on_an_empty_batch():
  bn = L.BatchNorm()
  params, state = bn.init(jax.random.key(0), (0, 3))
  state = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 5.0, 6.0])}
  y, new_state = jax.jit(lambda p, s, x: bn.apply(p, s, x, train=True))(params, state,
                                                                       jnp.ones((0, 3)))
  assert y.shape == (0, 3)
  for name in ("mean", "var"):
    np.testing.assert_array_equal(new_state[name], state[name])


@pytest.mark.parametrize("grad_outside", [False, True])
def test_synchronised_batch_norm_with_a_scale_per_device(grad_outside):
  """``vmap`` with ``axis_name`` and a batched scale: each device's γ multiplies its own
  elements; the manual rule and autodiff of the twin agree (float64)."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((4, 5, 3)))
    scale = jnp.asarray(rng.standard_normal((4, 3))) + 2.0
    offset = jnp.asarray(rng.standard_normal((4, 3)))
    w = jnp.asarray(rng.standard_normal((4, 5, 3)))

    def local(fn):
      def f(x, s, o, w):
        y, m, v = fn(x, s, o, axis_name="d")
        return jnp.sum(w * y) + jnp.sum(jnp.sin(m)) + jnp.sum(v * s)
      return f

    def grads(fn):
      if grad_outside:
        total = lambda x, s, o: jnp.sum(jax.vmap(local(fn), axis_name="d")(x, s, o, w))  # noqa: E731
        return jax.grad(total, argnums=(0, 1, 2))(x, scale, offset)
      return jax.vmap(jax.grad(local(fn), argnums=(0, 1, 2)), axis_name="d")(x, scale, offset, w)

    got, want = jax.jit(lambda: (grads(jlayers.batch_norm),
                                 grads(jlayers.reference.batch_norm)))()
    for a, b in zip(got, want):
      assert testing.error(a, b).relative < 1e-12


# --- dropout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [jlayers.dropout, jlayers.reference.dropout],
                         ids=["manual", "twin"])
@pytest.mark.parametrize("rate", [1.0, jnp.float32(1.0)], ids=["python", "traced"])
def test_dropout_rate_one_drops_everything_with_zero_gradient(fn, rate):
  x = jnp.arange(1.0, 7.0)

  def loss(x, r):
    return jnp.sum(fn(x, jax.random.key(0), rate=r))

  if isinstance(rate, float):  # checked and closed over at trace time
    y, g = jax.jit(jax.value_and_grad(lambda x: loss(x, rate)))(x)
  else:  # one compiled function for every rate
    y, g = jax.jit(jax.value_and_grad(loss))(x, rate)
  assert float(y) == 0.0
  np.testing.assert_array_equal(g, np.zeros(6))


def test_dropout_layer_accepts_rate_one():
  y, _ = L.Dropout(1.0).apply({}, {}, jnp.ones(4), key=jax.random.key(0), train=True)
  np.testing.assert_array_equal(y, np.zeros(4))


def test_dropout_accepts_raw_keys_of_other_prng_implementations():
  x = jnp.ones(64)
  rbg = jax.random.wrap_key_data(jnp.arange(4, dtype=jnp.uint32), impl="rbg")
  want = jlayers.dropout(x, rbg, rate=0.5)
  np.testing.assert_array_equal(jlayers.dropout(x, jnp.arange(4, dtype=jnp.uint32), rate=0.5),
                                want)
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  try:
    raw = jax.random.PRNGKey(0)
    assert raw.shape == (4,)
    for fn in (jlayers.dropout, jlayers.reference.dropout):
      y = jax.jit(lambda x, k, fn=fn: fn(x, k, rate=0.5))(x, raw)
      assert set(np.unique(np.asarray(y)).tolist()) <= {0.0, 2.0}
    threefry = jnp.array([0, 7], jnp.uint32)  # a threefry key still reads as threefry
    np.testing.assert_array_equal(
        jlayers.dropout(x, threefry, rate=0.5),
        jlayers.dropout(x, jax.random.wrap_key_data(threefry, impl="threefry2x32"), rate=0.5))
  finally:
    jax.config.update("jax_default_prng_impl", previous)


def test_dropout_rejects_other_raw_key_shapes():
  with pytest.raises(TypeError, match=r"raw uint32\[2\] or uint32\[4\] key .*got uint32\[3\]"):
    jlayers.dropout(jnp.ones(3), jnp.zeros(3, jnp.uint32), rate=0.5)
