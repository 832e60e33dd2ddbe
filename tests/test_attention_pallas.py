"""The attention forward kernel (:mod:`jlayers._attention_pallas`) in Pallas interpret mode
against the twin (the whole-score-array softmax), and lowered for the GPUs it is written for.
Kept small: interpret mode runs the kernel's program grid one program at a time in Python."""

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


@pytest.mark.parametrize("platform", ["cuda", "rocm"])
def test_forward_kernel_lowers_for_gpus_in_bfloat16(platform):
  """Triton needs power-of-two blocks: 64 × 64 blocks of 64 features, grouped heads."""
  q = jax.ShapeDtypeStruct((2, 256, 8, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16)
  fn = jax.jit(lambda q, k, v: _attention_pallas.forward(q, k, v, causal=True,
                                                         logits_soft_cap=30.0))
  text = fn.trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
  assert "triton" in text.lower()
