"""Golden values, conventions, optax agreement and errors of the two softmax cross-entropies
(generic checks are in test_ops_generic.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jlayers.loss import (softmax_cross_entropy_with_integer_labels,
                          softmax_cross_entropy_with_integer_labels_reference)
from jlayers.loss_soft_labels import softmax_cross_entropy, softmax_cross_entropy_reference

INT = pytest.mark.parametrize(
    "fn", [softmax_cross_entropy_with_integer_labels,
           softmax_cross_entropy_with_integer_labels_reference], ids=["manual", "reference"])
PROB = pytest.mark.parametrize(
    "fn", [softmax_cross_entropy, softmax_cross_entropy_reference], ids=["manual", "reference"])


@functools.partial(jax.jit, static_argnums=0, static_argnames=("axis", "label_smoothing"))
def _int_vjp(fn, logits, labels, cot, **kwargs):
  """Per-example losses and ``cot``'s pullback to the logits, jitted (one compile)."""
  loss, pullback = jax.vjp(lambda x: fn(x, labels, **kwargs), logits)
  return loss, pullback(cot)[0]


@functools.partial(jax.jit, static_argnums=0, static_argnames=("axis",))
def _prob_vjp(fn, logits, labels, cot, **kwargs):
  """Per-example losses and ``cot``'s pullback to the logits and the labels, jitted."""
  loss, pullback = jax.vjp(lambda x, y: fn(x, y, **kwargs), logits, labels)
  return (loss, *pullback(cot))


# --- golden values ------------------------------------------------------------------------------


@INT
def test_int_golden_two_classes(fn):
  # p = softmax([0, ln 3]) = [1/4, 3/4]; loss = -log(3/4); grad = p - onehot(1) = [1/4, -1/4].
  with jax.enable_x64(True):
    logits = jnp.array([[0.0, math.log(3.0)], [0.0, 0.0]], jnp.float64)
    labels = jnp.array([1, 0], jnp.int32)
    loss, grad = _int_vjp(fn, logits, labels, jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(loss, [-math.log(0.75), math.log(2.0)], rtol=1e-14)
    np.testing.assert_allclose(grad, [[0.25, -0.25], [-1.0, 1.0]], rtol=1e-14)


@INT
def test_int_label_smoothing_golden(fn):
  with jax.enable_x64(True):
    # Uniform logits: loss log C for every alpha; grad 1/C - t with t = (1 - a) e_y + a / C.
    c, alpha = 4, 0.2
    loss, grad = _int_vjp(fn, jnp.zeros((1, c), jnp.float64), jnp.array([3], jnp.int32),
                          jnp.ones(1), label_smoothing=alpha)
    np.testing.assert_allclose(loss, [math.log(c)], rtol=1e-14)
    target = np.full(c, alpha / c) + (1 - alpha) * np.eye(c)[3]
    np.testing.assert_allclose(grad[0], 1 / c - target, rtol=1e-14, atol=1e-16)
    # p = [1/4, 3/4] and t = 0.5 e_1 + 0.5 / 2 = [1/4, 3/4]: the loss is the entropy of p and
    # the gradient p - t vanishes.
    loss, grad = _int_vjp(fn, jnp.array([[0.0, math.log(3.0)]]), jnp.array([1], jnp.int32),
                          jnp.ones(1), label_smoothing=0.5)
    np.testing.assert_allclose(loss, [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))],
                               rtol=1e-14)
    np.testing.assert_allclose(grad, [[0.0, 0.0]], atol=1e-15)
    # alpha = 1: the target is uniform whatever the label.
    a = _int_vjp(fn, jnp.array([[1.0, -2.0, 0.5]]), jnp.array([0], jnp.int32), jnp.ones(1),
                 label_smoothing=1.0)
    b = _int_vjp(fn, jnp.array([[1.0, -2.0, 0.5]]), jnp.array([2], jnp.int32), jnp.ones(1),
                 label_smoothing=1.0)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-14)


@PROB
def test_prob_golden_two_classes(fn):
  # p = [1/4, 3/4], y = [1/2, 1/2]: loss = -(log 1/4 + log 3/4) / 2, dx = p - y,
  # dy = -log p = [log 4, log 4/3].
  with jax.enable_x64(True):
    logits = jnp.array([[0.0, math.log(3.0)]], jnp.float64)
    loss, dx, dy = _prob_vjp(fn, logits, jnp.array([[0.5, 0.5]]), jnp.ones(1))
    np.testing.assert_allclose(loss, [-(math.log(0.25) + math.log(0.75)) / 2], rtol=1e-14)
    np.testing.assert_allclose(dx, [[-0.25, 0.25]], rtol=1e-14)
    np.testing.assert_allclose(dy, [[math.log(4.0), math.log(4.0 / 3.0)]], rtol=1e-14)


