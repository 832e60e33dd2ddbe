"""Golden values, conventions and errors of ``softmax_cross_entropy`` (generic checks are in
test_ops_generic.py)."""

import math

import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

from jlayers.loss import softmax_cross_entropy, softmax_cross_entropy_reference

BOTH = pytest.mark.parametrize("fn", [softmax_cross_entropy, softmax_cross_entropy_reference],
                               ids=["manual", "reference"])


def _value_and_grad(fn, logits, labels, **kwargs):
  """Loss and gradient w.r.t. the logits, jitted (one compile instead of one per primitive)."""
  return jax.jit(jax.value_and_grad(lambda x, y, k: fn(x, y, **k)))(logits, labels, kwargs)


@BOTH
def test_golden_two_classes(fn):
  # p = softmax([0, ln 3]) = [1/4, 3/4]; loss = -log(3/4); grad = p - onehot(1) = [1/4, -1/4].
  with jax.enable_x64(True):
    logits = jnp.array([[0.0, math.log(3.0)]], jnp.float64)
    loss, grad = _value_and_grad(fn, logits, jnp.array([1], jnp.int32))
    np.testing.assert_allclose(loss, -math.log(0.75), rtol=1e-14)
    np.testing.assert_allclose(grad, [[0.25, -0.25]], rtol=1e-14)


@BOTH
def test_uniform_logits_give_log_num_classes(fn):
  # p = 1/C everywhere; the mean over N rows scales each gradient row by 1/N.
  n, c = 3, 7
  labels = jnp.array([0, 6, 2], jnp.int32)
  loss, grad = _value_and_grad(fn, jnp.zeros((n, c), jnp.float32), labels)
  np.testing.assert_allclose(loss, math.log(c), rtol=1e-6)
  expected = (np.full((n, c), 1.0 / c) - np.eye(c)[np.asarray(labels)]) / n
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


@BOTH
def test_rank1_logits_take_a_scalar_label(fn):
  loss, grad = _value_and_grad(fn, jnp.array([0.0, math.log(3.0)]), jnp.array(0, jnp.int32))
  np.testing.assert_allclose(loss, math.log(4.0), rtol=1e-6)
  np.testing.assert_allclose(grad, [-0.75, 0.75], rtol=1e-6)


@BOTH
def test_huge_logits_are_stable(fn):
  # Row 0: the label holds the maximum by 1e4, loss 0. Row 1: lse = 1e4 + log(1 + e^-1) and the
  # label holds 1e4 - 1, so the loss is 1 + log(1 + e^-1). Mean of the two rows.
  logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4 - 1.0]], jnp.float32)
  labels = jnp.array([0, 2], jnp.int32)
  loss, grad = _value_and_grad(fn, logits, labels)
  np.testing.assert_allclose(loss, (1.0 + math.log1p(math.exp(-1.0))) / 2, rtol=1e-6)
  q = 1.0 / (1.0 + math.exp(-1.0))  # softmax weight of the 1e4 entry in row 1
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [0.0, q / 2, (1.0 - q) / 2 - 0.5]],
                             atol=1e-6)
  ref_loss, ref_grad = _value_and_grad(softmax_cross_entropy_reference, logits, labels)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, atol=1e-7)


@BOTH
def test_where_equals_the_valid_subset(fn):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  labels = jnp.asarray([0, 3, 1, -1, 2, 9], jnp.int32)  # invalid labels only on masked rows
  mask = np.array([True, True, True, False, True, False])
  loss, grad = _value_and_grad(fn, logits, labels, where=jnp.asarray(mask))
  sub_loss, sub_grad = _value_and_grad(fn, logits[mask], labels[mask])
  np.testing.assert_allclose(loss, sub_loss, rtol=1e-6)
  np.testing.assert_allclose(grad[mask], sub_grad, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad[~mask], 0.0)


@BOTH
def test_where_ignores_non_finite_logits_in_masked_rows(fn):
  logits = jnp.array([[1.0, 2.0], [jnp.inf, -jnp.inf]], jnp.float32)
  labels = jnp.array([1, 0], jnp.int32)
  loss, grad = _value_and_grad(fn, logits, labels, where=jnp.array([True, False]))
  sub_loss, sub_grad = _value_and_grad(fn, logits[:1], labels[:1])
  np.testing.assert_allclose(loss, sub_loss, rtol=1e-6)
  np.testing.assert_allclose(grad[:1], sub_grad, rtol=1e-6)
  if fn is softmax_cross_entropy:  # autodiff of the twin multiplies a zero cotangent by NaN
    np.testing.assert_array_equal(grad[1], 0.0)


@BOTH
def test_all_false_mask_gives_zero_loss_and_zero_grads(fn):
  logits = jnp.array([[3.0, -1.0, 0.5], [0.0, 2.0, 1.0]], jnp.float32)
  labels = jnp.array([0, 1], jnp.int32)
  loss, grad = _value_and_grad(fn, logits, labels, where=jnp.zeros((2,), bool))
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((2, 3)))


@BOTH
def test_empty_batch_gives_zero_loss(fn):
  loss, grad = _value_and_grad(fn, jnp.zeros((0, 4), jnp.float32), jnp.zeros((0,), jnp.int32))
  assert float(loss) == 0.0
  assert grad.shape == (0, 4)


