"""Golden values, an independent NumPy forward, conventions, residuals and bad input of
``layer_norm``, ``rms_norm`` and ``group_norm`` (the generic checks are in
test_ops_generic.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers

LAYER = pytest.mark.parametrize("fn", [jlayers.layer_norm, jlayers.reference.layer_norm],
                                ids=["manual", "twin"])
RMS = pytest.mark.parametrize("fn", [jlayers.rms_norm, jlayers.reference.rms_norm],
                              ids=["manual", "twin"])
GROUP = pytest.mark.parametrize("fn", [jlayers.group_norm, jlayers.reference.group_norm],
                                ids=["manual", "twin"])


def _vjp(fn, args, cot, **kwargs):
  """``fn``'s output and VJP, jitted (one compile rather than one per operation)."""
  def run(args, cot):
    out, pullback = jax.vjp(lambda *a: fn(*a, **kwargs), *args)
    return out, pullback(cot)
  return jax.jit(run)(args, cot)


@LAYER
def test_layer_norm_golden_values_and_gradient(fn):
  # x = [1, 2, 3]: μ = 2, σ² = 2/3, r = √1.5, x̂ = √1.5 [-1, 0, 1]. For g = [1, 0, 0]:
  # mean g = 1/3, mean(g x̂) = -√1.5/3, dx = r (g - 1/3 - x̂ mean(g x̂)) = √1.5 [1/6, -1/3, 1/6].
  r = math.sqrt(1.5)
  with jax.enable_x64(True):
    x = jnp.array([[1.0, 2.0, 3.0]], jnp.float64)
    scale, offset = jnp.array([2.0, 1.0, 1.0]), jnp.array([0.0, 0.5, 0.0])
    y, (dx, ds, do) = _vjp(fn, (x, scale, offset), jnp.array([[1.0, 0.0, 0.0]]), eps=1e-300)
  np.testing.assert_allclose(y, [[-2 * r, 0.5, r]], rtol=1e-14)
  # ĝ = γ g = [2, 0, 0]: twice the dx above; dγ = g x̂, dβ = g.
  np.testing.assert_allclose(dx, [[2 * r / 6, -2 * r / 3, 2 * r / 6]], rtol=1e-13)
  np.testing.assert_allclose(ds, [-r, 0.0, 0.0], rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(do, [1.0, 0.0, 0.0])


@RMS
def test_rms_norm_golden_values_and_gradient(fn):
  # x = [3, 4]: mean square 12.5, r = 1/√12.5. For g = [1, 0]: mean(g x̂) = 3 r / 2, so
  # dx = r (g - x̂ · 3r/2) = r ([1, 0] - [9, 12]/25) = r [16/25, -12/25].
  r = 1 / math.sqrt(12.5)
  with jax.enable_x64(True):
    x = jnp.array([[3.0, 4.0]], jnp.float64)
    y, (dx, ds) = _vjp(fn, (x, jnp.array([1.0, 3.0])), jnp.array([[1.0, 0.0]]), eps=1e-300)
  np.testing.assert_allclose(y, [[3 * r, 12 * r]], rtol=1e-14)
  np.testing.assert_allclose(dx, [[16 * r / 25, -12 * r / 25]], rtol=1e-13)
  np.testing.assert_allclose(ds, [3 * r, 0.0], atol=1e-15)


@GROUP
def test_group_norm_golden_values_and_gradient(fn):
  # Two groups of one channel each over 3 positions (instance norm): channel 0 holds
  # [1, 2, 3], the layer-norm example, channel 1 holds [10, 20, 30] (the same x̂).
  r = math.sqrt(1.5)
  with jax.enable_x64(True):
    x = jnp.array([[[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]], jnp.float64)  # [N=1, 3, C=2]
    g = jnp.array([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    y, (dx, ds, do) = _vjp(fn, (x, jnp.ones(2), jnp.zeros(2)), g, groups=2, eps=1e-300)
  np.testing.assert_allclose(y[0, :, 0], [-r, 0.0, r], rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(y[0, :, 1], [-r, 0.0, r], rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(dx[0, :, 0], [r / 6, -r / 3, r / 6], rtol=1e-13)
  np.testing.assert_allclose(dx[0, :, 1], [0.0, 0.0, 0.0], atol=1e-15)
  np.testing.assert_allclose(ds, [-r, 0.0], atol=1e-14)
  np.testing.assert_allclose(do, [1.0, 0.0])


def test_group_norm_groups_are_consecutive_channels_and_spatial_axes():
  """groups=2 of 4 channels: channels (0, 1) share statistics over space, (2, 3) others."""
  x = jnp.array([[[[1.0, 2.0, 100.0, 300.0]], [[3.0, 4.0, 200.0, 400.0]]]])  # [1, 2, 1, 4]
  y = jlayers.group_norm(x, None, None, groups=2, eps=1e-12)
  first = np.array([1.0, 2.0, 3.0, 4.0])
  second = np.array([100.0, 300.0, 200.0, 400.0])
  want = np.stack([(first - first.mean()) / first.std(), (second - second.mean()) /
                   second.std()])
  got = np.stack([np.asarray(y[0, :, 0, :2]).reshape(-1), np.asarray(y[0, :, 0, 2:]).reshape(-1)])
  np.testing.assert_allclose(got, want, rtol=1e-5)


def _numpy_norm(x, axes, eps, centered=True):
  mean = x.mean(axis=axes, keepdims=True) if centered else 0.0
  var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


@pytest.mark.parametrize("shape, axis", [((3, 4, 5), -1), ((3, 4, 5), 1), ((2, 3, 4, 5),
                                                                            (1, 3))])
def test_forward_against_an_independent_numpy_computation(shape, axis):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape) * 3 + 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  pshape = tuple(shape[a] for a in sorted(a % len(shape) for a in axes))
  scale, offset = rng.standard_normal(pshape), rng.standard_normal(pshape)
  bshape = [shape[a] if a in [b % len(shape) for b in axes] else 1 for a in range(len(shape))]
  with jax.enable_x64(True):
    ln, rms = jax.jit(lambda x, scale, offset: (
        jlayers.layer_norm(x, scale, offset, axis=axis, eps=1e-3),
        jlayers.rms_norm(x, scale, axis=axis, eps=1e-3)))(x, scale, offset)
  want = _numpy_norm(x, axes, 1e-3) * scale.reshape(bshape) + offset.reshape(bshape)
  np.testing.assert_allclose(ln, want, rtol=1e-12)
  want = _numpy_norm(x, axes, 1e-3, centered=False) * scale.reshape(bshape)
  np.testing.assert_allclose(rms, want, rtol=1e-12)


def test_group_norm_against_a_loop_over_groups():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 3, 6)) * 2 + 1
  scale, offset = rng.standard_normal(6), rng.standard_normal(6)
  want = np.empty_like(x)
  for n in range(2):
    for g in range(3):
      block = x[n, :, :, 2 * g:2 * g + 2]
      want[n, :, :, 2 * g:2 * g + 2] = (block - block.mean()) / np.sqrt(block.var() + 1e-5)
  want = want * scale + offset
  with jax.enable_x64(True):
    got, nchw = jax.jit(lambda x, nchw, scale, offset: (
        jlayers.group_norm(x, scale, offset, groups=3),
        jlayers.group_norm(nchw, scale, offset, groups=3, axis=1)))(
            x, x.transpose(0, 3, 1, 2), scale, offset)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(nchw, want.transpose(0, 3, 1, 2), rtol=1e-12)


def test_gradients_against_finite_differences_float64():
  """An independent check of the closed form: central differences of a random projection."""
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, 3, 4)))
    w = jnp.asarray(rng.standard_normal((2, 3, 4)))
    for f in (lambda x: jlayers.layer_norm(x, axis=(1, 2)), lambda x: jlayers.rms_norm(x),
              lambda x: jlayers.group_norm(x, None, None, groups=2)):
      loss = jax.jit(lambda x, f=f: jnp.sum(w * f(x)))
      grad = np.asarray(jax.jit(jax.grad(loss))(x))
      fd = np.zeros_like(grad)
      h = 1e-6
      for i in np.ndindex(x.shape):
        e = np.zeros(x.shape)
        e[i] = h
        fd[i] = (loss(x + e) - loss(x - e)) / (2 * h)
      np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)


