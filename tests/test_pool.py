"""Pooling beyond the generic registry tests: ties, overlap, golden values, divisors, dilation
and ``ceil_mode`` (output sizes as PyTorch computes them), residuals, layers and argument
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlayers
from jlayers.pool import avg_pool2d, avg_pool2d_reference, max_pool2d, max_pool2d_reference
from jlayers.testing import saved_residuals

# 4x4 input with distinct window maxima; the 2x2 blocks are [[1,3],[4,0]], [[2,0],[1,6]],
# [[2,2],[0,5]], [[9,1],[3,3]].
X4 = np.array([[1., 3., 2., 0.],
               [4., 0., 1., 6.],
               [2., 2., 9., 1.],
               [0., 5., 3., 3.]])


def _nhwc(a):
  return np.asarray(a, np.float32).reshape(1, *np.shape(a), 1)


def _grad(op, x, cot=None, **kw):
  def loss(x):
    y = op(x, **kw)
    return jnp.sum(y if cot is None else y * cot)
  return jax.grad(loss)(x)


def _jit_grad(op, x, cot=None, **kw):
  """:func:`_grad` in one jitted program (eagerly, every primitive of the backward pass would
  compile its own), as a NumPy array."""
  return np.asarray(jax.jit(lambda x: _grad(op, x, cot, **kw))(x))


def _jit(op, x, *args, **kw):
  """``op(x, *args, **kw)`` in one jitted program, as a NumPy array."""
  return np.asarray(jax.jit(lambda x: op(x, *args, **kw))(x))


# ----------------------------------------------------------------------------------- ties


def test_max_pool_all_equal_windows_send_gradient_to_the_first_element():
  x = np.zeros((1, 4, 6, 1), np.float32)
  g = _jit_grad(max_pool2d, x, window=2)
  expected = np.zeros((4, 6))
  expected[0::2, 0::2] = 1.0  # top-left of every 2x2 window
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)
  np.testing.assert_array_equal(g, _jit_grad(max_pool2d_reference, x, window=2))


def test_max_pool_two_equal_maxima_in_a_window_take_the_first_in_row_major_order():
  # Windows: [[5,5],[1,2]] (tie on the first row), [[0,1],[7,7]] (tie on the second row),
  # [[3,0],[3,1]] (tie in the first column), [[2,4],[4,4]] (three-way tie).
  x = _nhwc([[5., 5., 0., 1.],
             [1., 2., 7., 7.],
             [3., 0., 2., 4.],
             [3., 1., 4., 4.]])
  expected = np.array([[1., 0., 0., 0.],
                       [0., 0., 1., 0.],
                       [1., 0., 0., 1.],
                       [0., 0., 0., 0.]])
  g = _jit_grad(max_pool2d, x, window=2)
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)
  np.testing.assert_array_equal(g, _jit_grad(max_pool2d_reference, x, window=2))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_max_pool_ties_in_overlapping_padded_windows_match_autodiff(layout):
  x = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 3, 6, 5)), jnp.float32)
  kw = dict(window=3, stride=1, padding="SAME", layout=layout)
  g = _jit_grad(max_pool2d, x, **kw)
  np.testing.assert_array_equal(g, _jit_grad(max_pool2d_reference, x, **kw))
  assert float(np.sum(g)) == 2 * 3 * 6 * 5  # every output's gradient lands exactly once


# ------------------------------------------------------------------------- overlapping windows


def test_max_pool_overlapping_windows_accumulate_like_autodiff():
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)))
    kw = dict(window=3, stride=1, padding="VALID")
    cot = jnp.asarray(rng.standard_normal((2, 5, 4, 3)))
    g = _jit_grad(max_pool2d, x, cot, **kw)
    np.testing.assert_allclose(g, _jit_grad(max_pool2d_reference, x, cot, **kw), rtol=1e-12)
    ones = _jit_grad(max_pool2d, x, **kw)
    assert float(np.max(ones)) > 1  # some element is the maximum of several windows
    assert float(np.sum(ones)) == 2 * 5 * 4 * 3


# ------------------------------------------------------------------------------ golden values


def test_max_pool_golden_4x4():
  x = _nhwc(X4)
  np.testing.assert_array_equal(_jit(max_pool2d, x, 2)[0, :, :, 0], [[4., 6.], [5., 9.]])
  g = _jit_grad(max_pool2d, x, _nhwc([[1., 2.], [3., 4.]]), window=2)
  expected = np.zeros((4, 4))
  expected[1, 0], expected[1, 3], expected[3, 1], expected[2, 2] = 1., 2., 3., 4.
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)
  # 3x3 windows, stride 1: the 9 at (2, 2) is the maximum of all four windows.
  np.testing.assert_array_equal(_jit(max_pool2d, x, 3, stride=1)[0, :, :, 0],
                                [[9., 9.], [9., 9.]])
  expected = np.zeros((4, 4))
  expected[2, 2] = 4.
  np.testing.assert_array_equal(_jit_grad(max_pool2d, x, window=3, stride=1)[0, :, :, 0],
                                expected)


def test_avg_pool_golden_4x4():
  x = _nhwc(X4)
  np.testing.assert_allclose(_jit(avg_pool2d, x, 2)[0, :, :, 0], [[2., 2.25], [2.25, 4.]])
  g = _jit_grad(avg_pool2d, x, _nhwc([[1., 2.], [3., 4.]]), window=2)
  expected = np.repeat(np.repeat([[0.25, 0.5], [0.75, 1.]], 2, axis=0), 2, axis=1)
  np.testing.assert_allclose(np.asarray(g)[0, :, :, 0], expected)


def test_avg_pool_count_include_pad_differs_at_the_border_only():
  """4x4 ones, 3x3 window, stride 1, SAME (one row/column of padding on every side)."""
  x = np.ones((1, 4, 4, 1), np.float32)
  kw = dict(window=3, stride=1, padding="SAME")
  with_pad = _jit(avg_pool2d, x, **kw)[0, :, :, 0]
  # corners see 4 inputs of 9, edges 6 of 9, the interior all 9.
  np.testing.assert_allclose(with_pad, [[4 / 9, 6 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 1, 6 / 9],
                                        [6 / 9, 1, 1, 6 / 9], [4 / 9, 6 / 9, 6 / 9, 4 / 9]],
                             rtol=1e-6)
  np.testing.assert_allclose(_jit(avg_pool2d, x, count_include_pad=False, **kw), 1.0, rtol=1e-6)
  # Gradient of the sum of outputs: each input collects 1 / count from every window holding it.
  g_in = np.asarray(_jit_grad(avg_pool2d, x, **kw))[0, :, :, 0]
  g_ex = np.asarray(_jit_grad(avg_pool2d, x, count_include_pad=False, **kw))[0, :, :, 0]
  np.testing.assert_allclose(g_in[0, 0], 4 / 9, rtol=1e-6)  # 4 windows hold the corner
  np.testing.assert_allclose(g_in[1, 1], 1.0, rtol=1e-6)  # 9 windows hold (1, 1)
  # windows holding (0, 0) are centred at (0,0), (0,1), (1,0), (1,1): counts 4, 6, 6, 9.
  np.testing.assert_allclose(g_ex[0, 0], 1 / 4 + 1 / 6 + 1 / 6 + 1 / 9, rtol=1e-6)
  # (1, 1) is held by all 9 windows centred in rows/cols 0..2: counts (2,3,3) x (2,3,3).
  counts = np.outer([2, 3, 3], [2, 3, 3])
  np.testing.assert_allclose(g_ex[1, 1], np.sum(1 / counts), rtol=1e-6)
  for kwargs in (kw, dict(kw, count_include_pad=False)):
    np.testing.assert_allclose(_jit_grad(avg_pool2d, x, **kwargs),
                               _jit_grad(avg_pool2d_reference, x, **kwargs), rtol=1e-6)


@pytest.mark.parametrize("op, ref, extra", [
    (max_pool2d, max_pool2d_reference, {}),
    (avg_pool2d, avg_pool2d_reference, {}),
    (avg_pool2d, avg_pool2d_reference, {"count_include_pad": False})])
def test_views_that_lie_wholly_in_the_padding_match_autodiff(op, ref, extra):
  """One input row under two rows of padding: two of the three window rows see only padding."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 1, 4, 3)))
    kw = dict(window=3, stride=(1, 2), padding=((2, 0), (2, 1)), **extra)
    np.testing.assert_allclose(op(x, **kw), ref(x, **kw), rtol=1e-12)
    cot = jnp.asarray(rng.standard_normal(jax.eval_shape(lambda x: ref(x, **kw), x).shape))
    np.testing.assert_allclose(_jit_grad(op, x, cot, **kw), _jit_grad(ref, x, cot, **kw),
                               rtol=1e-12)