@BOTH
@pytest.mark.parametrize("bad", [-1, 3, 1000])
def test_out_of_range_label_gives_nan_loss_and_nan_grad_row(fn, bad):
  logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], jnp.float32)
  labels = jnp.array([0, bad], jnp.int32)
  loss, grad = jax.jit(lambda x, y: _value_and_grad(fn, x, y))(logits, labels)
  assert bool(jnp.isnan(loss))
  assert bool(jnp.all(jnp.isnan(grad[1])))
  assert bool(jnp.all(jnp.isfinite(grad[0])))


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8, jnp.int16])
def test_narrow_label_dtypes_are_checked_against_the_class_count(dtype):
  # 300 classes exceed uint8/int8: every representable non-negative label is in range.
  logits = jnp.zeros((2, 300), jnp.float32)
  ok = softmax_cross_entropy(logits, jnp.array([0, 100], dtype))
  np.testing.assert_allclose(ok, math.log(300), rtol=1e-6)
  if jnp.iinfo(dtype).min < 0:
    assert bool(jnp.isnan(softmax_cross_entropy(logits, jnp.array([0, -2], dtype))))


def test_low_precision_logits_are_computed_in_float32():
  # 4096 classes: a bfloat16 sum of exponentials would lose the small terms.
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((3, 4096)), jnp.bfloat16)
  labels = jnp.array([5, 4000, 17], jnp.int32)
  for dtype in (jnp.bfloat16, jnp.float16):
    x = logits.astype(dtype)
    loss = softmax_cross_entropy(x, labels)
    assert loss.dtype == dtype
    wide = softmax_cross_entropy_reference(x.astype(jnp.float32), labels)
    np.testing.assert_allclose(float(loss), float(wide), rtol=2.0**-8)


def test_hessian_matches_closed_form():
  # d²L/dx_i dx_i = (diag(p_i) - p_i p_iᵀ) / N per row, zero across rows.
  with jax.enable_x64(True):
    logits = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3)), jnp.float64)
    labels = jnp.array([2, 0], jnp.int32)
    hess = jax.jacrev(jax.grad(lambda x: softmax_cross_entropy(x, labels)))(logits)
    p = np.asarray(jax.nn.softmax(logits, axis=-1))
    expected = np.zeros((2, 3, 2, 3))
    for i in range(2):
      expected[i, :, i, :] = (np.diag(p[i]) - np.outer(p[i], p[i])) / 2
    np.testing.assert_allclose(hess, expected, rtol=1e-12, atol=1e-15)


def test_residuals_are_the_logits_and_two_floats_per_example(capsys):
  # Saved: the bf16 logits themselves, the row max and log Σ exp; no float [N, C] buffer.
  logits = jnp.zeros((8, 16), jnp.bfloat16)
  labels = jnp.zeros((8,), jnp.int32)
  print_saved_residuals(lambda x: softmax_cross_entropy(x, labels), logits)
  lines = capsys.readouterr().out.splitlines()
  floats = sorted(line.split(" ")[0] for line in lines if line.startswith(("f", "bf")))
  assert floats == ["bf16[8,16]", "f32[8,1]", "f32[8]"], lines
  assert any(line.startswith("bf16[8,16] from the argument") for line in lines), lines


@BOTH
def test_labels_get_no_gradient(fn):
  logits = jnp.array([[0.0, 1.0]], jnp.float32)
  labels = jnp.array([1], jnp.int32)
  assert jax.grad(fn)(logits, labels).shape == (1, 2)
  with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs"):
    jax.grad(fn, argnums=1)(logits, labels)


_X = np.zeros((4, 3), np.float32)
_Y = np.zeros((4,), np.int32)
BAD = [
    ((np.zeros((4, 3), np.int32), _Y), {}, TypeError, "logits must have a floating dtype"),
    ((np.float32(1.0), np.int32(0)), {}, ValueError, r"logits must have rank at least 1"),
    ((np.zeros((4, 0), np.float32), _Y), {}, ValueError, "at least one class"),
    ((_X, _Y.astype(np.float32)), {}, TypeError, "labels must have an integer dtype, got float32"),
    ((_X, np.zeros((4,), bool)), {}, TypeError, "labels must have an integer dtype, got bool"),
    ((_X, np.zeros((4, 1), np.int32)), {}, ValueError,
     r"labels must have shape \(4,\) \(logits.shape\[:-1\]\), got \(4, 1\)"),
    ((_X, [0, 1, 2, 0]), {}, TypeError, "labels must be an array, got list"),
    ((_X, _Y), {"where": np.ones((4,), np.int32)}, TypeError,
     "where must have dtype bool, got int32"),
    ((_X, _Y), {"where": np.ones((3,), bool)}, ValueError, r"where must have shape \(4,\)"),
]


@BOTH
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("args, kwargs, error, match", BAD,
                         ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_raise(fn, jit, args, kwargs, error, match):
  arrays = tuple(a if isinstance(a, list) else jnp.asarray(a) for a in args)
  kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
  call = jax.jit(fn) if jit else fn
  with pytest.raises(error, match=f"^softmax_cross_entropy: .*{match}"):
    call(*arrays, **kwargs)


def test_vmap_over_logits_labels_and_mask_equals_a_loop():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, (3, 4)), jnp.int32)
  mask = jnp.asarray(rng.random((3, 4)) < 0.7)

  def value_and_grad(x, y, w):
    return _value_and_grad(softmax_cross_entropy, x, y, where=w)

  loss, grad = jax.vmap(value_and_grad)(logits, labels, mask)
  for k in range(3):
    ref_loss, ref_grad = _value_and_grad(softmax_cross_entropy_reference, logits[k], labels[k],
                                         where=mask[k])
    np.testing.assert_allclose(loss[k], ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad[k], ref_grad, rtol=1e-5, atol=1e-7)
