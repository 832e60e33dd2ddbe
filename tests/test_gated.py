"""Golden values, agreement with ``jax.nn``, memory and bad input of ``swiglu`` and ``geglu``
(the generic checks are in test_ops_generic.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers
from jlayers import layers as L
from jlayers import testing

SWIGLU = pytest.mark.parametrize("fn", [jlayers.swiglu, jlayers.reference.swiglu],
                                 ids=["manual", "twin"])
GEGLU = pytest.mark.parametrize("fn", [jlayers.geglu, jlayers.reference.geglu],
                                ids=["manual", "twin"])

GATE = [-3.0, -0.5, 0.0, 1.0, 2.5]
UP = [0.5, -2.0, 4.0, 1.5, -1.0]
COT = [1.0, 2.0, -1.0, 0.5, 3.0]


@functools.partial(jax.jit, static_argnums=0, static_argnames="approximate")
def _vjp(fn, gate, up, cot, **kwargs):
  """The output and ``cot``'s pullback to ``gate`` and ``up``, jitted (one compile)."""
  out, pullback = jax.vjp(lambda a, u: fn(a, u, **kwargs), gate, up)
  return out, *pullback(cot)


def _run64(fn, **kwargs):
  with jax.enable_x64(True):
    return _vjp(fn, *(jnp.array(v, jnp.float64) for v in (GATE, UP, COT)), **kwargs)


# --- golden values ------------------------------------------------------------------------------


@SWIGLU
def test_swiglu_golden_values_and_gradients(fn):
  # y = a σ(a) u; ∂y/∂a = u σ(a) (1 + a (1 − σ(a))); ∂y/∂u = a σ(a). At a = 0: y = 0,
  # ∂y/∂a = u / 2 and ∂y/∂u = 0.
  sig = [1 / (1 + math.exp(-a)) for a in GATE]
  want = [a * s * u for a, s, u in zip(GATE, sig, UP)]
  want_da = [g * u * s * (1 + a * (1 - s)) for a, s, u, g in zip(GATE, sig, UP, COT)]
  want_du = [g * a * s for a, s, g in zip(GATE, sig, COT)]
  y, da, du = _run64(fn)
  np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(da, want_da, rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(du, want_du, rtol=1e-14, atol=1e-16)
  assert float(da[2]) == -1.0 * 4.0 / 2 and float(du[2]) == 0.0


@GEGLU
def test_geglu_exact_golden_values_and_gradients(fn):
  # gelu(a) = a Φ(a), gelu'(a) = Φ(a) + a φ(a); Φ(0) = 1/2, so at a = 0 ∂y/∂a = u / 2.
  phi = [0.5 * (1 + math.erf(a / math.sqrt(2))) for a in GATE]
  pdf = [math.exp(-a * a / 2) / math.sqrt(2 * math.pi) for a in GATE]
  want = [a * p * u for a, p, u in zip(GATE, phi, UP)]
  want_da = [g * u * (p + a * d) for a, p, d, u, g in zip(GATE, phi, pdf, UP, COT)]
  want_du = [g * a * p for a, p, g in zip(GATE, phi, COT)]
  y, da, du = _run64(fn, approximate=False)
  np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(da, want_da, rtol=1e-14, atol=1e-16)
  np.testing.assert_allclose(du, want_du, rtol=1e-14, atol=1e-16)
  assert float(da[2]) == -1.0 * 4.0 / 2


@GEGLU
def test_geglu_tanh_golden_values_and_gradients(fn):
  # gelu(a) = a (1 + t) / 2 with t = tanh(c (a + k a³)), c = √(2/π), k = 0.044715;
  # gelu'(a) = (1 + t) / 2 + a (1 − t²) c (1 + 3 k a²) / 2.
  c, k = math.sqrt(2 / math.pi), 0.044715
  t = [math.tanh(c * (a + k * a**3)) for a in GATE]
  slope = [0.5 * (1 + tv) + 0.5 * a * (1 - tv * tv) * c * (1 + 3 * k * a * a)
           for a, tv in zip(GATE, t)]
  want = [0.5 * a * (1 + tv) * u for a, tv, u in zip(GATE, t, UP)]
  y, da, du = _run64(fn)
  # At a = −3, 1 + t cancels (t ≈ −0.998): absolute tolerances of a few units of 1e-16.
  np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(da, [g * u * s for g, u, s in zip(COT, UP, slope)], rtol=1e-14,
                             atol=1e-15)
  np.testing.assert_allclose(du, [g * 0.5 * a * (1 + tv) for g, a, tv in zip(COT, GATE, t)],
                             rtol=1e-14, atol=1e-15)


# --- a second implementation from jax.nn ---------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, act", [
    ("swiglu", {}, jax.nn.silu),
    ("geglu", {"approximate": True}, functools.partial(jax.nn.gelu, approximate=True)),
    ("geglu", {"approximate": False}, functools.partial(jax.nn.gelu, approximate=False))],
    ids=["swiglu", "geglu-tanh", "geglu-erf"])
