"""Golden values, the two published forms, the backward as the opposite rotation, positions
per row, memory and bad input of ``rotary_embedding`` (the generic checks are in
test_ops_generic.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers

BOTH = pytest.mark.parametrize("fn", [jlayers.rotary_embedding,
                                      jlayers.reference.rotary_embedding],
                               ids=["manual", "twin"])


@functools.partial(jax.jit, static_argnums=0, static_argnames=("base", "rotary_dim",
                                                                "interleaved"))
def _vjp(fn, x, positions, cot, frequencies=None, **kwargs):
  """The output and ``cot``'s pullback to ``x`` and to ``frequencies``, jitted."""
  out, pullback = jax.vjp(
      lambda x, f: fn(x, positions, frequencies=f, **kwargs), x, frequencies)
  return out, *pullback(cot)


# --- golden values ------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_golden_values_and_gradient_by_hand(fn, interleaved):
  # H = R = 4, position p = 1, base = 4/π²: f = (base^0, base^(-1/2)) = (1, π/2), so the two
  # pairs turn by θ = (1, π/2): cos θ = (cos 1, 0), sin θ = (sin 1, 1).
  c, s = math.cos(1.0), math.sin(1.0)
  x = [1.0, 2.0, 3.0, 4.0]
  if interleaved:  # pairs (x0, x1) by 1 rad, (x2, x3) by π/2
    want = [1 * c - 2 * s, 2 * c + 1 * s, 3 * 0 - 4 * 1, 4 * 0 + 3 * 1]
    # dx of the pair (a, b) is (g_a cos + g_b sin, -g_a sin + g_b cos); g = (1, 0, 0, 1):
    want_dx = [c, -s, 1.0, 0.0]
  else:  # pairs (x0, x2) by 1 rad, (x1, x3) by π/2
    want = [1 * c - 3 * s, 2 * 0 - 4 * 1, 3 * c + 1 * s, 4 * 0 + 2 * 1]
    want_dx = [c, 1.0, -s, 0.0]
  with jax.enable_x64(True):
    y, dx, _ = _vjp(fn, jnp.array(x).reshape(1, 1, 1, 4), jnp.array([1]),
                    jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 1, 4),
                    base=4 / math.pi**2, interleaved=interleaved)
  np.testing.assert_allclose(y.ravel(), want, rtol=1e-14, atol=1e-15)
  np.testing.assert_allclose(dx.ravel(), want_dx, rtol=1e-14, atol=1e-15)


@BOTH
def test_position_zero_is_the_identity(fn):
  x = jnp.arange(24.0).reshape(1, 2, 2, 6)
  np.testing.assert_array_equal(jax.jit(fn)(x, jnp.zeros(2, jnp.int32)), x)


# --- the published forms, written here ------------------------------------------------------


def _frequencies(base, r):
  return 1.0 / base ** (np.arange(0, r, 2) / r)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _hf_form(x, positions, r, freqs):
  """``x·cos + rotate_half(x)·sin`` with ``cos`` and ``sin`` of ``concat(θ, θ)``."""
  theta = positions[..., None] * freqs  # [B, T, R/2]
  emb = np.concatenate([theta, theta], axis=-1)[:, :, None, :]
  head = x[..., :r]
  out = head * np.cos(emb) + _rotate_half(head) * np.sin(emb)
  return np.concatenate([out, x[..., r:]], axis=-1)


def _complex_form(x, positions, r, freqs):
  """Features (2i, 2i+1) as the complex number x_2i + i x_2i+1, multiplied by e^{iθ_i}."""
  theta = positions[..., None] * freqs
  z = (x[..., 0:r:2] + 1j * x[..., 1:r:2]) * np.exp(1j * theta)[:, :, None, :]
  out = np.stack([z.real, z.imag], axis=-1).reshape(x.shape[:3] + (r,))
  return np.concatenate([out, x[..., r:]], axis=-1)


@BOTH
@pytest.mark.parametrize("interleaved, rotary_dim, per_row, given", [
    (False, None, False, False), (False, 6, True, True), (True, None, True, False),
    (True, 4, False, True)], ids=["half", "half-rot6-bt-freqs", "interleaved-bt",
                                  "interleaved-rot4-freqs"])
