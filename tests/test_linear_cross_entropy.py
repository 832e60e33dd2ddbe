"""Golden values, the published formula, agreement with ``linear`` followed by the
cross-entropy, conventions, memory and errors of ``linear_cross_entropy`` (generic checks are
in test_ops_generic.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import raises_eager_and_jit, residual_avals

import jlayers
from jlayers import _token_blocks

E = math.e
linear_cross_entropy = jlayers.linear_cross_entropy
linear_cross_entropy_reference = jlayers.reference.linear_cross_entropy


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "label_smoothing", "z_loss", "logits_soft_cap", "reduction"))
def _vjp(fn, x, w, labels, cot, where=None, **kwargs):
  """The loss and ``cot``'s pullback to ``x`` and ``w``, jitted (one compile per config)."""
  loss, pullback = jax.vjp(lambda x, w: fn(x, w, labels, where=where, **kwargs), x, w)
  return (loss, *pullback(cot))


@pytest.fixture
def small_blocks(monkeypatch):
  """A budget of 4 tokens × 11 columns (float64) per block, so 8 columns per slice of ``dw``
  for H = 5: 14 tokens run as 4 blocks, the last overlapping the third, and 11 columns as 2
  slices, overlapping too."""
  monkeypatch.setattr(_token_blocks, "BLOCK_BYTES", 4 * 11 * 8)
  assert _token_blocks.sizes(14, 5, 11, 8) == (4, 8)


# --- golden values ----------------------------------------------------------------------------


def test_golden_two_tokens_by_hand():
  # x = [[1, 0], [0, 2]], w = [[1, 0, 0], [0, 1, 0]]: logits s1 = [1, 0, 0], s2 = [0, 2, 0].
  # Token 1, label 0: p1 = [e, 1, 1] / (e + 2), loss log(e + 2) - 1.
  # Token 2, label 1: p2 = [1, e², 1] / (e² + 2), loss log(e² + 2) - 2.
  # dlogits = g (p - onehot); dx = dlogits wᵀ (the first two columns); dw = xᵀ dlogits.
  with jax.enable_x64(True):
    x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    w = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = jnp.array([0, 1], jnp.int32)
    p1 = np.array([E, 1, 1]) / (E + 2)
    p2 = np.array([1, E**2, 1]) / (E**2 + 2)
    d1, d2 = p1 - [1, 0, 0], p2 - [0, 1, 0]
    g = jnp.array([1.0, 0.5])
    loss, dx, dw = _vjp(linear_cross_entropy, x, w, labels, g)
    np.testing.assert_allclose(loss, [math.log(E + 2) - 1, math.log(E**2 + 2) - 2], rtol=1e-14)
    np.testing.assert_allclose(dx, [d1[:2], 0.5 * d2[:2]], rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(dw, [d1, 2 * 0.5 * d2], rtol=1e-14, atol=1e-16)
    # "mean": (0.90483 + 0.23954) / 2 and half of each token's gradient (cotangent 1).
    loss, dx, dw = _vjp(linear_cross_entropy, x, w, labels, jnp.array(1.0), reduction="mean")
    np.testing.assert_allclose(loss, (math.log(E + 2) - 1 + math.log(E**2 + 2) - 2) / 2,
                               rtol=1e-14)
    np.testing.assert_allclose(dw, [d1 / 2, 2 * d2 / 2], rtol=1e-14, atol=1e-16)


def test_golden_options_by_hand():
  with jax.enable_x64(True):
    # Zero logits over V = 4, label 3: λ = log 4; α = 0.2 leaves log 4; ζ = 0.1 adds
    # 0.1 (log 4)². dlogits = (1 + 2ζλ) p - (1 - α) e_3 - α/4 with p = 1/4, dx = dlogits wᵀ.
    x, w = jnp.array([[1.0]]), jnp.zeros((1, 4))
    lam = math.log(4.0)
    loss, dx, dw = _vjp(linear_cross_entropy, x, w, jnp.array([3], jnp.int32), jnp.ones(1),
                        label_smoothing=0.2, z_loss=0.1)
    np.testing.assert_allclose(loss, [lam + 0.1 * lam**2], rtol=1e-14)
    d = (1 + 0.2 * lam) / 4 - 0.8 * np.eye(4)[3] - 0.05
    np.testing.assert_allclose(dw, [d], rtol=1e-14)
    np.testing.assert_allclose(dx, [[0.0]], atol=1e-16)
    # Soft cap κ = 1 on s = [2, 0]: c = [tanh 2, 0], label 0:
    # loss = log(e^{tanh 2} + 1) - tanh 2; dlogits = (p - e_0)(1 - tanh²(s)).
    x, w = jnp.array([[2.0]]), jnp.array([[1.0, 0.0]])
    t = math.tanh(2.0)
    loss, dx, dw = _vjp(linear_cross_entropy, x, w, jnp.array([0], jnp.int32), jnp.ones(1),
                        logits_soft_cap=1.0)
    np.testing.assert_allclose(loss, [math.log(math.exp(t) + 1) - t], rtol=1e-14)
    p0 = math.exp(t) / (math.exp(t) + 1)
    ds = np.array([(p0 - 1) * (1 - t * t), 1 - p0])
    np.testing.assert_allclose(dw, [2 * ds], rtol=1e-14)
    np.testing.assert_allclose(dx, [[ds[0]]], rtol=1e-14)


# --- the published formula and the composition ------------------------------------------------


def _numpy_loss(x, w, labels, where, alpha, z, cap):
  """Per-token loss from the formula, NumPy float64: log-softmax of the (capped) logits."""
  s = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  c = s if cap is None else cap * np.tanh(s / cap)
  m = c.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(c - m).sum(-1, keepdims=True)))[..., 0]
  log_p = c - lse[..., None]
  v = c.shape[-1]
  target = (1 - alpha) * np.eye(v)[np.asarray(labels)] + alpha / v
  loss = -(target * log_p).sum(-1) + z * lse**2
  return loss if where is None else np.where(where, loss, 0.0)