@PROB
def test_prob_unnormalised_labels_scale_the_softmax_term(fn):
  # dx = p * sum(y) - y: labels summing to 2 double the softmax term.
  with jax.enable_x64(True):
    logits = jnp.array([[0.0, math.log(3.0)]], jnp.float64)
    _, dx, _ = _prob_vjp(fn, logits, jnp.array([[1.5, 0.5]]), jnp.ones(1))
    np.testing.assert_allclose(dx, [[0.5 - 1.5, 1.5 - 0.5]], rtol=1e-14)


def test_one_class_gives_zero_loss():
  logits = jnp.array([[3.0], [-7.0]], jnp.float32)
  np.testing.assert_array_equal(
      softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 0], jnp.int32)), 0.0)
  np.testing.assert_array_equal(softmax_cross_entropy(logits, jnp.ones((2, 1), jnp.float32)),
                                0.0)


# --- optax as an independent reference ----------------------------------------------------------


def _random_problem(rng, shape, axis, mask):
  """Logits, int32 labels and a mask (None, example-shaped or logits-shaped)."""
  axis %= len(shape)
  examples = tuple(np.delete(shape, axis))
  logits = jnp.asarray(rng.standard_normal(shape), jnp.float64)
  labels = jnp.asarray(rng.integers(0, shape[axis], examples), jnp.int32)
  where = None
  if mask == "examples":
    where = jnp.asarray(rng.random(examples) < 0.7)
  elif mask == "classes":
    where = jnp.asarray(rng.random(shape) < 0.6)
  return logits, labels, where


OPTIONS = [
    ((4, 5), -1, None, 0.0), ((4, 5), -1, "examples", 0.0), ((4, 5), -1, "classes", 0.0),
    ((4, 5), -1, None, 0.1), ((4, 5), -1, "classes", 0.3), ((2, 3, 5), -1, "examples", 0.2),
    ((5, 4), 0, None, 0.1), ((2, 5, 3), 1, "classes", 0.0), ((2, 5, 3), -2, "examples", 0.0),
    ((5,), -1, None, 0.0), ((3, 4), -1, None, 1.0), ((6, 3), 1, "classes", 1.0),
]
OPTION_IDS = [f"{'x'.join(map(str, s))}-axis{a}-{m}-ls{ls:g}" for s, a, m, ls in OPTIONS]


@INT
@pytest.mark.parametrize("shape, axis, mask, alpha", OPTIONS, ids=OPTION_IDS)
def test_int_matches_optax(fn, shape, axis, mask, alpha):
  """Losses and gradients equal optax's: its integer-label function where it is defined (no
  smoothing; a class mask that allows the label), and in every case its
  ``softmax_cross_entropy`` of ``smooth_labels(one_hot(labels))``."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
    logits, labels, where = _random_problem(rng, shape, axis, mask)
    cot = np.asarray(rng.standard_normal(labels.shape))
    loss, grad = _int_vjp(fn, logits, labels, cot, axis=axis, where=where,
                          label_smoothing=alpha)
    assert loss.shape == labels.shape and grad.shape == logits.shape
    defined = np.ones(labels.shape, bool)
    if mask == "classes":  # optax's integer version differs on a label in a masked class
      defined = np.take_along_axis(np.asarray(where), np.expand_dims(
          np.asarray(labels), axis % len(shape)), axis=axis).squeeze(axis)
    cot_defined = np.where(defined, cot, 0.0)

    @jax.jit
    def optax_vjps(logits, labels, cot, cot_defined, where):
      """optax's losses and pullbacks (one program)."""
      one_hot = jax.nn.one_hot(labels, shape[axis], axis=axis, dtype=jnp.float64)
      class_mask = where if mask == "classes" else None
      target = optax.smooth_labels(one_hot, alpha, axis=axis, where=class_mask)
      want, pullback = jax.vjp(
          lambda x: optax.softmax_cross_entropy(x, target, axis=axis, where=where), logits)
      if alpha != 0:
        return want, pullback(cot)[0], None, None
      want_int, pullback_int = jax.vjp(lambda x: optax.softmax_cross_entropy_with_integer_labels(
          x, labels, axis=axis, where=where), logits)
      return want, pullback(cot)[0], want_int, pullback_int(cot_defined)[0]

    want, want_grad, want_int, want_int_grad = optax_vjps(logits, labels, cot, cot_defined,
                                                          where)
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-12, atol=1e-14)

    if alpha == 0:
      np.testing.assert_allclose(np.asarray(loss)[defined], np.asarray(want_int)[defined],
                                 rtol=1e-12, atol=1e-14)
      _, grad_defined = _int_vjp(fn, logits, labels, cot_defined, axis=axis, where=where,
                                 label_smoothing=alpha)
      np.testing.assert_allclose(grad_defined, want_int_grad, rtol=1e-12, atol=1e-14)