def test_agrees_with_the_published_forms(fn, interleaved, rotary_dim, per_row, given):
  rng = np.random.default_rng(0)
  b, t, n, h = 2, 5, 3, 10
  r = rotary_dim or h
  x = rng.standard_normal((b, t, n, h))
  positions = (rng.integers(-5, 2000, (b, t)) if per_row
               else np.broadcast_to(rng.integers(0, 2000, t), (b, t)))
  freqs = rng.uniform(0.0, 1.0, r // 2) if given else _frequencies(500.0, r)
  form = _complex_form if interleaved else _hf_form
  want = form(x, positions.astype(np.float64), r, freqs)
  cot = rng.standard_normal(x.shape)
  # The backward: the transpose of a rotation by θ is the rotation by −θ.
  want_dx = form(cot, -positions.astype(np.float64), r, freqs)
  with jax.enable_x64(True):
    y, dx, df = _vjp(fn, jnp.asarray(x), jnp.asarray(positions if per_row else positions[0]),
                     jnp.asarray(cot), jnp.asarray(freqs) if given else None, base=500.0,
                     rotary_dim=rotary_dim, interleaved=interleaved)
  np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)
  if given:  # a constant: no gradient
    np.testing.assert_array_equal(df, np.zeros_like(freqs))


def test_relative_position_property():
  """q at m and k at n: q'·k' depends on m − n only (the reason for the rotation)."""
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 1, 1, 1, 8))
  with jax.enable_x64(True):
    qk = jnp.asarray(np.concatenate([q, k], axis=1))  # [1, 2, 1, 8]
    rotate = jax.jit(lambda mn: jlayers.rotary_embedding(qk, mn)[0, :, 0])
    dots = [float(jnp.vdot(*rotate(jnp.array(mn)))) for mn in ((3, 1), (10, 8), (102, 100))]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-12)
  assert abs(dots[0] - float(np.vdot(q, k))) > 1e-3  # the rotation did change it


# --- the backward -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"interleaved": True, "rotary_dim": 4}],
                         ids=["half", "interleaved-rot4"])
def test_backward_is_the_rotation_by_minus_theta(kwargs):
  rng = np.random.default_rng(2)
  x, g = (jnp.asarray(rng.standard_normal((2, 4, 3, 6)), jnp.float32) for _ in range(2))
  positions = jnp.asarray(rng.integers(0, 100, (2, 4)), jnp.int32)

  @jax.jit
  def both(x, g, positions):
    _, pullback = jax.vjp(lambda x: jlayers.rotary_embedding(x, positions, **kwargs), x)
    return pullback(g)[0], jlayers.rotary_embedding(g, -positions, **kwargs)

  dx, turned_back = both(x, g, positions)
  np.testing.assert_array_equal(dx, turned_back)


def test_saves_nothing_of_x_size():
  x = jnp.ones((2, 5, 3, 8))
  freqs = jnp.ones(4)
  for positions in (jnp.arange(5), jnp.zeros((2, 5), jnp.int32)):
    avals = residual_avals(lambda x, p: jlayers.rotary_embedding(x, p), x, positions)
    assert [a.shape for a in avals] == [positions.shape]
    avals = residual_avals(lambda x, p, f: jlayers.rotary_embedding(x, p, frequencies=f),
                           x, positions, freqs)
    assert sorted(a.shape for a in avals) == sorted([positions.shape, (4,)])


# --- rotary_dim, positions per row, dtypes ------------------------------------------------------


def test_rotary_dim_passes_the_tail_through():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 3, 2, 10)), jnp.float32)
  g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  positions = jnp.array([4, 9, 200])

  @jax.jit
  def run(x, g):
    out = []
    for interleaved in (False, True):
      y, pullback = jax.vjp(lambda x, i=interleaved: jlayers.rotary_embedding(
          x, positions, rotary_dim=6, interleaved=i), x)
      head = jlayers.rotary_embedding(x[..., :6], positions, interleaved=interleaved)
      out.append((y, pullback(g)[0], head))
    return out

  for y, dx, head in run(x, g):
    np.testing.assert_array_equal(y[..., 6:], x[..., 6:])
    np.testing.assert_array_equal(dx[..., 6:], g[..., 6:])
    np.testing.assert_allclose(y[..., :6], head, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y[..., :6], x[..., :6])


def test_positions_per_row_equal_per_row_calls():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((3, 4, 2, 6)), jnp.float32)
  positions = jnp.array([[0, 1, 2, 3], [0, 1, 0, 1], [7, 8, 9, 10]])
  both, rows = jax.jit(lambda x, p: (
      jlayers.rotary_embedding(x, p, interleaved=True),
      [jlayers.rotary_embedding(x[i:i + 1], p[i], interleaved=True) for i in range(3)]))(
          x, positions)
  for row in range(3):
    np.testing.assert_array_equal(both[row:row + 1], rows[row])


