"""Golden values, the forms, layers and bad input of ``gelu`` and ``silu`` (the generic checks
are in test_ops_generic.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit

import jlayers
from jlayers import layers as L

GELU = pytest.mark.parametrize("fn", [jlayers.gelu, jlayers.reference.gelu],
                               ids=["manual", "twin"])
SILU = pytest.mark.parametrize("fn", [jlayers.silu, jlayers.reference.silu],
                               ids=["manual", "twin"])


def _value_and_slope(fn, x, **kwargs):
  """``fn(x)`` and its elementwise derivative (the gradient of the sum), in one jitted
  program."""
  return jax.jit(lambda x: (fn(x, **kwargs), jax.grad(lambda x: jnp.sum(fn(x, **kwargs)))(x)))(x)


def _phi(x):
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


@GELU
def test_gelu_exact_golden_values_and_slopes(fn):
  # gelu(x) = x Φ(x); gelu'(x) = Φ(x) + x φ(x): at 0 the slope is 1/2.
  xs = [-2.0, -0.5, 0.0, 1.0, 3.0]
  with jax.enable_x64(True):
    y, g = _value_and_slope(fn, np.array(xs), approximate=False)
  want_y = [v * _phi(v) for v in xs]
  want_g = [_phi(v) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi) for v in xs]
  np.testing.assert_allclose(y, want_y, rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(g, want_g, rtol=1e-14)
  assert float(g[2]) == 0.5


@GELU
def test_gelu_tanh_golden_values_and_slopes(fn):
  c, a = math.sqrt(2 / math.pi), 0.044715
  xs = [-2.0, -0.5, 0.0, 1.0, 3.0]
  with jax.enable_x64(True):
    y, g = _value_and_slope(fn, np.array(xs))
  t = [math.tanh(c * (v + a * v**3)) for v in xs]
  want_y = [0.5 * v * (1 + tv) for v, tv in zip(xs, t)]
  want_g = [0.5 * (1 + tv) + 0.5 * v * (1 - tv * tv) * c * (1 + 3 * a * v * v)
            for v, tv in zip(xs, t)]
  np.testing.assert_allclose(y, want_y, rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(g, want_g, rtol=1e-14)


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_agrees_with_jax_nn(approximate):
  with jax.enable_x64(True):
    x = np.linspace(-6.0, 6.0, 25)
    y, g = _value_and_slope(jlayers.gelu, x, approximate=approximate)
    want_y, want_g = _value_and_slope(jax.nn.gelu, x, approximate=approximate)
    np.testing.assert_allclose(y, want_y, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(
        g, want_g,
        rtol=1e-13, atol=1e-14)  # where 1 + tanh u cancels (x = -6), relative to max |slope|


@SILU
def test_silu_golden_values_and_slopes(fn):
  # silu(x) = x σ(x); silu'(x) = σ(x) (1 + x (1 − σ(x))): silu'(0) = 1/2.
  xs = [-3.0, -1.0, 0.0, 1.0, 4.0]
  sig = [1 / (1 + math.exp(-v)) for v in xs]
  with jax.enable_x64(True):
    y, g = _value_and_slope(fn, np.array(xs))
  np.testing.assert_allclose(y, [v * s for v, s in zip(xs, sig)], rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(g, [s * (1 + v * (1 - s)) for v, s in zip(xs, sig)], rtol=1e-14)
  assert float(g[2]) == 0.5


@pytest.mark.parametrize("fn", [jlayers.gelu, jlayers.silu], ids=["gelu", "silu"])
def test_half_precision_is_computed_in_float32_and_rounded_once(fn):
  x = jnp.linspace(-4.0, 4.0, 33, dtype=jnp.bfloat16)
  got, want, g = jax.jit(lambda x: (  # one program
      fn(x), fn(x.astype(jnp.float32)).astype(jnp.bfloat16),
      jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32)))(x)))(x)
  np.testing.assert_array_equal(got, want)
  assert g.dtype == jnp.bfloat16


def test_only_x_is_saved():
  from jlayers.testing import saved_residuals  # noqa: PLC0415

  x = jnp.ones((2, 3))
  for f in (jlayers.silu, jlayers.gelu, lambda x: jlayers.gelu(x, approximate=False)):
    res = saved_residuals(f, x)
    assert [(r.shape, why.startswith("from the argument")) for r, why in res] == [((2, 3), True)]


def test_layers():
  x = jnp.linspace(-2.0, 2.0, 8).reshape(2, 4)
  for layer, want in ((L.GELU(), jax.nn.gelu(x)), (L.GELU(approximate=False),
                                                   jax.nn.gelu(x, approximate=False)),
                      (L.SiLU(), jax.nn.silu(x))):
    for impl in ("manual", "autodiff"):
      y, state = layer.apply({}, {}, x, impl=impl)
      np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)
      assert state == {}
  with pytest.raises(TypeError, match="GELU: approximate must be a bool, got str"):
    L.GELU(approximate="tanh")


BAD = [
    ("gelu int x", TypeError, "gelu: x must have a floating dtype, got int32",
     lambda x: jlayers.gelu(x.astype(jnp.int32))),
    ("gelu bool x", TypeError, "gelu: x must have a floating dtype, got bool",
     lambda x: jlayers.gelu(x > 0)),
    ("gelu complex x", TypeError, "gelu: x must have a floating dtype, got complex64",
     lambda x: jlayers.gelu(x.astype(jnp.complex64))),
    ("gelu approximate str", TypeError, "gelu: approximate must be a bool, got str",
     lambda x: jlayers.gelu(x, approximate="tanh")),
    ("gelu approximate None", TypeError, "gelu: approximate must be a bool, got NoneType",
     lambda x: jlayers.gelu(x, approximate=None)),
    ("gelu approximate int", TypeError, "gelu: approximate must be a bool, got int",
     lambda x: jlayers.reference.gelu(x, approximate=1)),
    ("silu int x", TypeError, "silu: x must have a floating dtype, got int32",
     lambda x: jlayers.silu(x.astype(jnp.int32))),
    ("silu bool x", TypeError, "silu: x must have a floating dtype, got bool",
     lambda x: jlayers.silu(x > 0)),
    ("silu complex x", TypeError, "silu: x must have a floating dtype, got complex64",
     lambda x: jlayers.silu(x.astype(jnp.complex64))),
    ("silu uint8 x", TypeError, "silu: x must have a floating dtype, got uint8",
     lambda x: jlayers.reference.silu(x.astype(jnp.uint8))),
    ("silu int16 x", TypeError, "silu: x must have a floating dtype, got int16",
     lambda x: jlayers.silu(x.astype(jnp.int16))),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, jnp.ones((2, 3)))


def test_a_python_list_is_refused():
  with pytest.raises(TypeError, match="silu: x must be an array, got list"):
    jlayers.silu([1.0, 2.0])