_ALL = {"label_smoothing": 0.1, "z_loss": 0.02, "logits_soft_cap": 3.0}
CONFIGS = [({}, "none", False), ({}, "mean", True), ({}, "sum", False),
           ({"label_smoothing": 0.3}, "none", True), ({"z_loss": 0.05}, "mean", False),
           ({"logits_soft_cap": 1.5}, "sum", True), (_ALL, "none", True), (_ALL, "mean", True)]
"""(options, reduction, with where): each option alone and all together, each reduction."""


def test_accelerators_take_their_own_block_size(small_blocks, monkeypatch):
  """With 4 tokens per block on a CPU and 16 on accelerators, 14 tokens run as 4 blocks here
  and as one where the accelerators' sizes are forced (``formulation("native")``): the same
  loss and gradients (float64); lowered for ``cuda``, blocks of 14 unless the CPU's are
  forced."""
  monkeypatch.setattr(_token_blocks, "ACCELERATOR_BLOCK_BYTES", 16 * 11 * 8)
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x, w = jnp.asarray(rng.standard_normal((14, 5))), jnp.asarray(rng.standard_normal((5, 11)))
    labels = jnp.asarray(rng.integers(0, 11, 14), jnp.int32)
    runs = {}
    for form in ("auto", "cpu", "native"):

      def fn(x, w):  # a fresh function: traced under this formulation
        loss, pullback = jax.vjp(lambda x, w: linear_cross_entropy(x, w, labels), x, w)
        return (loss, *pullback(jnp.ones_like(loss)))

      with jlayers.formulation(form):
        runs[form] = jax.jit(fn)(x, w)
        text = jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
      block = "<4x11xf64>" if form == "cpu" else "<14x11xf64>"  # a block's logits
      assert block in text and ("<4x11xf64>" in text) == (form == "cpu"), form
    want = _vjp(linear_cross_entropy_reference, x, w, labels, jnp.ones((14,)))
    for form, got in runs.items():
      for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, err_msg=form)