# -------------------------------------------------------------------- dilation and ceil_mode

FORMULATIONS = ["cpu", "native"]

# (n, k, s, p, d, floor size, ceil_mode size): torch.nn.functional.max_pool2d(x, k, s, p, d,
# ceil_mode) on n x n inputs, PyTorch 2.13. ceil_mode drops the extra window where it would start
# in the high padding: (5, 2, 3, 1, 1), (7, 2, 4, 1, 1) and (4, 2, 3, 1, 1).
TORCH_SIZES = [(5, 2, 2, 0, 1, 2, 3), (5, 2, 3, 1, 1, 2, 2), (6, 3, 2, 1, 1, 3, 4),
               (7, 3, 2, 1, 2, 3, 3), (8, 2, 3, 0, 2, 2, 3), (9, 3, 3, 1, 3, 2, 3),
               (10, 3, 4, 1, 2, 2, 3), (6, 2, 1, 0, 3, 3, 3), (7, 2, 4, 1, 1, 2, 2),
               (11, 3, 5, 1, 2, 2, 3), (4, 2, 3, 1, 1, 2, 2), (12, 4, 3, 2, 2, 4, 4)]


@pytest.mark.parametrize("n, k, s, p, d, floor_size, ceil_size", TORCH_SIZES)
def test_output_sizes_follow_pytorch(n, k, s, p, d, floor_size, ceil_size):
  x = jax.ShapeDtypeStruct((1, n, n + 1, 2), jnp.float32)
  ops = [max_pool2d, max_pool2d_reference] + ([avg_pool2d, avg_pool2d_reference] if d == 1 else [])
  for op in ops:
    dilation = {"dilation": d} if d != 1 else {}
    for ceil_mode, size in ((False, floor_size), (True, ceil_size)):
      shape = jax.eval_shape(lambda x: op(x, (k, 1), stride=(s, 1), padding=((p, p), (0, 0)),
                                          ceil_mode=ceil_mode, **dilation), x).shape
      assert shape == (1, size, n + 1, 2), (op.__name__, ceil_mode)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_dilated_max_pool_golden_4x4(formulation):
  """Window 2, dilation 2, stride 1: window (i, j) holds x[i, j], x[i, j+2], x[i+2, j], x[i+2,
  j+2], so the outputs are max(1, 2, 2, 9), max(3, 0, 2, 1), max(4, 1, 0, 3), max(0, 6, 5, 3)."""
  x, kw = _nhwc(X4), dict(window=2, stride=1, dilation=2)
  with jlayers.formulation(formulation):
    np.testing.assert_array_equal(_jit(max_pool2d, x, **kw)[0, :, :, 0], [[9., 3.], [4., 6.]])
    g = _jit_grad(max_pool2d, x, _nhwc([[1., 2.], [3., 4.]]), **kw)
  expected = np.zeros((4, 4))
  expected[2, 2], expected[0, 1], expected[1, 0], expected[1, 3] = 1., 2., 3., 4.
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)
  np.testing.assert_array_equal(
      g, _jit_grad(max_pool2d_reference, x, _nhwc([[1., 2.], [3., 4.]]), **kw))


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_dilated_max_pool_ties_go_to_the_first_element_of_each_window(formulation):
  """All equal: each window's first element (its top-left) takes its gradient, once."""
  x = np.zeros((1, 5, 6, 1), np.float32)
  kw = dict(window=2, stride=1, dilation=(2, 3))
  with jlayers.formulation(formulation):
    g = _jit_grad(max_pool2d, x, **kw)
  expected = np.zeros((5, 6))
  expected[:3, :3] = 1.0  # 3 x 3 windows starting at (i, j)
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)
  np.testing.assert_array_equal(g, _jit_grad(max_pool2d_reference, x, **kw))


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("kw", [
    dict(window=3, stride=1, dilation=2, padding="SAME", ceil_mode=True),
    dict(window=(2, 3), stride=(3, 2), dilation=(2, 3), padding=((1, 1), (2, 0)), ceil_mode=True,
         layout="NCHW"),
    dict(window=2, stride=3, dilation=3, padding=1)], ids=["overlapping", "strided", "disjoint"])