def test_any_integer_dtype_and_wide_frequencies():
  x = jnp.asarray(np.random.default_rng(5).standard_normal((1, 4, 1, 4)), jnp.float32)
  dtypes = (np.int32, np.int8, np.uint8, np.int16, np.uint32)

  @jax.jit
  def run(x, *positions):
    # The default frequencies, given: the same angles (rounded from float64 to float32 alike).
    given = jlayers.rotary_embedding(x, positions[0], frequencies=np.array([1.0, 0.01]))
    return [jlayers.rotary_embedding(x, p) for p in positions] + [given]

  want, *others = run(x, *(np.arange(4, dtype=d) for d in dtypes))
  for got in others:
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("interleaved", [False, True])
def test_half_precision_rounds_once(interleaved):
  x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3, 2, 8)), jnp.bfloat16)
  positions = jnp.array([1, 50, 3000])

  @jax.jit
  def run(x):
    y, pullback = jax.vjp(lambda x: jlayers.rotary_embedding(x, positions,
                                                             interleaved=interleaved), x)
    wide = jlayers.rotary_embedding(x.astype(jnp.float32), positions, interleaved=interleaved)
    return y, pullback(x)[0], wide

  y, dx, wide = run(x)
  assert y.dtype == dx.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, wide.astype(jnp.bfloat16))


# --- bad input ----------------------------------------------------------------------------------

OP = jlayers.rotary_embedding
X = jnp.ones((2, 3, 2, 8))
P = jnp.arange(3)

BAD = [
    ("x rank 3", ValueError, (r"rotary_embedding: x must have rank 4 \(B, T, N, H\), got shape "
     r"\(3, 2, 8\)"), lambda x, p: OP(x[0], p)),
    ("x int", TypeError, "rotary_embedding: x must have a floating dtype, got int32",
     lambda x, p: OP(x.astype(jnp.int32), p)),
    ("positions float", TypeError, ("rotary_embedding: positions must have an integer dtype, "
     "got float32"), lambda x, p: OP(x, p.astype(jnp.float32))),
    ("positions bool", TypeError, ("rotary_embedding: positions must have an integer dtype, got "
     "bool"), lambda x, p: OP(x, p > 0)),
    ("positions length", ValueError, (r"rotary_embedding: positions must have shape \(T,\) = "
     r"\(3,\) or \(B, T\) = \(2, 3\) for x of shape \(2, 3, 2, 8\), got \(4,\)"),
     lambda x, p: OP(x, jnp.arange(4))),
    ("positions (T, B)", ValueError, r"positions must have shape .* got \(3, 2\)",
     lambda x, p: OP(x, jnp.zeros((3, 2), jnp.int32))),
    ("rotary_dim odd", ValueError, ("rotary_embedding: rotary_dim must be even and at most H=8 "
     r"\(x's last dimension\), got 5"), lambda x, p: OP(x, p, rotary_dim=5)),
    ("rotary_dim > H", ValueError, "rotary_dim must be even and at most H=8 .* got 10",
     lambda x, p: OP(x, p, rotary_dim=10)),
    ("rotary_dim 0", ValueError, "rotary_embedding: rotary_dim must be positive, got 0",
     lambda x, p: OP(x, p, rotary_dim=0)),
    ("rotary_dim float", TypeError, "rotary_embedding: rotary_dim must be an int, got float",
     lambda x, p: OP(x, p, rotary_dim=4.0)),
    ("odd H", ValueError, "rotary_embedding: x's head size H=5 is odd: pass an even rotary_dim",
     lambda x, p: OP(x[..., :5], p)),
    ("base 0", ValueError, "rotary_embedding: base must be a positive float, got 0.0",
     lambda x, p: OP(x, p, base=0.0)),
    ("base inf", ValueError, "rotary_embedding: base must be a finite positive float, got inf",
     lambda x, p: OP(x, p, base=float("inf"))),
    ("base str", TypeError, "rotary_embedding: base must be a positive float, got str",
     lambda x, p: OP(x, p, base="1e4")),
    ("frequencies shape", ValueError, (r"rotary_embedding: frequencies must have shape \(4,\) "
     r"\(rotary_dim / 2,\), got \(8,\)"), lambda x, p: OP(x, p, frequencies=jnp.ones(8))),
    ("frequencies int", TypeError, ("rotary_embedding: frequencies must have a floating dtype, "
     "got int32"), lambda x, p: OP(x, p, frequencies=jnp.ones(4, jnp.int32))),
    ("interleaved str", TypeError, "rotary_embedding: interleaved must be a bool, got str",
     lambda x, p: OP(x, p, interleaved="yes")),
    ("twin interleaved int", TypeError, "rotary_embedding: interleaved must be a bool, got int",
     lambda x, p: jlayers.reference.rotary_embedding(x, p, interleaved=1)),
]


@pytest.mark.parametrize("name, exc, match, fn", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, exc, match, fn):
  raises_eager_and_jit(exc, match, fn, X, P)


def test_a_python_list_of_positions_is_refused():
  with pytest.raises(TypeError, match="rotary_embedding: positions must be an array, got list"):
    OP(X, [0, 1, 2])
