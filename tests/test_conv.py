"""Op-specific tests of conv2d: hand-computed values, the textbook stride-1 rule, padding
semantics, argument errors (eager and jitted) and residuals. The 144-case grid against
autodiff runs through tests/test_ops_generic.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jlayers
from jlayers import _conv_cpu, conv, testing
from jlayers.conv import conv2d, conv2d_reference

X3 = np.arange(1.0, 10.0).reshape(3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
W2 = np.array([[1.0, 2.0], [3.0, 4.0]])


def _vjp(fn, x, w, b, g, **kw):
  y, pullback = jax.vjp(lambda x, w, b: fn(x, w, b, **kw), x, w, b)
  return (y, *pullback(g))


def _nhwc(a):
  return jnp.asarray(a, jnp.float32)[None, :, :, None]


@pytest.mark.parametrize("fn", [conv2d, conv2d_reference])
def test_golden_stride1_valid(fn):
  # y[i,j] = x[i,j]·1 + x[i,j+1]·2 + x[i+1,j]·3 + x[i+1,j+1]·4 + b
  #   y00 = 1+4+12+20 = 37   y01 = 2+6+15+24 = 47   y10 = 4+10+21+32 = 67   y11 = 5+12+24+36 = 77
  # cotangent G = [[1, -1], [0, 2]]:
  #   dX[h,v] = Σ_ij G[i,j] w[h-i, v-j]
  #     dX00 = 1·1 = 1              dX01 = 1·2 - 1·1 = 1          dX02 = -1·2 = -2
  #     dX10 = 1·3 + 0·1 = 3        dX11 = 1·4 - 1·3 + 0·2 + 2·1 = 3
  #     dX12 = -1·4 + 2·2 = 0       dX20 = 0·3 = 0   dX21 = 0·4 + 2·3 = 6   dX22 = 2·4 = 8
  #   dW[p,q] = Σ_ij G[i,j] x[i+p, j+q]
  #     dW00 = 1 - 2 + 0 + 10 = 9   dW01 = 2 - 3 + 0 + 12 = 11
  #     dW10 = 4 - 5 + 0 + 16 = 15  dW11 = 5 - 6 + 0 + 18 = 17
  #   db = 1 - 1 + 0 + 2 = 2
  g = _nhwc([[1.0, -1.0], [0.0, 2.0]])
  y, dx, dw, db = _vjp(fn, _nhwc(X3), jnp.asarray(W2, jnp.float32)[:, :, None, None],
                       jnp.array([0.5], jnp.float32), g, padding="VALID")
  np.testing.assert_allclose(y[0, :, :, 0], [[37.5, 47.5], [67.5, 77.5]])
  np.testing.assert_allclose(dx[0, :, :, 0], [[1, 1, -2], [3, 3, 0], [0, 6, 8]])
  np.testing.assert_allclose(dw[:, :, 0, 0], [[9, 11], [15, 17]])
  np.testing.assert_allclose(db, [2.0])


@pytest.mark.parametrize("fn", [conv2d, conv2d_reference])
def test_golden_stride2_remainder_nchw(fn):
  # Stride 2 on 3×3 with a 2×2 kernel, VALID: a single window at the top-left,
  #   y = 1·1 + 2·2 + 4·3 + 5·4 = 37.
  # With G = 3 the last row and column of x are never read, so their gradient is 0:
  #   dX = 3·[[1, 2, 0], [3, 4, 0], [0, 0, 0]]     dW = 3·[[1, 2], [4, 5]] = [[3, 6], [12, 15]]
  x = jnp.asarray(X3, jnp.float32)[None, None]
  w = jnp.asarray(W2, jnp.float32)[None, None]
  y, dx, dw, db = _vjp(fn, x, w, None, jnp.full((1, 1, 1, 1), 3.0), stride=2, padding="VALID",
                       layout="NCHW")
  assert db is None
  np.testing.assert_allclose(y.ravel(), [37.0])
  np.testing.assert_allclose(dx[0, 0], [[3, 6, 0], [9, 12, 0], [0, 0, 0]])
  np.testing.assert_allclose(dw[0, 0], [[3, 6], [12, 15]])


def test_textbook_stride1_rule():
  """dX = full correlation of dY with the flipped kernel summed over output channels, and
  dW = Σ_n valid correlation of X with dY (the textbook stride-1 formulas, in NumPy)."""
  rng = np.random.default_rng(0)
  n, h, wd, c, f, k = 2, 5, 4, 3, 2, 3
  with jax.enable_x64(True):
    x, w = rng.standard_normal((n, h, wd, c)), rng.standard_normal((k, k, c, f))
    g = rng.standard_normal((n, h - k + 1, wd - k + 1, f))
    _, dx, dw, _ = _vjp(conv2d, jnp.asarray(x), jnp.asarray(w), None, jnp.asarray(g),
                        padding="VALID")
  g_full = np.pad(g, ((0, 0), (k - 1, k - 1), (k - 1, k - 1), (0, 0)))
  w_flip = w[::-1, ::-1]
  want_dx = np.zeros_like(x)
  for i in range(h):
    for j in range(wd):
      want_dx[:, i, j, :] = np.einsum("npqf,pqcf->nc", g_full[:, i:i + k, j:j + k], w_flip)
  want_dw = np.zeros_like(w)
  for p in range(k):
    for q in range(k):
      want_dw[p, q] = np.einsum("nijc,nijf->cf", x[:, p:p + h - k + 1, q:q + wd - k + 1], g)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size, stride, dilation, padding", [
    ((5, 6), (2, 3), (1, 2), "SAME"), ((6, 5), (2, 2), (2, 1), "SAME"), ((7, 4), (3, 1), (1, 1),
    "VALID"), ((5, 5), (1, 2), (2, 2), 1), ((5, 5), (2, 1), (1, 1), ((2, 0), (1, 3)))])
def test_padding_matches_lax(size, stride, dilation, padding):
  """The padding rules (computed by conv2d itself) agree with lax.conv_general_dilated's."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, *size, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 2, 2, 3)), jnp.float32)
  lax_pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
  want = lax.conv_general_dilated(x, w, stride, lax_pad, rhs_dilation=dilation,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_only_x_and_w_are_saved():
  x, w, b = jnp.ones((2, 5, 5, 4)), jnp.ones((3, 3, 2, 6)), jnp.ones((6,))
  res = testing.saved_residuals(lambda x, w, b: conv2d(x, w, b, stride=2, dilation=2, groups=2), x, w, b)
  assert [tuple(a.shape) for a, _ in res] == [x.shape, w.shape]
  assert all(a.dtype == jnp.float32 for a, _ in res)


@pytest.mark.parametrize("path", ["native", "conv-fallback", "patches-chunk1", "patches-chunk2",
                                  "patches-whole-batch"])
@pytest.mark.parametrize("kw", [
    dict(stride=2, padding="VALID"),  # stride remainder: the dW high pad is -1
    dict(stride=(2, 1), padding=((1, 0), (0, 2)), dilation=2, groups=2),
    dict(stride=2, padding="SAME", dilation=(1, 2), groups=4, layout="NCHW"),
    dict(padding=3, groups=2, layout="NCHW"),  # padding wider than the kernel reach
], ids=["s2-valid", "s21-asym-d2-g2", "s2-same-d12-dw-nchw", "pad3-g2-nchw"])
def test_each_dw_evaluation_equals_autodiff(monkeypatch, path, kw):
  """Every way of evaluating dW agrees with autodiff of the reference: XLA's native convolution
  (what GPUs and TPUs run), the CPU fallback to it, and the patch loop in chunks of one image,
  of two (3 images padded to 2 chunks) and of the whole batch."""
  nchw = kw.get("layout") == "NCHW"
  groups = kw.get("groups", 1)
  chunk = {"native": 3, "conv-fallback": 0, "patches-chunk1": 1, "patches-chunk2": 2,
           "patches-whole-batch": 3}[path]
  module = _conv_cpu if path.startswith("patches") else conv
  evaluation = _conv_cpu.weight_grad if path.startswith("patches") else conv._dw_conv
  used = []
  monkeypatch.setattr(_conv_cpu, "loop_chunk", lambda *_: chunk)
  monkeypatch.setattr(module, evaluation.__name__,
                      lambda *a, **k: used.append(k.get("chunk")) or evaluation(*a, **k))
  rng = np.random.default_rng(5)
  with jax.enable_x64(True), jlayers.formulation("native" if path == "native" else "cpu"):
    x = jnp.asarray(rng.standard_normal((3, 4, 6, 5) if nchw else (3, 6, 5, 4)))
    w_shape = (8, 4 // groups, 3, 2) if nchw else (3, 2, 4 // groups, 8)
    w = jnp.asarray(rng.standard_normal(w_shape))
    g = jnp.asarray(rng.standard_normal(jax.eval_shape(
        lambda x, w: conv2d_reference(x, w, **kw), x, w).shape))
    got, want = jax.jit(lambda x, w, g: (  # one program: eagerly, a compile per primitive
        jax.vjp(lambda x, w: conv2d(x, w, **kw), x, w)[1](g),
        jax.vjp(lambda x, w: conv2d_reference(x, w, **kw), x, w)[1](g)))(x, w, g)
  assert used == ([chunk] if path.startswith("patches") else [None])
  for a, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch, per_image, x_bytes, chunk", [
    (128, 28 * 28 * 9 * 32 * 4, 128 * 28 * 28 * 32 * 4, 2),  # 2 images fill the 2 MiB budget
    (127, 28 * 28 * 9 * 32 * 4, 127 * 28 * 28 * 32 * 4, 2),  # 64 steps, padded to 128
    (7, 1 << 20, 7 << 20, 2),  # prime batch: 4 steps of 2, padded to 8
    (5, 1 << 19, 5 << 19, 3),  # 4 fit, but 2 steps of 3 (padded to 6) beat 4 + 1
    (6, 100, 600, 6),  # tiny: the whole batch in one step
    (16, 4 << 20, 64 << 20, 1),  # one image over budget, still smaller than x
    (1, 4 << 20, 1 << 20, 0),  # one image's patches larger than x: the convolution
    (0, 100, 0, 0),  # empty batch: the convolution
])
def test_dw_chunk_size(batch, per_image, x_bytes, chunk):
  assert _conv_cpu._images_per_step(batch, per_image, x_bytes) == chunk