def test_dilated_max_pool_ties_match_autodiff(kw, formulation):
  x = jnp.asarray(np.random.default_rng(5).integers(0, 3, (2, 3, 9, 8)), jnp.float32)
  with jlayers.formulation(formulation):
    y, g = _jit(max_pool2d, x, **kw), _jit_grad(max_pool2d, x, **kw)
  np.testing.assert_array_equal(y, _jit(max_pool2d_reference, x, **kw))
  np.testing.assert_array_equal(g, _jit_grad(max_pool2d_reference, x, **kw))
  assert float(np.sum(g)) == y.size  # every output's gradient lands exactly once


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_max_pool_ceil_mode_golden_5x5(formulation):
  """Window 2 on 5 x 5: ceil_mode adds a third row and column of windows, holding the last row
  and column (and the corner alone)."""
  x = _nhwc(np.arange(25.0).reshape(5, 5))
  with jlayers.formulation(formulation):
    y = _jit(max_pool2d, x, 2, ceil_mode=True)
    g = _jit_grad(max_pool2d, x, window=2, ceil_mode=True)
  np.testing.assert_array_equal(y[0, :, :, 0], [[6., 8., 9.], [16., 18., 19.], [21., 23., 24.]])
  expected = np.zeros((5, 5))
  expected[np.ix_([1, 3, 4], [1, 3, 4])] = 1.0
  np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], expected)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_avg_pool_ceil_mode_divisors_follow_pytorch(formulation):
  """6 x 6 input, window 3, stride 2, padding 1, ceil_mode: windows start at rows -1, 1, 3, 5,
  the last one reaching row 7, past the padding row 6. Per axis, count_include_pad=True counts
  the rows in [-1, 7) (3, 3, 3, 2), False those in [0, 6) (2, 3, 3, 1); the divisor is the
  product. Values as torch.nn.functional.avg_pool2d gives them."""
  x = _nhwc(np.arange(36.0).reshape(6, 6))
  sums = np.array([[14., 30., 42., 16.], [75., 126., 144., 51.], [147., 234., 252., 87.],
                   [61., 96., 102., 35.]])  # window sums of the zero-padded input
  kw = dict(window=3, stride=2, padding=1, ceil_mode=True)
  for include, per_axis, grad_per_axis in (
      (True, [3, 3, 3, 2], [1 / 3, 2 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3 + 1 / 2]),
      (False, [2, 3, 3, 1], [1 / 2, 1 / 2 + 1 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3 + 1])):
    with jlayers.formulation(formulation):
      y = _jit(avg_pool2d, x, count_include_pad=include, **kw)
      g = _jit_grad(avg_pool2d, x, count_include_pad=include, **kw)
    np.testing.assert_allclose(y[0, :, :, 0], sums / np.outer(per_axis, per_axis), rtol=1e-6)
    # Each input collects 1 / divisor from every window holding it (separable per axis).
    np.testing.assert_allclose(np.asarray(g)[0, :, :, 0], np.outer(grad_per_axis, grad_per_axis),
                               rtol=1e-6)
    np.testing.assert_allclose(_jit(avg_pool2d_reference, x, count_include_pad=include, **kw), y,
                               rtol=1e-6)
  # The corner window holds x[5, 5] = 35, one padding row and column and the ceil_mode extras.
  np.testing.assert_allclose(_jit(avg_pool2d, x, **kw)[0, 3, 3, 0], 35 / 4, rtol=1e-6)
  np.testing.assert_allclose(_jit(avg_pool2d, x, count_include_pad=False, **kw)[0, 3, 3, 0],
                             35.0)