def test_agrees_with_jax_nn(name, kwargs, act):
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    gate, up, cot = (jnp.asarray(rng.standard_normal((3, 4, 5)) * 3) for _ in range(3))
    theirs = jax.jit(lambda a, u: jax.vjp(lambda a, u: act(a) * u, a, u)[1](cot))(gate, up)
    want = act(gate) * up
    for fn in (getattr(jlayers, name), getattr(jlayers.reference, name)):
      y, da, du = _vjp(fn, gate, up, cot, **kwargs)
      np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-14)
      np.testing.assert_allclose(da, theirs[0], rtol=1e-12, atol=1e-13)
      np.testing.assert_allclose(du, theirs[1], rtol=1e-13, atol=1e-14)


def test_a_unit_up_gives_the_activation_bit_for_bit():
  """The same constants and the same float32 arithmetic as jlayers.silu and jlayers.gelu."""
  gate = jnp.linspace(-5.0, 5.0, 41, dtype=jnp.float32)
  one = jnp.ones_like(gate)
  np.testing.assert_array_equal(jlayers.swiglu(gate, one), jlayers.silu(gate))
  for approximate in (True, False):
    np.testing.assert_array_equal(jlayers.geglu(gate, one, approximate=approximate),
                                  jlayers.gelu(gate, approximate=approximate))


# --- dtypes, rank 0, memory ---------------------------------------------------------------------


@pytest.mark.parametrize("fn", [jlayers.swiglu, functools.partial(jlayers.geglu,
                                                                  approximate=False)],
                         ids=["swiglu", "geglu-erf"])
def test_half_precision_is_computed_in_float32_and_rounded_once(fn):
  rng = np.random.default_rng(1)
  gate, up = (jnp.asarray(rng.standard_normal(16) * 3, jnp.bfloat16) for _ in range(2))

  @jax.jit
  def run(gate, up):
    y, pullback = jax.vjp(fn, gate, up)
    return y, *pullback(jnp.ones_like(y)), fn(gate.astype(jnp.float32), up.astype(jnp.float32))

  y, da, du, wide = run(gate, up)
  np.testing.assert_array_equal(y, wide.astype(jnp.bfloat16))
  assert y.dtype == da.dtype == du.dtype == jnp.bfloat16


def test_rank_0():
  y, da, du = _vjp(jlayers.swiglu, jnp.float32(2.0), jnp.float32(3.0), jnp.float32(1.0))
  s = 1 / (1 + math.exp(-2.0))
  np.testing.assert_allclose([y, da, du], [2 * s * 3, 3 * s * (1 + 2 * (1 - s)), 2 * s],
                             rtol=1e-6)
  assert y.shape == da.shape == du.shape == ()


def test_only_gate_and_up_are_saved():
  gate, up = jnp.ones((2, 3)), jnp.ones((2, 3))
  for fn in (jlayers.swiglu, jlayers.geglu, functools.partial(jlayers.geglu, approximate=False)):
    avals = residual_avals(fn, gate, up)
    assert [a.shape for a in avals] == [(2, 3), (2, 3)]


# --- bad input ----------------------------------------------------------------------------------

