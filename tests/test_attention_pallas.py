"""The attention kernels (:mod:`jlayers._attention_pallas`) in Pallas interpret mode against
the twin (the whole-score-array softmax) and its autodiff, and lowered for the GPUs they are
written for. Kept small: interpret mode runs a kernel's program grid one program at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlayers import _attention_pallas, reference

CASES = {  # (B, T, N, S, K, H), options
    "gqa-causal-odd": ((2, 37, 4, 37, 2, 8), {"causal": True}),
    "cross-softcap-lengths": ((2, 20, 2, 50, 1, 8),
                              {"logits_soft_cap": 2.0, "key_value_seq_lengths": [33, 50]}),
    "causal-two-blocks-empty-row": ((2, 70, 2, 70, 2, 8),
                                    {"causal": True, "key_value_seq_lengths": [70, 0]}),
    "scale-mha": ((1, 16, 2, 24, 2, 16), {"scale": 0.3}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_kernel_equals_the_twin_in_float64(name):
  """Output and log-sum-exp (``-inf`` where a row sees no key) against the twin: float64
  within 1e-12 relative. Rows of a batch row with no valid key are zeros, as the op's."""
  (b, t, n, s, k, h), options = CASES[name]
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    q, kk, v = (jnp.asarray(rng.standard_normal(shape)) for shape in
                ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
    if "key_value_seq_lengths" in options:
      options = {**options, "key_value_seq_lengths": jnp.asarray(options[
          "key_value_seq_lengths"], jnp.int32)}
    out, lse = _attention_pallas.forward(q, kk, v, interpret=True, **options)
    want, want_lse = reference.dot_product_attention(q, kk, v, return_residual=True, **options)
    assert out.dtype == jnp.float64 and lse.dtype == jnp.float64
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    assert float(jnp.max(jnp.abs(out - want))) <= 1e-12 * scale
    lse = lse.transpose(0, 2, 1)
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(want_lse)))
    finite = jnp.isfinite(want_lse)
    assert float(jnp.max(jnp.abs(jnp.where(finite, lse - want_lse, 0.0)))) <= 1e-12 * float(
        jnp.max(jnp.abs(jnp.where(finite, want_lse, 0.0))))


def _inputs(name, seed=0):
  (b, t, n, s, k, h), options = CASES[name]
  rng = np.random.default_rng(seed)
  arrays = [jnp.asarray(rng.standard_normal(shape)) for shape in
            ((b, t, n, h), (b, s, k, h), (b, s, k, h), (b, t, n, h))]
  if "key_value_seq_lengths" in options:
    options = {**options, "key_value_seq_lengths": jnp.asarray(options["key_value_seq_lengths"],
                                                               jnp.int32)}
  return arrays, options


@pytest.mark.parametrize("name", list(CASES))
def test_backward_kernels_equal_autodiff_of_the_twin_in_float64(name):
  """dQ, dK, dV from the forward's output and log-sum-exp against ``jax.vjp`` of the twin:
  float64 within 1e-12 relative (grouped heads sum their keys' gradients; a row that sees no
  key contributes nothing)."""
  with jax.enable_x64(True):
    (q, k, v, d_out), options = _inputs(name)
    out, lse = _attention_pallas.forward(q, k, v, interpret=True, **options)
    got = _attention_pallas.backward(q, k, v, out, lse, d_out, interpret=True, **options)
    _, pullback = jax.vjp(lambda q, k, v: reference.dot_product_attention(q, k, v, **options),
                          q, k, v)
    for name_, a, want in zip(("dq", "dk", "dv"), got, pullback(d_out)):
      assert a.shape == want.shape and a.dtype == jnp.float64, name_
      assert float(jnp.max(jnp.abs(a - want))) <= 1e-12 * float(jnp.max(jnp.abs(want))), name_


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_backward_kernels_lower_for_gpus_in_bfloat16(platform):
  q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((2, 8, 256), jnp.float32)
  fn = jax.jit(lambda q, k, v, o, lse, d: _attention_pallas.backward(
      q, k, v, o, lse, d, causal=True, logits_soft_cap=30.0))
  text = fn.trace(q, k, k, q, lse, q).lower(lowering_platforms=(platform,)).as_text()
  assert text.lower().count("triton") >= 2  # the dK/dV kernel and the dQ kernel


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_forward_kernel_lowers_for_gpus_in_bfloat16(platform):
  """Triton needs power-of-two blocks: 64 × 64 blocks of 64 features, grouped heads."""
  q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: _attention_pallas.forward(q, k, v, causal=True,
                                                         logits_soft_cap=30.0))
  text = fn.trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
  assert "triton" in text.lower()