def test_dilated_windows_of_more_than_max_views_offsets_take_the_native_formulation():
  x = jnp.asarray(np.random.default_rng(7).permutation(13 * 23).reshape(1, 13, 23, 1),
                  jnp.float32)
  # 110 offsets; along W a span of 19 at stride 3 on 23 columns: 3 windows with ceil_mode.
  kw = dict(window=(11, 10), stride=(1, 3), dilation=(1, 2), ceil_mode=True)
  with jlayers.formulation("cpu"):
    (res, why), = saved_residuals(lambda x: max_pool2d(x, **kw), x)
  assert res.shape == x.shape and why.startswith("from the argument")
  g = jax.jit(lambda x: _grad(max_pool2d, x, **kw))(x)
  assert g.shape == x.shape and float(np.sum(g)) == 3 * 3
  np.testing.assert_array_equal(g, jax.jit(lambda x: _grad(max_pool2d_reference, x, **kw))(x))


@pytest.mark.parametrize("impl", ["manual", "autodiff"])
def test_pool_layers_take_dilation_and_ceil_mode(impl):
  x = np.arange(2 * 5 * 7 * 3, dtype=np.float32).reshape(2, 5, 7, 3)
  layer = jlayers.MaxPool2d(2, dilation=(2, 3), ceil_mode=True)
  assert (layer.dilation, layer.ceil_mode) == ((2, 3), True)
  assert layer.output_shape(x.shape) == (2, 2, 3, 3)  # (2, 2, 2, 3) without ceil_mode
  y, state = jax.jit(lambda x: layer.apply({}, {}, x, impl=impl))(x)
  assert state == {}
  np.testing.assert_array_equal(y, _jit(max_pool2d, x, 2, dilation=(2, 3), ceil_mode=True))
  layer = jlayers.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False,
                            layout="NCHW")
  assert layer.output_shape((2, 3, 6, 6)) == (2, 3, 4, 4)  # (2, 3, 3, 3) without ceil_mode
  x = x.reshape(2, 3, 7, 5)
  y, _ = jax.jit(lambda x: layer.apply({}, {}, x, impl=impl))(x)
  np.testing.assert_allclose(y, _jit(avg_pool2d, x, 3, stride=2, padding=1, ceil_mode=True,
                                     count_include_pad=False, layout="NCHW"), rtol=1e-6)