def test_large_offsets_keep_their_accuracy():
  """Two-pass statistics: a mean of 1e4 with unit spread is normalised accurately in float32."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((4, 64))
  y = jlayers.layer_norm(jnp.asarray(x + 1e4, jnp.float32))
  np.testing.assert_allclose(y, _numpy_norm(x, (1,), 1e-5), atol=5e-3)


@pytest.mark.parametrize("fn", [lambda x, s: jlayers.layer_norm(x, s, s),
                                lambda x, s: jlayers.rms_norm(x, s),
                                lambda x, s: jlayers.group_norm(x, s, s, groups=2)],
                         ids=["layer_norm", "rms_norm", "group_norm"])
def test_half_precision_computed_in_float32_rounded_once_with_float32_params(fn):
  x = jnp.linspace(-3.0, 5.0, 24).reshape(3, 8)
  s = jnp.linspace(0.5, 1.5, 8)
  half = x.astype(jnp.bfloat16)
  w = jnp.arange(8.0).reshape(1, 8)
  out, once, (dx, ds) = jax.jit(lambda half, s: (  # one program
      fn(half, s), fn(half.astype(jnp.float32), s).astype(jnp.bfloat16),
      jax.grad(lambda x, s: jnp.sum(fn(x, s).astype(jnp.float32) * w), argnums=(0, 1))(half,
                                                                                     s)))(half, s)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, once)
  assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32


def test_residuals_are_the_inputs_and_one_float_per_statistic():
  x, s = jnp.ones((4, 5, 8)), jnp.ones(8)
  for fn, stats in ((lambda x, s: jlayers.layer_norm(x, s, s), 2),
                    (lambda x, s: jlayers.rms_norm(x, s), 1)):
    avals = residual_avals(fn, x, s)
    big = [a for a in avals if a.size == x.size]
    assert len(big) == 1  # x itself, an argument
    assert sorted(a.shape for a in avals if a.size != x.size and a.shape != (8,)) == [
        (4, 5, 1)] * stats
  avals = residual_avals(lambda x, s: jlayers.group_norm(x, s, s, groups=4),
                         jnp.ones((3, 2, 2, 8)), s)
  assert sorted(a.shape for a in avals if a.size < 3 * 2 * 2 * 8 and a.shape != (8,)) == [
      (3, 1, 1, 4, 1)] * 2


def test_residual_x_is_the_argument_itself():
  from jlayers.testing import saved_residuals  # noqa: PLC0415

  res = saved_residuals(lambda x: jlayers.layer_norm(x), jnp.ones((2, 3)))
  assert [why.startswith("from the argument") for a, why in res if a.shape == (2, 3)] == [True]


X = jnp.ones((2, 3, 4))
BAD = [
    ("layer int x", TypeError, "layer_norm: x must have a floating dtype, got int32",
     lambda x: jlayers.layer_norm(x.astype(jnp.int32))),
    ("layer scale shape", ValueError, r"layer_norm: scale must have shape \(4,\) \(x's "
     r"normalised axes \(2,\)\), got \(3,\)", lambda x: jlayers.layer_norm(x, jnp.ones(3))),
    ("layer offset tuple axes", ValueError, r"layer_norm: offset must have shape \(3, 4\)",
     lambda x: jlayers.layer_norm(x, None, jnp.ones(4), axis=(1, 2))),
    ("layer repeated axis", ValueError, r"layer_norm: axis must not repeat an axis, got \(2, "
     r"-1\) for an input of rank 3", lambda x: jlayers.layer_norm(x, axis=(2, -1))),
    ("layer axis range", ValueError, "layer_norm: axis=3 is out of range for an input of rank 3",
     lambda x: jlayers.layer_norm(x, axis=3)),
    ("layer axis type", TypeError, "layer_norm: axis must be an int or a tuple of ints, got 1.0",
     lambda x: jlayers.reference.layer_norm(x, axis=1.0)),
    ("layer empty axes", ValueError, r"layer_norm: axis must name at least one axis, got \(\)",
     lambda x: jlayers.layer_norm(x, axis=())),
    ("layer eps", ValueError, "layer_norm: eps must be a positive float, got 0.0",
     lambda x: jlayers.layer_norm(x, eps=0.0)),
    ("layer int scale", TypeError, "layer_norm: scale must have a floating dtype, got int32",
     lambda x: jlayers.layer_norm(x, jnp.ones(4, jnp.int32))),
    ("rms bool x", TypeError, "rms_norm: x must have a floating dtype, got bool",
     lambda x: jlayers.rms_norm(x > 0)),
    ("rms scale shape", ValueError, r"rms_norm: scale must have shape \(4,\)",
     lambda x: jlayers.rms_norm(x, jnp.ones((1, 4)))),
    ("rms eps type", TypeError, "rms_norm: eps must be a positive float, got str",
     lambda x: jlayers.rms_norm(x, eps="1e-6")),
    ("rms axis range", ValueError, "rms_norm: axis=-4 is out of range for an input of rank 3",
     lambda x: jlayers.reference.rms_norm(x, axis=-4)),
    ("rms list x", TypeError, "rms_norm: x must be an array, got list",
     lambda x: jlayers.rms_norm([1.0, 2.0])),
    ("group divides", ValueError, r"group_norm: groups=3 must divide the 4 channels of x "
     r"\(axis 2, shape \(2, 3, 4\)\)", lambda x: jlayers.group_norm(x, None, None, groups=3)),
    ("group batch axis", ValueError, "group_norm: axis must be the channel axis, not the batch "
     "axis 0", lambda x: jlayers.group_norm(x, None, None, groups=1, axis=0)),
    ("group rank", ValueError, r"group_norm: x must have rank at least 2 \(N, ..., C\), got "
     r"shape \(4,\)", lambda x: jlayers.group_norm(x[0, 0], None, None, groups=1)),
    ("group zero", ValueError, "group_norm: groups must be positive, got 0",
     lambda x: jlayers.group_norm(x, None, None, groups=0)),
    ("group float", TypeError, "group_norm: groups must be an int, got float",
     lambda x: jlayers.reference.group_norm(x, None, None, groups=2.0)),
    ("group scale", ValueError, r"group_norm: scale must have shape \(4,\) \(C,\) matching x's "
     r"axis 2, got \(2,\)", lambda x: jlayers.group_norm(x, jnp.ones(2), None, groups=2)),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, X)