BAD = []
for _op in ("swiglu", "geglu"):
  _fn = getattr(jlayers, _op)
  BAD += [
      (f"{_op} broadcast", ValueError, (rf"{_op}: gate and up must have the same shape \(no "
       r"broadcasting\), got gate \(2, 3\) and up \(1, 3\)"), lambda a, u, f=_fn: f(a, u[:1])),
      (f"{_op} shape", ValueError, (rf"{_op}: gate and up must have the same shape .* got gate "
       r"\(2, 3\) and up \(3, 2\)"), lambda a, u, f=_fn: f(a, u.T)),
      (f"{_op} rank 0 up", ValueError, rf"{_op}: .*got gate \(2, 3\) and up \(\)",
       lambda a, u, f=_fn: f(a, u[0, 0])),
      (f"{_op} dtype", TypeError, (rf"{_op}: gate and up must have the same dtype, got gate "
       "float32 and up bfloat16"), lambda a, u, f=_fn: f(a, u.astype(jnp.bfloat16))),
      (f"{_op} int gate", TypeError, f"{_op}: gate must have a floating dtype, got int32",
       lambda a, u, f=_fn: f(a.astype(jnp.int32), u)),
      (f"{_op} bool up", TypeError, f"{_op}: up must have a floating dtype, got bool",
       lambda a, u, f=_fn: f(a, u > 0)),
      (f"{_op} complex gate", TypeError, f"{_op}: gate must have a floating dtype, got complex64",
       lambda a, u, f=_fn: f(a.astype(jnp.complex64), u.astype(jnp.complex64))),
  ]
BAD += [
    ("geglu approximate str", TypeError, "geglu: approximate must be a bool, got str",
     lambda a, u: jlayers.geglu(a, u, approximate="tanh")),
    ("geglu approximate None", TypeError, "geglu: approximate must be a bool, got NoneType",
     lambda a, u: jlayers.reference.geglu(a, u, approximate=None)),
    ("swiglu twin dtype", TypeError, "swiglu: gate and up must have the same dtype",
     lambda a, u: jlayers.reference.swiglu(a.astype(jnp.float16), u)),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, jnp.ones((2, 3)), jnp.ones((2, 3)))


def test_a_python_list_is_refused():
  with pytest.raises(TypeError, match="swiglu: up must be an array, got list"):
    jlayers.swiglu(jnp.ones(2), [1.0, 2.0])


# --- the layers: GatedMLP, RMSNorm with a scale offset -------------------------------------------

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False),
               "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def _plain_gated_mlp(params, x, act):
  """down(act(gate(x)) · up(x)) in plain JAX, a bias where params hold one."""
  def dense(p, h):
    y = h @ p["kernel"]
    return y + p["bias"].reshape((1,) * (h.ndim - 1) + (-1,)) if "bias" in p else y
  return dense(params["down"], act(dense(params["gate"], x)) * dense(params["up"], x))


@pytest.mark.parametrize("activation, use_bias, out", [("silu", False, None),
                                                       ("gelu", True, 3), ("gelu_tanh", False, 6)])
def test_gated_mlp_against_plain_jax_and_autodiff(activation, use_bias, out):
  layer = jlayers.GatedMLP(8, activation=activation, use_bias=use_bias, out_features=out,
                           param_dtype=jnp.float64,
                           bias_init=jax.nn.initializers.normal(1.0))
  with jax.enable_x64(True):
    params, state = jax.jit(lambda k: layer.init(k, (2, 3, 5)))(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, 5)))
    assert params["gate"]["kernel"].shape == params["up"]["kernel"].shape == (5, 8)
    assert params["down"]["kernel"].shape == (8, out or 5)
    assert ("bias" in params["down"]) == use_bias and state == {}

    def loss(params, x, *, impl):
      y = layer.apply(params, state, x, impl=impl)[0]
      return jnp.sum(jnp.sin(y)), y

    @jax.jit
    def run(params, x):
      return _plain_gated_mlp(params, x, ACTIVATIONS[activation]), [
          jax.value_and_grad(functools.partial(loss, impl=impl), (0, 1), has_aux=True)(
              params, x) for impl in ("manual", "autodiff")]

    want, (((_, y_m), g_m), ((_, y_a), g_a)) = run(params, x)
  assert y_m.shape == (2, 3, out or 5) and y_m.dtype == jnp.float64
  np.testing.assert_allclose(y_m, want, rtol=1e-13, atol=1e-13)
  np.testing.assert_allclose(y_a, want, rtol=1e-13, atol=1e-13)
  for a, b in zip(jax.tree_util.tree_leaves(g_m), jax.tree_util.tree_leaves(g_a)):
    assert testing.error(a, b).relative < 1e-12