@pytest.mark.parametrize("make, error, match", [
    (lambda: jlayers.MaxPool2d(2, dilation=0), ValueError,
     r"MaxPool2d: dilation must be positive, got \(0, 0\)"),
    (lambda: jlayers.MaxPool2d(2, dilation=(1, 2, 3)), TypeError,
     "MaxPool2d: dilation must be an int or a sequence of 2 ints"),
    (lambda: jlayers.MaxPool2d(2, ceil_mode=1), TypeError,
     "MaxPool2d: ceil_mode must be a bool, got int"),
    (lambda: jlayers.AvgPool2d(2, ceil_mode="yes"), TypeError,
     "AvgPool2d: ceil_mode must be a bool, got str"),
    (lambda: jlayers.AvgPool2d(2, dilation=2), TypeError, "unexpected keyword argument 'dilation'"),
])
def test_pool_layer_bad_dilation_and_ceil_mode(make, error, match):
  with pytest.raises(error, match=match):
    make()


# ---------------------------------------------------------------------------------- residuals


@pytest.mark.parametrize("kw", [dict(window=2), dict(window=3, stride=1, padding="SAME"),
                                dict(window=(2, 3), stride=2, layout="NCHW"),
                                dict(window=2, stride=1, dilation=(2, 3), ceil_mode=True)])
def test_max_pool_saves_one_int8_array_of_the_output_shape_on_cpu_and_x_natively(kw):
  x = jnp.ones((2, 6, 7, 3), jnp.float32)
  with jlayers.formulation("cpu"):
    res = saved_residuals(lambda x: max_pool2d(x, **kw), x)
  out_shape = jax.eval_shape(lambda x: max_pool2d(x, **kw), x).shape
  assert [(r.dtype, r.shape) for r, _ in res] == [(jnp.int8, out_shape)]
  with jlayers.formulation("native"):
    (res, why), = saved_residuals(lambda x: max_pool2d(x, **kw), x)
  assert res.shape == x.shape and why.startswith("from the argument")


@pytest.mark.parametrize("formulation", ["cpu", "native"])
@pytest.mark.parametrize("kw", [dict(window=2), dict(window=3, stride=1, padding="SAME"),
                                dict(window=3, padding=1, count_include_pad=False),
                                dict(window=3, stride=2, padding=1, ceil_mode=True)])