def test_formula_and_composition_over_many_blocks(small_blocks):
  """Each option, with and without ``where``, each reduction, over many blocks: the loss
  equals the NumPy formula, and loss and gradients equal ``softmax_cross_entropy_with_integer_
  labels(linear(x, w), ...)`` (+ ζ logsumexp² and on soft-capped logits), all in one jit."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.standard_normal((2, 7, 5)))
    w = jnp.asarray(rng.standard_normal((5, 11)))
    labels = jnp.asarray(rng.integers(0, 11, (2, 7)), jnp.int32)
    where = jnp.asarray(rng.random((2, 7)) < 0.6)
    cot = jnp.asarray(rng.standard_normal((2, 7)))
    configs = [(dict(o, reduction=r), where if m else None) for o, r, m in CONFIGS]

    def composed(x, w, where, label_smoothing=0.0, z_loss=0.0, logits_soft_cap=None,
                 reduction="none"):
      s = jlayers.linear(x, w)
      if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
      loss = jlayers.softmax_cross_entropy_with_integer_labels(
          s, labels, where=where, label_smoothing=label_smoothing)
      z = z_loss * jax.nn.logsumexp(s, axis=-1) ** 2
      loss = loss + (z if where is None else jnp.where(where, z, 0.0))
      count = loss.size if where is None else jnp.maximum(jnp.sum(where), 1).astype(loss.dtype)
      return {"none": loss, "sum": jnp.sum(loss), "mean": jnp.sum(loss) / count}[reduction]

    def both(x, w, where):
      out = []
      for kwargs, mask in configs:
        mask = None if mask is None else where
        c = cot if kwargs["reduction"] == "none" else cot[0, 0]
        for fn in (lambda x, w, k=kwargs, m=mask: linear_cross_entropy(x, w, labels, where=m,
                                                                      **k),
                   lambda x, w, k=kwargs, m=mask: composed(x, w, m, **k)):
          loss, pullback = jax.vjp(fn, x, w)
          out.append((loss, *pullback(c)))
      return out

    results = jax.jit(both)(x, w, where)
  for i, (kwargs, mask) in enumerate(configs):
    manual, composition = results[2 * i], results[2 * i + 1]
    per_token = _numpy_loss(x, w, labels, mask, kwargs.get("label_smoothing", 0.0),
                            kwargs.get("z_loss", 0.0), kwargs.get("logits_soft_cap"))
    count = per_token.size if mask is None else max(int(np.sum(mask)), 1)
    want = {"none": per_token, "sum": per_token.sum(), "mean": per_token.sum() / count}
    np.testing.assert_allclose(manual[0], want[kwargs["reduction"]], rtol=1e-12,
                               err_msg=str(kwargs))
    for got, ref in zip(manual, composition):
      np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-13, err_msg=str(kwargs))


def test_out_of_range_labels_dropped_tokens_and_empty_means():
  """A counted label outside [0, V) gives a NaN loss, a NaN row of dx and NaN dw, exactly where
  the composition does; a dropped token (label -1) counts for nothing; the mean over no kept
  token is 0 with zero gradients."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)

  @jax.jit
  def run(labels, where):
    out = []
    for red in ("none", "mean"):
      c = jnp.ones((4,)) if red == "none" else jnp.array(1.0)
      out.append(_vjp.__wrapped__(linear_cross_entropy, x, w, labels, c, where=where,
                                  reduction=red))
    composed = lambda x, w: jlayers.softmax_cross_entropy_with_integer_labels(
        jlayers.linear(x, w), labels, where=where)
    loss, pullback = jax.vjp(composed, x, w)
    return out, (loss, *pullback(jnp.ones((4,))))

  keep = jnp.array([True, True, False, True])
  (none, mean), composed = run(jnp.array([0, 5, -1, 2], jnp.int32), keep)
  assert np.isnan(none[0]).tolist() == [False, True, False, False]
  assert np.isnan(none[1]).any(axis=1).tolist() == [False, True, False, False]
  assert np.isnan(none[2]).all() and np.isnan(mean[0]) and np.isnan(mean[2]).all()
  for got, ref in zip(none, composed):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(ref), rtol=1e-5, atol=1e-6)
  (none, mean), _ = run(jnp.array([0, 1, -1, 2], jnp.int32), keep)
  assert none[0][2] == 0 and not np.any(none[1][2]) and np.isfinite(mean[0])
  np.testing.assert_allclose(mean[0], (none[0][0] + none[0][1] + none[0][3]) / 3, rtol=1e-6)
  (none, mean), _ = run(jnp.array([9, -3, 7, 2], jnp.int32), jnp.zeros((4,), bool))
  for a in (*none, *mean):
    np.testing.assert_array_equal(a, 0.0)