@PROB
@pytest.mark.parametrize("shape, axis, mask", [o[:3] for o in OPTIONS if o[3] == 0],
                         ids=[i for i, o in zip(OPTION_IDS, OPTIONS) if o[3] == 0])
def test_prob_matches_optax(fn, shape, axis, mask):
  """Losses and both gradients equal autodiff of ``optax.softmax_cross_entropy`` where that is
  defined: optax's label gradient is ``0 * inf = NaN`` on masked classes and examples, where
  jlayers gives 0."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
    logits, _, where = _random_problem(rng, shape, axis, mask)
    labels = jax.nn.softmax(jnp.asarray(rng.standard_normal(shape)), axis=axis)
    cot = jnp.asarray(rng.standard_normal(np.delete(shape, axis % len(shape))))
    loss, dx, dy = _prob_vjp(fn, logits, labels, cot, axis=axis, where=where)

    @jax.jit
    def optax_vjp(logits, labels, cot, where):
      want, pullback = jax.vjp(
          lambda x, y: optax.softmax_cross_entropy(x, y, axis=axis, where=where), logits, labels)
      return want, *pullback(cot)

    want, want_dx, want_dy = optax_vjp(logits, labels, cot, where)
    np.testing.assert_allclose(loss, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-14)
    counted = np.ones(shape, bool) if where is None else np.broadcast_to(
        np.asarray(where if mask == "classes" else jnp.expand_dims(where, axis)), shape)
    np.testing.assert_allclose(np.asarray(dy)[counted], np.asarray(want_dy)[counted],
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(np.asarray(dy)[~counted], 0.0)


def test_int_equals_prob_of_the_smoothed_one_hot_target():
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    logits, labels, where = _random_problem(rng, (6, 5), -1, "classes")

    @jax.jit
    def both(logits, labels, where):
      n = jnp.maximum(jnp.sum(where, axis=-1, keepdims=True), 1).astype(jnp.float64)
      target = 0.75 * jax.nn.one_hot(labels, 5, dtype=jnp.float64) + 0.25 / n
      return (softmax_cross_entropy_with_integer_labels(logits, labels, where=where,
                                                        label_smoothing=0.25),
              softmax_cross_entropy(logits, target, where=where))

    np.testing.assert_allclose(*both(logits, labels, where), rtol=1e-14)


# --- labels out of range ------------------------------------------------------------------------


@INT
@pytest.mark.parametrize("bad", [-1, 3, 1000])
def test_int_out_of_range_label_gives_nan_loss_and_nan_grad_row(fn, bad):
  logits = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], jnp.float32)
  labels = jnp.array([0, bad], jnp.int32)
  ones = np.ones(2, np.float32)
  for alpha in (0.0, 0.1):
    loss, grad = map(np.asarray, _int_vjp(fn, logits, labels, ones, label_smoothing=alpha))
    assert np.isnan(loss[1]) and np.isfinite(loss[0])
    assert np.all(np.isnan(grad[1]))
    assert np.all(np.isfinite(grad[0]))
  # Masked out, the example is ignored whatever its label (padding labels such as -1).
  loss, grad = map(np.asarray, _int_vjp(fn, logits, labels, ones, label_smoothing=0.0,
                                        where=np.array([True, False])))
  assert float(loss[1]) == 0.0
  np.testing.assert_array_equal(grad[1], 0.0)
  # Under a class mask: NaN loss, NaN on the unmasked classes, 0 on the masked one.
  classes = np.array([[True, True, True], [True, False, True]])
  loss, grad = map(np.asarray, _int_vjp(fn, logits, labels, ones, label_smoothing=0.0,
                                        where=classes))
  assert np.isnan(loss[1])
  assert np.all(np.isnan(grad[1, [0, 2]]))
  assert float(grad[1, 1]) == 0.0


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8, jnp.int16])
def test_narrow_label_dtypes_are_checked_against_the_class_count(dtype):
  # 300 classes exceed uint8/int8: every representable non-negative label is in range.
  logits = jnp.zeros((2, 300), jnp.float32)
  ok = softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 100], dtype))
  np.testing.assert_allclose(ok, [math.log(300)] * 2, rtol=1e-6)
  if jnp.iinfo(dtype).min < 0:
    bad = softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, -2], dtype))
    assert bool(jnp.isnan(bad[1])) and not bool(jnp.isnan(bad[0]))


# --- huge logits and precision ------------------------------------------------------------------


@INT
def test_int_huge_logits_are_stable(fn):
  # Row 0: the label holds the maximum by 1e4, loss 0. Row 1: lse = 1e4 + log(1 + e^-1) and the
  # label holds 1e4 - 1, so the loss is 1 + log(1 + e^-1).
  logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4 - 1.0]], jnp.float32)
  loss, grad = _int_vjp(fn, logits, jnp.array([0, 2], jnp.int32), jnp.ones(2, jnp.float32))
  np.testing.assert_allclose(loss, [0.0, 1.0 + math.log1p(math.exp(-1.0))], rtol=1e-6)
  q = 1.0 / (1.0 + math.exp(-1.0))  # softmax weight of the 1e4 entry in row 1
  np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [0.0, q, 1.0 - q - 1.0]], atol=1e-6)


@PROB
def test_prob_huge_logits_are_stable(fn):
  logits = jnp.array([[-1e4, 1e4, 1e4 - 1.0]], jnp.float32)
  labels = jnp.array([[0.0, 0.5, 0.5]], jnp.float32)
  loss, dx, dy = _prob_vjp(fn, logits, labels, jnp.ones(1, jnp.float32))
  lse_gap = math.log1p(math.exp(-1.0))  # lse - 1e4
  np.testing.assert_allclose(loss, [lse_gap + 0.5], rtol=1e-6)
  q = 1.0 / (1.0 + math.exp(-1.0))
  np.testing.assert_allclose(dx, [[0.0, q - 0.5, 1.0 - q - 0.5]], atol=1e-6)
  np.testing.assert_allclose(dy[0, 1:], [lse_gap, lse_gap + 1.0], rtol=1e-6)
  assert float(dy[0, 0]) == pytest.approx(2e4 + lse_gap, rel=1e-6)


def test_low_precision_logits_are_computed_in_float32():
  # 4096 classes: a bfloat16 sum of exponentials would lose the small terms.
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((3, 4096)), jnp.float32)
  labels = jnp.array([5, 4000, 17], jnp.int32)
  probs = jnp.asarray(rng.standard_normal((3, 4096)), jnp.float32)

  @jax.jit
  def losses(logits, labels, probs):  # one program for both dtypes
    probs = jax.nn.softmax(probs)
    out = []
    for dtype in (jnp.bfloat16, jnp.float16):
      x = logits.astype(dtype)
      out.append((softmax_cross_entropy_with_integer_labels(x, labels, label_smoothing=0.1),
                  softmax_cross_entropy_with_integer_labels_reference(
                      x.astype(jnp.float32), labels, label_smoothing=0.1),
                  softmax_cross_entropy(x, probs.astype(dtype)),
                  softmax_cross_entropy_reference(x.astype(jnp.float32),
                                                  probs.astype(dtype).astype(jnp.float32))))
    return out

  for dtype, (loss, wide, prob_loss, prob_wide) in zip((jnp.bfloat16, jnp.float16),
                                                       losses(logits, labels, probs)):
    assert loss.dtype == dtype
    np.testing.assert_allclose(np.asarray(loss, np.float32), wide, rtol=2.0**-8)
    assert prob_loss.dtype == dtype
    np.testing.assert_allclose(np.asarray(prob_loss, np.float32), prob_wide, rtol=2.0**-8)


def test_prob_computes_in_the_wider_dtype_and_casts_gradients_back():
  with jax.enable_x64(True):
    logits = jnp.array([[0.0, 1e-9, 2.0]], jnp.float32)
    labels = jnp.array([[0.2, 0.3, 0.5]], jnp.float64)
    loss, dx, dy = _prob_vjp(softmax_cross_entropy, logits, labels, jnp.ones(1, jnp.float32))
    assert (loss.dtype, dx.dtype, dy.dtype) == (jnp.float32, jnp.float32, jnp.float64)
    want = softmax_cross_entropy(logits.astype(jnp.float64), labels)
    np.testing.assert_allclose(loss, want.astype(jnp.float32), rtol=1e-7)
    np.testing.assert_allclose(dy, -jax.nn.log_softmax(logits.astype(jnp.float64)), rtol=1e-14)


# --- masks --------------------------------------------------------------------------------------


@INT
def test_int_example_mask_equals_the_valid_subset(fn):
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
  logits = logits.at[3].set(jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0]))
  labels = jnp.asarray([0, 3, 1, -1, 2, 9], jnp.int32)  # invalid labels only on masked rows
  mask = np.array([True, True, True, False, True, False])
  cot = jnp.asarray(rng.standard_normal(6), jnp.float32)
  loss, grad = _int_vjp(fn, logits, labels, cot, where=jnp.asarray(mask), label_smoothing=0.1)
  sub_loss, sub_grad = _int_vjp(fn, logits[mask], labels[mask], cot[mask], label_smoothing=0.1)
  np.testing.assert_allclose(loss[mask], sub_loss, rtol=1e-6)
  np.testing.assert_array_equal(loss[~mask], 0.0)
  np.testing.assert_allclose(grad[mask], sub_grad, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad[~mask], 0.0)


@PROB
def test_prob_example_mask_equals_the_valid_subset(fn):
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  labels = jax.nn.softmax(jnp.asarray(rng.standard_normal((5, 3)), jnp.float32))
  logits = logits.at[1].set(jnp.array([jnp.inf, jnp.nan, -jnp.inf]))
  labels = labels.at[1].set(jnp.nan)
  mask = np.array([True, False, True, True, False])
  cot = jnp.asarray(rng.standard_normal(5), jnp.float32)
  loss, dx, dy = _prob_vjp(fn, logits, labels, cot, where=jnp.asarray(mask))
  sub = _prob_vjp(fn, logits[mask], labels[mask], cot[mask])
  for got, want in zip((loss, dx, dy), sub):
    np.testing.assert_allclose(got[mask], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[~mask], 0.0)


@INT
def test_int_class_mask_equals_dropping_the_masked_classes(fn):
  rng = np.random.default_rng(6)
  allowed = np.array([True, False, True, True, False])
  logits = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
  logits = logits.at[:, 1].set(jnp.nan).at[:, 4].set(jnp.inf)  # anything in masked classes
  labels = jnp.array([0, 2, 3, 2], jnp.int32)
  cot = jnp.asarray(rng.standard_normal(4), jnp.float32)
  where = jnp.asarray(np.broadcast_to(allowed, (4, 5)))
  loss, grad = _int_vjp(fn, logits, labels, cot, where=where, label_smoothing=0.3)
  remap = jnp.array([0, -1, 1, 2, -1], jnp.int32)
  sub_loss, sub_grad = _int_vjp(fn, logits[:, allowed], remap[labels], cot,
                                label_smoothing=0.3)
  np.testing.assert_allclose(loss, sub_loss, rtol=1e-6)
  np.testing.assert_allclose(grad[:, allowed], sub_grad, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(grad[:, ~allowed], 0.0)


@PROB
def test_prob_class_mask_equals_dropping_the_masked_classes(fn):
  rng = np.random.default_rng(7)
  allowed = np.array([False, True, True, False])
  logits = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32).at[:, 0].set(-jnp.inf)
  labels = jnp.asarray(rng.random((3, 4)), jnp.float32).at[:, 3].set(jnp.nan)
  cot = jnp.asarray(rng.standard_normal(3), jnp.float32)
  where = jnp.asarray(np.broadcast_to(allowed, (3, 4)))
  loss, dx, dy = _prob_vjp(fn, logits, labels, cot, where=where)
  sub = _prob_vjp(fn, logits[:, allowed], labels[:, allowed], cot)
  np.testing.assert_allclose(loss, sub[0], rtol=1e-6)
  for got, want in zip((dx, dy), sub[1:]):
    np.testing.assert_allclose(got[:, allowed], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[:, ~allowed], 0.0)


@INT
def test_int_label_on_a_masked_class_keeps_only_the_smoothing_term(fn):
  logits = jnp.array([[1.0, 2.0, -1.0]], jnp.float32)
  labels = jnp.array([1], jnp.int32)
  where = jnp.array([[True, False, True]])
  loss, grad = _int_vjp(fn, logits, labels, jnp.ones(1, jnp.float32), where=where)
  assert float(loss[0]) == 0.0
  np.testing.assert_array_equal(grad, 0.0)
  # With smoothing: the mass alpha / 2 on each of the two allowed classes.
  loss, grad = _int_vjp(fn, logits, labels, jnp.ones(1, jnp.float32), where=where,
                        label_smoothing=0.4)
  p = np.exp([1.0, -1.0]) / np.exp([1.0, -1.0]).sum()
  np.testing.assert_allclose(loss, [-0.2 * np.log(p).sum()], rtol=1e-6)
  np.testing.assert_allclose(grad[0, [0, 2]], 0.4 * p - 0.2, rtol=1e-6, atol=1e-7)
  assert float(grad[0, 1]) == 0.0


@pytest.mark.parametrize("shape_of_mask", ["examples", "classes"])
def test_all_false_masks_give_zero_losses_and_zero_grads(shape_of_mask):
  logits = jnp.array([[3.0, -1.0, jnp.nan], [0.0, jnp.inf, 1.0]], jnp.float32)
  where = jnp.zeros((2,) if shape_of_mask == "examples" else (2, 3), bool)
  for fn in (softmax_cross_entropy_with_integer_labels,
             softmax_cross_entropy_with_integer_labels_reference):
    loss, grad = _int_vjp(fn, logits, jnp.array([0, 7], jnp.int32), jnp.ones(2, jnp.float32),
                          where=where, label_smoothing=0.1)
    np.testing.assert_array_equal(loss, 0.0)
    np.testing.assert_array_equal(grad, 0.0)
  for fn in (softmax_cross_entropy, softmax_cross_entropy_reference):
    out = _prob_vjp(fn, logits, jnp.full((2, 3), 0.5, jnp.float32), jnp.ones(2, jnp.float32),
                    where=where)
    for a in out:
      np.testing.assert_array_equal(a, 0.0)


def test_empty_batch_gives_empty_losses():
  x = jnp.zeros((0, 4), jnp.float32)
  loss, grad = _int_vjp(softmax_cross_entropy_with_integer_labels, x,
                        jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32))
  assert loss.shape == (0,) and grad.shape == (0, 4)
  loss, dx, dy = _prob_vjp(softmax_cross_entropy, x, x, jnp.zeros((0,), jnp.float32))
  assert loss.shape == (0,) and dx.shape == dy.shape == (0, 4)


# --- axis, leading shapes, accumulation ---------------------------------------------------------


def test_axis_picks_the_class_axis():
  rng = np.random.default_rng(8)
  logits = jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, (2, 3)), jnp.int32)
  where = jnp.asarray(rng.random((2, 5, 3)) < 0.7)

  @jax.jit
  def on_both_axes(logits, labels, where):
    moved = jnp.moveaxis(logits, 1, -1)
    losses = (softmax_cross_entropy_with_integer_labels(logits, labels, axis=1, where=where,
                                                        label_smoothing=0.2),
              softmax_cross_entropy_with_integer_labels(
                  moved, labels, where=jnp.moveaxis(where, 1, -1), label_smoothing=0.2))
    probs = jax.nn.softmax(logits, axis=1)
    grad_axis = jax.grad(lambda x: softmax_cross_entropy(x, probs, axis=-2).sum())(logits)
    grad_last = jax.grad(lambda x: softmax_cross_entropy(x, jnp.moveaxis(probs, 1, -1)).sum())(
        moved)
    return losses, (grad_axis, jnp.moveaxis(grad_last, -1, 1))

  losses, grads = on_both_axes(logits, labels, where)
  np.testing.assert_allclose(*losses, rtol=1e-6)
  np.testing.assert_allclose(*grads, rtol=1e-6, atol=1e-7)


def test_micro_batch_gradients_add_up_to_the_full_batch():
  # Per-example losses: sum over micro-batches then divide by the total count of valid
  # examples equals the gradient of the mean over the whole batch.
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 6, (8,)), jnp.int32)
  mask = jnp.asarray(rng.random(8) < 0.6)

  def total(x, y, w):
    return jnp.sum(softmax_cross_entropy_with_integer_labels(x, y, where=w))

  grad = jax.jit(jax.grad(total))
  count = jnp.sum(mask).astype(jnp.float32)
  full = grad(logits, labels, mask) / count
  parts = [grad(logits[i:i + 4], labels[i:i + 4], mask[i:i + 4]) / count for i in (0, 4)]
  np.testing.assert_allclose(jnp.concatenate(parts), full, rtol=1e-6, atol=1e-8)


def test_vmap_over_logits_labels_and_mask_equals_a_loop():
  rng = np.random.default_rng(10)
  logits = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, (3, 4)), jnp.int32)
  probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32))
  mask = jnp.asarray(rng.random((3, 4, 5)) < 0.7)
  cot = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
  int_fn = functools.partial(_int_vjp, softmax_cross_entropy_with_integer_labels,
                             label_smoothing=0.1)
  int_ref = functools.partial(_int_vjp, softmax_cross_entropy_with_integer_labels_reference,
                              label_smoothing=0.1)
  got_int = jax.vmap(lambda x, y, c, w: int_fn(x, y, c, where=w))(logits, labels, cot, mask)
  prob_fn = functools.partial(_prob_vjp, softmax_cross_entropy)
  got_prob = jax.vmap(lambda x, y, c, w: prob_fn(x, y, c, where=w))(logits, probs, cot, mask)
  for k in range(3):
    want = int_ref(logits[k], labels[k], cot[k], where=mask[k])
    for g, w in zip(got_int, want):
      np.testing.assert_allclose(g[k], w, rtol=1e-5, atol=1e-7)
    want = _prob_vjp(softmax_cross_entropy_reference, logits[k], probs[k], cot[k],
                     where=mask[k])
    for g, w in zip(got_prob, want):
      np.testing.assert_allclose(g[k], w, rtol=1e-5, atol=1e-7)


# --- second order, residuals, gradients of labels -----------------------------------------------


def test_hessians_match_the_closed_form():
  # Per example: d2 l / dx dx = T (diag(p) - p p^T), with T = sum of the target (1 here for
  # smoothed one-hot labels, sum(y) for probability labels); zero across examples.
  with jax.enable_x64(True):
    rng = np.random.default_rng(11)
    logits = jnp.asarray(rng.standard_normal((2, 3)), jnp.float64)
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(-1, keepdims=True)
    probs = jnp.asarray(rng.random((2, 3)))
    for f, weights in (
        (lambda x: softmax_cross_entropy_with_integer_labels(
            x, jnp.array([2, 0], jnp.int32), label_smoothing=0.3), np.ones(2)),
        (lambda x: softmax_cross_entropy(x, probs), np.asarray(probs.sum(-1)))):
      hess = jax.jit(jax.hessian(lambda x, f=f: jnp.sum(f(x))))(logits)
      expected = np.zeros((2, 3, 2, 3))
      for i in range(2):
        expected[i, :, i, :] = weights[i] * (np.diag(p[i]) - np.outer(p[i], p[i]))
      np.testing.assert_allclose(hess, expected, rtol=1e-12, atol=1e-15)


def test_prob_mixed_second_derivative_is_minus_the_log_softmax_jacobian():
  # d/dx_j (dl/dy_k) = -d log p_k / dx_j = -(delta_kj - p_j).
  with jax.enable_x64(True):
    logits = jnp.array([0.3, -1.0, 2.0], jnp.float64)
    probs = jnp.array([0.2, 0.3, 0.5], jnp.float64)
    mixed = jax.jit(jax.jacrev(jax.grad(softmax_cross_entropy, argnums=1), argnums=0))(logits,
                                                                                      probs)
    p = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum()
    np.testing.assert_allclose(mixed, -(np.eye(3) - p[None, :]), rtol=1e-12, atol=1e-15)


def _saved_floats(capsys, fn, *args):
  print_saved_residuals(fn, *args)
  lines = capsys.readouterr().out.splitlines()
  return sorted(line.split(" ")[0] for line in lines if line.startswith(("f", "bf"))), lines


@pytest.mark.parametrize("where", [None, "examples", "classes"])
def test_residuals_are_the_inputs_and_two_floats_per_example(capsys, where):
  # Saved: the bf16 logits (and the labels) themselves, the row max and log sum exp; no float
  # [N, C] buffer such as the softmax.
  logits = jnp.zeros((8, 16), jnp.bfloat16)
  mask = {None: None, "examples": jnp.ones((8,), bool), "classes": jnp.ones((8, 16), bool)}
  kwargs = {"where": mask[where]}
  labels = jnp.zeros((8,), jnp.int32)
  floats, lines = _saved_floats(capsys, lambda x: softmax_cross_entropy_with_integer_labels(
      x, labels, label_smoothing=0.1, **kwargs), logits)
  assert floats == ["bf16[8,16]", "f32[8,1]", "f32[8,1]"], lines
  assert any(line.startswith("bf16[8,16] from the argument") for line in lines), lines
  probs = jnp.zeros((8, 16), jnp.float16)
  floats, lines = _saved_floats(capsys, lambda x, y: softmax_cross_entropy(x, y, **kwargs),
                                logits, probs)
  assert floats == ["bf16[8,16]", "f16[8,16]", "f32[8,1]", "f32[8,1]"], lines
  assert any(line.startswith("f16[8,16] from the argument") for line in lines), lines


@INT
def test_int_labels_get_no_gradient(fn):
  logits = jnp.array([[0.0, 1.0]], jnp.float32)
  labels = jnp.array([1], jnp.int32)
  assert jax.jit(jax.grad(lambda x: fn(x, labels).sum()))(logits).shape == (1, 2)
  with pytest.raises(TypeError, match="grad requires real- or complex-valued inputs"):
    jax.grad(lambda x, y: fn(x, y).sum(), argnums=1)(logits, labels)


@PROB
def test_prob_labels_gradient_is_minus_log_softmax_in_their_dtype(fn):
  logits = jnp.array([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], jnp.float32)
  labels = jnp.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], jnp.bfloat16)
  dy, log_p = jax.jit(lambda y: (jax.grad(lambda y: fn(logits, y).sum())(y),
                                 jax.nn.log_softmax(logits)))(labels)
  assert dy.dtype == jnp.bfloat16
  np.testing.assert_allclose(dy.astype(jnp.float32), -log_p, rtol=2**-8)


# --- bad input ----------------------------------------------------------------------------------

_X = np.zeros((4, 3), np.float32)
_Y = np.zeros((4,), np.int32)
BAD_INT = [
    ((np.zeros((4, 3), np.int32), _Y), {}, TypeError, "logits must have a floating dtype"),
    ((np.float32(1.0), np.int32(0)), {}, ValueError, r"logits must have rank at least 1"),
    ((np.zeros((4, 0), np.float32), _Y), {}, ValueError, "logits must have at least one class"),
    ((_X, _Y.astype(np.float32)), {}, TypeError, "labels must have an integer dtype, got float32"),
    ((_X, np.zeros((4,), bool)), {}, TypeError, "labels must have an integer dtype, got bool"),
    ((_X, np.zeros((4, 1), np.int32)), {}, ValueError,
     r"labels must have shape \(4,\) \(logits.shape without the class axis\), got \(4, 1\)"),
    ((_X, _Y), {"axis": 0}, ValueError, r"labels must have shape \(3,\) .* got \(4,\)"),
    ((_X, [0, 1, 2, 0]), {}, TypeError, "labels must be an array, got list"),
    ((_X, _Y), {"where": np.ones((4,), np.int32)}, TypeError,
     "where must have dtype bool, got int32"),
    ((_X, _Y), {"where": np.ones((3,), bool)}, ValueError,
     r"where must have shape \(4,\) \(one flag per example\) or \(4, 3\) \(logits.shape, one "
     r"flag per class\), got \(3,\)"),
    ((_X, _Y), {"axis": 2}, ValueError, "axis=2 is out of range for an input of rank 2"),
    ((_X, _Y), {"axis": (1,)}, TypeError, "axis must be an int, got tuple"),
    ((_X, _Y), {"label_smoothing": 1.5}, ValueError,
     r"label_smoothing must be in \[0, 1\], got 1.5"),
    ((_X, _Y), {"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\]"),
    ((_X, _Y), {"label_smoothing": float("nan")}, ValueError, r"label_smoothing must be in"),
    ((_X, _Y), {"label_smoothing": "0.1"}, TypeError,
     r"label_smoothing must be a float in \[0, 1\], got str"),
    ((_X, _Y), {"label_smoothing": True}, TypeError, "label_smoothing must be a float"),
]
BAD_PROB = [
    ((np.zeros((4, 3), np.int32), _X), {}, TypeError, "logits must have a floating dtype"),
    ((_X, np.zeros((4, 3), np.int32)), {}, TypeError,
     "labels must have a floating dtype, got int32"),
    ((np.float32(1.0), np.float32(1.0)), {}, ValueError, "logits must have rank at least 1"),
    ((np.zeros((4, 0), np.float32), np.zeros((4, 0), np.float32)), {}, ValueError,
     "logits must have at least one class"),
    ((_X, np.zeros((4,), np.float32)), {}, ValueError,
     r"labels must have shape \(4, 3\) \(logits.shape\), got \(4,\)"),
    ((_X, _X), {"where": np.ones((4, 1), bool)}, ValueError,
     r"where must have shape \(4,\) .* got \(4, 1\)"),
    ((_X, _X), {"where": np.ones((4, 3), np.float32)}, TypeError,
     "where must have dtype bool, got float32"),
    ((_X, _X), {"axis": -3}, ValueError, "axis=-3 is out of range"),
    ((_X, _X), {"axis": 1.0}, TypeError, "axis must be an int, got float"),
    ((_X, _X.tolist()), {}, TypeError, "labels must be an array, got list"),
]
ARRAY_KWARGS = ("where",)


def _call(fn, jit, args, kwargs):
  arrays = tuple(a if isinstance(a, list) else jnp.asarray(a) for a in args)
  traced = {k: jnp.asarray(v) for k, v in kwargs.items() if k in ARRAY_KWARGS}
  static = {k: v for k, v in kwargs.items() if k not in ARRAY_KWARGS}
  call = functools.partial(fn, **static)
  if jit:
    call = jax.jit(call)
  return call(*arrays, **traced)


@INT
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("args, kwargs, error, match", BAD_INT,
                         ids=[f"bad{i}" for i in range(len(BAD_INT))])
def test_int_bad_inputs_raise(fn, jit, args, kwargs, error, match):
  with pytest.raises(error, match=f"^softmax_cross_entropy_with_integer_labels: {match}"):
    _call(fn, jit, args, kwargs)


@PROB
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("args, kwargs, error, match", BAD_PROB,
                         ids=[f"bad{i}" for i in range(len(BAD_PROB))])
def test_prob_bad_inputs_raise(fn, jit, args, kwargs, error, match):
  with pytest.raises(error, match=f"^softmax_cross_entropy: {match}"):
    _call(fn, jit, args, kwargs)