def test_avg_pool_saves_nothing(kw, formulation):
  x = jnp.ones((2, 6, 7, 3), jnp.float32)
  with jlayers.formulation(formulation):
    assert saved_residuals(lambda x: avg_pool2d(x, **kw), x) == []


def test_compiled_program_keeps_only_the_platform_formulation():
  """Both formulations are traced; lowering for CPU keeps the CPU one alone (its int8 index)."""
  x = jnp.ones((2, 6, 7, 3), jnp.float32)
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(max_pool2d(x, 2)))).lower(x).compile().as_text()
  assert "s8[" in hlo and "select-and-scatter" not in hlo


# ------------------------------------------------------------------------------ bad arguments

X = jnp.ones((2, 5, 5, 3), jnp.float32)
BAD = [pytest.param(*case, id=case_id) for case_id, *case in [
    ("rank", X[0], {}, ValueError,
     r"max_pool2d: x must have rank 4 \(N, H, W, C\), got shape \(5, 5, 3\)"),
    ("int-dtype", X.astype(jnp.int32), {}, TypeError, "x must have a floating dtype, got int32"),
    ("list", [[1.0]], {}, TypeError, "x must be an array, got list"),
    ("layout", X, dict(layout="NWHC"), ValueError,
     "layout must be 'NHWC' or 'NCHW', got 'NWHC'"),
    ("window-0", X, dict(window=0), ValueError, r"window must be positive, got \(0, 0\)"),
    ("window-3d", X, dict(window=(2, 2, 2)), TypeError,
     "window must be an int or a sequence of 2 ints"),
    ("window-float", X, dict(window=2.0), TypeError,
     "window must be an int or a sequence of 2 ints, got 2.0"),
    ("stride-neg", X, dict(stride=(1, -1)), ValueError, r"stride must be positive, got \(1, -1\)"),
    ("stride-str", X, dict(stride="2"), TypeError, "stride must be an int or a sequence of 2 ints"),
    ("padding-name", X, dict(padding="FULL"), ValueError,
     "padding must be 'SAME', 'VALID', an int or .*got 'FULL'"),
    ("padding-one-pair", X, dict(padding=((1, 1),)), TypeError,
     r"padding must be .* of ints, got \(\(1, 1\),\)"),
    ("padding-flat-pair", X, dict(padding=(1, 1)), TypeError, r"padding must be .* got \(1, 1\)"),
    ("padding-float", X, dict(padding=1.5), TypeError, "padding must be .* got 1.5"),
    ("padding-neg", X, dict(padding=((0, 1), (-1, 0))), ValueError,
     "padding must be non-negative"),
    ("padding-ge-window", X, dict(padding=2), ValueError,
     r"padding must be smaller than the window \(2, 2\)"),
    ("window-too-big", X, dict(window=6), ValueError,
     r"window \(6, 6\) is larger than the padded input \(5, 5\)"),
    ("window-too-big-padded", X, dict(window=(3, 6), padding=((1, 1), (0, 0))), ValueError,
     r"window \(3, 6\) is larger than the padded input \(7, 5\)"),
]]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("op", [max_pool2d, avg_pool2d, max_pool2d_reference,
                                avg_pool2d_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("x, kw, error, match", BAD)
def test_bad_arguments_raise_at_trace_time(op, jit, x, kw, error, match):
  kw = {"window": 2, **kw}
  name = op.__name__.removesuffix("_reference")
  match = match.replace("max_pool2d", name)
  with pytest.raises(error, match=match) as info:
    if jit and not isinstance(x, list):
      jax.jit(lambda x: op(x, **kw))(x)
    else:
      op(x, **kw)
  assert str(info.value).startswith(f"{name}: ")


MAX_BAD = [pytest.param(*case, id=case_id) for case_id, *case in [
    ("dilation-0", X, dict(dilation=0), ValueError, r"dilation must be positive, got \(0, 0\)"),
    ("dilation-neg", X, dict(dilation=(1, -2)), ValueError,
     r"dilation must be positive, got \(1, -2\)"),
    ("dilation-float", X, dict(dilation=1.5), TypeError,
     "dilation must be an int or a sequence of 2 ints, got 1.5"),
    ("dilated-window-too-big", X, dict(window=3, dilation=3), ValueError,
     r"dilated window \(7, 7\) \(window \(3, 3\), dilation \(3, 3\)\) is larger than the "
     r"padded input \(5, 5\)"),
    ("dilated-window-too-big-padded", X, dict(window=3, dilation=(3, 1),
                                              padding=((1, 0), (0, 0))), ValueError,
     r"dilated window \(7, 3\) .* is larger than the padded input \(6, 5\)"),
    ("padding-ge-dilated-window", X, dict(dilation=2, padding=((3, 0), (0, 0))), ValueError,
     r"padding must be smaller than the dilated window \(3, 3\) \(window \(2, 2\), "
     r"dilation \(2, 2\)\) on every side"),
    ("window-on-padding-only", jnp.ones((2, 1, 4, 3), jnp.float32),
     dict(window=(2, 1), dilation=(2, 1), padding=((1, 1), (0, 0))), ValueError,
     r"every window must cover an input element, but the dilated window \(3, 1\) .* of output H "
     r"index 0 covers only padding"),
    # Along W (2 inputs, 3 padding below): window 0 holds -3 and 0; ceil_mode adds window 1,
    # holding -1 and 2, both outside the input.
    ("ceil-window-on-padding-only", jnp.ones((2, 4, 2, 3), jnp.float32),
     dict(window=(1, 2), stride=(1, 2), dilation=(1, 3), padding=((0, 0), (3, 0)),
          ceil_mode=True), ValueError, "of output W index 1 covers only padding"),
]]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("op", [max_pool2d, max_pool2d_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("x, kw, error, match", MAX_BAD)
def test_bad_dilation_raises_at_trace_time(op, jit, x, kw, error, match):
  kw = {"window": 2, **kw}
  with pytest.raises(error, match=match) as info:
    if jit:
      jax.jit(lambda x: op(x, **kw))(x)
    else:
      op(x, **kw)
  assert str(info.value).startswith("max_pool2d: ")


@pytest.mark.parametrize("op", [avg_pool2d, avg_pool2d_reference], ids=lambda f: f.__name__)
def test_avg_pool_takes_no_dilation(op):
  with pytest.raises(TypeError, match="unexpected keyword argument 'dilation'"):
    jax.jit(lambda x: op(x, 2, dilation=2))(X)


@pytest.mark.parametrize("op", [max_pool2d, avg_pool2d, max_pool2d_reference,
                                avg_pool2d_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("value", [1, "True", None, np.bool_(True)])
def test_ceil_mode_must_be_a_bool(op, value):
  name = op.__name__.removesuffix("_reference")
  with pytest.raises(TypeError, match=f"{name}: ceil_mode must be a bool, got {value!r}"):
    jax.jit(lambda x: op(x, 2, ceil_mode=value))(X)


def test_count_include_pad_must_be_a_bool():
  for op in (avg_pool2d, avg_pool2d_reference):
    with pytest.raises(TypeError, match="avg_pool2d: count_include_pad must be a bool, got 1"):
      jax.jit(lambda x: op(x, 2, count_include_pad=1))(X)


@pytest.mark.parametrize("kw", [dict(window=12, stride=1), dict(window=(12, 11))],
                         ids=["overlapping", "disjoint"])
def test_large_windows_take_the_native_formulation(kw):
  """More than _MAX_VIEWS offsets (12x12, 12x11): reduce_window on every platform, saving x."""
  x = jnp.asarray(np.random.default_rng(2).permutation(2 * 13 * 12).reshape(2, 13, 12, 1),
                  jnp.float32)
  with jlayers.formulation("cpu"):
    (res, why), = saved_residuals(lambda x: max_pool2d(x, **kw), x)
  assert res.shape == x.shape and why.startswith("from the argument")
  grads = jax.jit(lambda x: (_grad(max_pool2d, x, **kw), _grad(max_pool2d_reference, x, **kw),
                             _grad(avg_pool2d, x, **kw), _grad(avg_pool2d_reference, x, **kw)))
  g_max, g_max_ref, g_avg, g_avg_ref = grads(x)
  np.testing.assert_array_equal(g_max, g_max_ref)
  np.testing.assert_allclose(g_avg, g_avg_ref, rtol=1e-6)