def test_bfloat16_x_with_float32_w():
  """bfloat16 x, float32 w: loss and dx in bfloat16, dw in float32, within bfloat16 rounding
  of the float64 formula (logits and the softmax are float32 inside)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((6, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((8, 10)) / 3, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, (6,)), jnp.int32)
  loss, dx, dw = _vjp(linear_cross_entropy, x, w, labels, jnp.ones((6,), jnp.bfloat16),
                      z_loss=0.01)
  assert (loss.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
  xs, ws = np.asarray(x, np.float64), np.asarray(w.astype(jnp.bfloat16), np.float64)
  want = _numpy_loss(xs, ws, labels, None, 0.0, 0.01, None)
  np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=2**-7)
  c = xs @ ws
  p = np.exp(c - c.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  lse = np.log(np.exp(c).sum(-1, keepdims=True))
  d = (1 + 0.02 * lse) * p - np.eye(10)[np.asarray(labels)]
  eps = 2 * 2.0**-8
  assert np.abs(np.asarray(dw) - xs.T @ d).max() <= eps * np.abs(xs.T @ d).max()
  assert np.abs(np.asarray(dx, np.float64) - d @ ws.T).max() <= eps * np.abs(d @ ws.T).max()


# --- memory -----------------------------------------------------------------------------------


def test_no_tokens_by_vocabulary_array_is_saved_or_alive(monkeypatch):
  """Residuals: x, w, labels, where and one float32 log-sum-exp per token (``"none"``); dx
  and dw (``"mean"``). The compiled value-and-gradient holds a few blocks, not the logits."""
  n, h, v = 2048, 8, 2048
  x, w = jnp.zeros((n, h)), jnp.zeros((h, v))
  labels, keep = jnp.zeros((n,), jnp.int32), jnp.ones((n,), bool)
  shapes = {red: sorted(f"{a.dtype}{list(a.shape)}" for a in residual_avals(
      lambda x, w, r=red: linear_cross_entropy(x, w, labels, where=keep, reduction=r), x, w))
      for red in ("none", "mean")}
  assert shapes["none"] == sorted(["float32[2048, 8]", "float32[8, 2048]", "int32[2048]",
                                   "bool[2048]", "float32[2048]"]), shapes
  assert shapes["mean"] == ["float32[2048, 8]", "float32[8, 2048]"], shapes
  monkeypatch.setattr(_token_blocks, "BLOCK_BYTES", 2**18)  # 32 tokens of 2048 float32 logits

  def temp(fn, red):
    def value_and_grad(x, w):
      loss, pullback = jax.vjp(lambda x, w: fn(x, w, labels, reduction=red), x, w)
      return loss, pullback(jnp.ones_like(loss))
    return jax.jit(value_and_grad).lower(x, w).compile().memory_analysis().temp_size_in_bytes

  logits = n * v * 4  # 16 MiB
  assert temp(linear_cross_entropy_reference, "none") >= logits
  for red in ("none", "mean"):
    assert temp(linear_cross_entropy, red) < logits / 16, red


def test_plain_forward_under_jit_forms_no_gradient():
  """Without differentiation only the forward loop runs: one matrix product (the logits); the
  gradient in the forward pass appears only under differentiation (three products)."""
  x, w, labels = jnp.ones((4, 3)), jnp.ones((3, 5)), jnp.zeros((4,), jnp.int32)
  plain = str(jax.make_jaxpr(lambda x, w: linear_cross_entropy(x, w, labels, reduction="mean"))(
      x, w))
  grad = str(jax.make_jaxpr(jax.grad(lambda x, w: linear_cross_entropy(
      x, w, labels, reduction="mean"), argnums=(0, 1)))(x, w))
  assert plain.count("dot_general") == 1 and grad.count("dot_general") == 3


# --- bad input --------------------------------------------------------------------------------

_X, _W, _Y = np.zeros((4, 3), np.float32), np.zeros((3, 5), np.float32), np.zeros(4, np.int32)
BAD = [
    ((np.float32(1.0), _W, np.int32(0)), {}, ValueError,
     r"x must have rank at least 1 \(\.\.\., H\)"),
    ((_X, np.zeros((3,), np.float32), _Y), {}, ValueError, r"w must have rank 2 \(H, V\)"),
    ((_X, np.zeros((3, 5, 1), np.float32), _Y), {}, ValueError, "w must have rank 2"),
    ((_X, np.zeros((2, 5), np.float32), _Y), {}, ValueError,
     r"x's last dimension \(H\) must equal w's first, got x \(4, 3\) and w \(2, 5\)"),
    ((_X, np.zeros((3, 0), np.float32), _Y), {}, ValueError, "w must have at least one column"),
    ((_X, _W, np.zeros(3, np.int32)), {}, ValueError,
     r"labels must have shape \(4,\) \(x.shape\[:-1\]\), got \(3,\)"),
    ((_X, _W, _Y.astype(np.float32)), {}, TypeError, "labels must have an integer dtype"),
    ((_X.astype(np.int32), _W, _Y), {}, TypeError, "x must have a floating dtype"),
    ((_X, _W, _Y), {"reduction": "avg"}, ValueError,
     r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'"),
    ((_X, _W, _Y), {"logits_soft_cap": 0.0}, ValueError, "logits_soft_cap must be a positive"),
    ((_X, _W, _Y), {"logits_soft_cap": -30.0}, ValueError, "logits_soft_cap must be a positive"),
    ((_X, _W, _Y), {"where": np.ones((4, 5), bool)}, ValueError, r"where must have shape \(4,\)"),
    ((_X, _W, _Y), {"where": np.ones((4,), np.int32)}, TypeError,
     "where must have dtype bool, got int32"),
    ((_X, _W, _Y), {"z_loss": -1e-4}, ValueError, r"z_loss must be in \[0, inf\]"),
    ((_X, _W, _Y), {"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
]


@pytest.mark.parametrize("fn", [linear_cross_entropy, linear_cross_entropy_reference],
                         ids=["manual", "reference"])
@pytest.mark.parametrize("args, kwargs, error, match", BAD,
                         ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs_raise_eagerly_and_under_jit(fn, args, kwargs, error, match):
  raises_eager_and_jit(error, f"^linear_cross_entropy: {match}",
                       lambda *a: fn(*a, **kwargs), *args)