def test_gated_mlp_configuration_errors():
  with pytest.raises(ValueError, match=r"GatedMLP: activation must be one of \('silu', 'gelu', "
                                       r"'gelu_tanh'\), got 'relu'"):
    jlayers.GatedMLP(4, activation="relu")
  with pytest.raises(ValueError, match="GatedMLP: hidden_features must be positive, got 0"):
    jlayers.GatedMLP(0)
  with pytest.raises(TypeError, match="GatedMLP: out_features must be an int, got str"):
    jlayers.GatedMLP(4, out_features="4")
  layer = jlayers.GatedMLP(4)
  params = {name: {"kernel": np.ones(shape, np.float32)}
            for name, shape in (("gate", (3, 4)), ("up", (3, 4)), ("down", (4, 3)))}
  with pytest.raises(KeyError, match="GatedMLP: params has no entry 'up'"):
    layer.apply({"gate": params["gate"], "down": params["down"]}, {}, np.ones((2, 3)))
  with pytest.raises(KeyError, match=r"GatedMLP: params\['down'\] has no entry 'kernel'"):
    layer.apply({**params, "down": {"w": params["down"]["kernel"]}}, {}, np.ones((2, 3)))
  with pytest.raises(ValueError, match="linear: x's last dimension must equal w's first"):
    layer.apply(params, {}, np.ones((2, 4), np.float32))


def test_rms_norm_default_is_unchanged_and_the_offset_is_gemmas():
  x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 6)), jnp.float32)
  plain, gemma = L.RMSNorm(), L.RMSNorm(scale_offset=1.0, eps=1e-6)
  assert plain == L.RMSNorm(scale_offset=0.0)
  params, _ = plain.init(jax.random.key(0), x.shape)
  w0, _ = gemma.init(jax.random.key(0), x.shape)
  np.testing.assert_array_equal(params["scale"], np.ones(6, np.float32))
  np.testing.assert_array_equal(w0["scale"], np.zeros(6, np.float32))  # 1 − 1
  y_plain, y_op, y_gemma = jax.jit(lambda p, w0, x: (
      plain.apply(p, {}, x)[0], jlayers.rms_norm(x, p["scale"], eps=1e-6),
      gemma.apply(w0, {}, x)[0]))(params, w0, x)
  np.testing.assert_array_equal(y_plain, y_op)
  np.testing.assert_allclose(y_gemma, y_plain, rtol=1e-6)  # 1 + 0: the same scale at init
  with jax.enable_x64(True):
    x64 = x.astype(jnp.float64)
    w = {"scale": jnp.asarray(np.random.default_rng(9).standard_normal(6))}
    # Gemma: x / sqrt(mean(x²) + eps) · (1 + w).
    want = x64 / jnp.sqrt(jnp.mean(x64 * x64, axis=-1, keepdims=True) + 1e-6) * (
        1.0 + w["scale"][None, :])

    @jax.jit
    def run(w, x):
      def loss(w, x, impl):
        y = gemma.apply(w, {}, x, impl=impl)[0]
        return jnp.sum(jnp.cos(y)), y
      return [jax.value_and_grad(functools.partial(loss, impl=impl), (0, 1), has_aux=True)(
          w, x) for impl in ("manual", "autodiff")]

    ((_, y_m), g_m), ((_, y_a), g_a) = run(w, x64)
  np.testing.assert_allclose(y_m, want, rtol=1e-13)
  np.testing.assert_allclose(y_a, want, rtol=1e-13)
  for a, b in zip(jax.tree_util.tree_leaves(g_m), jax.tree_util.tree_leaves(g_a)):
    assert testing.error(a, b).relative < 1e-12
  with pytest.raises(ValueError, match="RMSNorm: scale_offset must be in"):
    L.RMSNorm(scale_offset=float("nan"))
  with pytest.raises(TypeError, match="RMSNorm: scale_offset must be a float, got str"):
    L.RMSNorm(scale_offset="1")
  with pytest.raises(ValueError, match="RMSNorm: scale_offset=1.0 offsets the scale param"):
    L.RMSNorm(scale_offset=1.0, use_scale=False)