_X, _W = np.ones((2, 5, 5, 4), np.float32), np.ones((3, 3, 4, 6), np.float32)
BAD = [
    pytest.param(np.ones((5, 5, 4), np.float32), _W, None, {}, ValueError,
                 r"conv2d: x must have rank 4 \(N, H, W, C\), got shape \(5, 5, 4\)", id="x-rank"),
    pytest.param(_X, np.ones((3, 4, 6), np.float32), None, {}, ValueError,
                 r"conv2d: w must have rank 4 \(H, W, in/groups, out\)", id="w-rank"),
    pytest.param(np.ones((2, 5, 5, 4), np.int32), _W, None, {}, TypeError,
                 "conv2d: x must have a floating dtype, got int32", id="x-int"),
    pytest.param(_X, _W.astype(np.int32), None, {}, TypeError,
                 "conv2d: w must have a floating dtype, got int32", id="w-int"),
    pytest.param(_X, _W, np.ones(6, np.int8), {}, TypeError,
                 "conv2d: b must have a floating dtype, got int8", id="b-int"),
    pytest.param(_X, _W, None, {"precision": "fast"}, TypeError,
                 "conv2d: precision must be None, a jax.lax.Precision", id="precision"),
    pytest.param(_X, np.ones((3, 3, 3, 6), np.float32), None, {}, ValueError,
                 "conv2d: x has 4 channels but w expects", id="channels"),
    pytest.param(_X, np.ones((3, 3, 2, 6), np.float32), None, {"groups": 3}, ValueError,
                 r"conv2d: groups=3 must divide the input channels \(4\)", id="groups-divide"),
    pytest.param(_X, np.ones((3, 3, 2, 5), np.float32), None, {"groups": 2}, ValueError,
                 r"output channels \(5\)", id="groups-out"),
    pytest.param(_X, _W, None, {"groups": 0}, ValueError, "conv2d: groups must be positive",
                 id="groups-zero"),
    pytest.param(_X, _W, None, {"stride": 0}, ValueError, "conv2d: stride must be positive",
                 id="stride-zero"),
    pytest.param(_X, _W, None, {"stride": "2"}, TypeError, "conv2d: stride must be an int",
                 id="stride-str"),
    pytest.param(_X, _W, None, {"dilation": (1, -1)}, ValueError,
                 r"conv2d: dilation must be positive, got \(1, -1\)", id="dilation-neg"),
    pytest.param(_X, _W, None, {"padding": "FULL"}, ValueError,
                 "conv2d: padding must be 'SAME', 'VALID'", id="padding-string"),
    pytest.param(_X, _W, None, {"padding": ((1, 2),)}, TypeError,
                 "conv2d: padding must be .* of ints", id="padding-malformed"),
    pytest.param(_X, _W, None, {"padding": ((1, 0), (0, 1.5))}, TypeError,
                 "conv2d: padding must be .* of ints", id="padding-float"),
    pytest.param(_X, _W, None, {"padding": ((1, -1), (0, 0))}, ValueError,
                 "conv2d: padding must be non-negative", id="padding-negative-pair"),
    pytest.param(_X, _W, None, {"padding": -1}, ValueError,
                 "conv2d: padding must be non-negative", id="padding-negative-int"),
    pytest.param(_X, _W, None, {"layout": "NWHC"}, ValueError,
                 "conv2d: layout must be 'NHWC' or 'NCHW', got 'NWHC'", id="layout"),
    pytest.param(_X, _W, np.ones(5, np.float32), {}, ValueError,
                 r"conv2d: b must have shape \(6,\) \(out,\), got \(5,\)", id="b-shape"),
    pytest.param(np.ones((2, 2, 2, 4), np.float32), _W, None, {"padding": "VALID"}, ValueError,
                 r"conv2d: the dilated kernel \(3, 3\) is larger than the padded input \(2, 2\)",
                 id="kernel-too-big"),
    pytest.param(_X, _W, None, {"padding": ((1, 0), (0, 0)), "dilation": 3}, ValueError,
                 r"dilated kernel \(7, 7\) is larger than the padded input \(6, 5\)",
                 id="dilated-kernel-too-big"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("fn", [conv2d, conv2d_reference])
@pytest.mark.parametrize("x, w, b, kw, error, match", BAD)
def test_bad_input_raises(x, w, b, kw, error, match, fn, jit):
  def call(x, w, b):
    return fn(x, w, b, **kw)

  with pytest.raises(error, match=match):
    (jax.jit(call) if jit else call)(jnp.asarray(x), jnp.asarray(w),
                                     None if b is None else jnp.asarray(b))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_empty_batch_has_empty_gradients_and_zero_dw(layout):
  x = jnp.zeros((0, 5, 5, 4) if layout == "NHWC" else (0, 4, 5, 5))
  w = jnp.ones((3, 3, 4, 2) if layout == "NHWC" else (2, 4, 3, 3))
  dx, dw = jax.grad(lambda x, w: jnp.sum(conv2d(x, w, layout=layout)), argnums=(0, 1))(x, w)
  assert dx.shape == x.shape
  np.testing.assert_array_equal(dw, np.zeros(w.shape))
