"""The second implementation of the five architectures (tests/arch_reference.py) behaves as
their papers and HF's code say: shapes, causality, sliding windows, packed segments, Llama 3.1
rope scaling and Gemma 2's soft-cap."""

import math

import arch_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ARCHS = pytest.mark.parametrize("arch", ref.ARCHS)
IDS = np.array([[1, 7, 3, 3, 9, 0, 4], [5, 2, 8, 10, 6, 1, 2]])


def _model(arch, **overrides):
  config = ref.config_for(arch, **overrides)
  return config, ref.random_weights(arch, config, jax.random.key(0))


def _logits(arch, config, weights, ids, **kwargs):
  return np.asarray(ref.forward(arch, config, weights, jnp.asarray(ids), **kwargs))


def _changed(ids, row, col, new):
  out = ids.copy()
  out[row, col] = new
  return out


@ARCHS
def test_names_shapes_and_dtypes(arch):
  with jax.enable_x64(True):
    config, weights = _model(arch)
    names = ref.tensor_names(arch, config)
    assert {k: v.shape for k, v in weights.items()} == names
    assert all(v.dtype == jnp.float64 for v in weights.values())
    logits = ref.forward(arch, config, weights, jnp.asarray(IDS))
    assert logits.shape == (2, 7, 11) and logits.dtype == jnp.float64
    assert np.isfinite(np.asarray(logits)).all()
  tied = "lm_head.weight" not in names
  assert tied == (arch in ("gpt2", "gemma2"))
  if arch == "qwen2":  # q/k/v biases, no output bias
    assert "model.layers.0.self_attn.k_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
  if arch == "gemma2":  # head_dim is not hidden / heads
    assert names["model.layers.0.self_attn.q_proj.weight"] == (24, 16)
    assert names["model.layers.1.pre_feedforward_layernorm.weight"] == (16,)
  if arch == "gpt2":  # Conv1D [in, out]
    assert names["transformer.h.1.attn.c_attn.weight"] == (16, 48)
    assert names["transformer.h.1.mlp.c_proj.weight"] == (64, 16)


def test_llama_biases_appear_with_their_flags_and_change_the_logits():
  with jax.enable_x64(True):
    config, weights = _model("llama", attention_bias=True, mlp_bias=True)
    names = ref.tensor_names("llama", config)
    for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
      assert f"model.layers.1.{proj}.bias" in names
    base = _logits("llama", config, weights, IDS)
    weights["model.layers.0.self_attn.o_proj.bias"] = weights[
      "model.layers.0.self_attn.o_proj.bias"] + 1.0
    assert np.abs(_logits("llama", config, weights, IDS) - base).max() > 1e-3


@ARCHS
def test_causal_a_later_token_leaves_earlier_logits_unchanged(arch):
  with jax.enable_x64(True):
    config, weights = _model(arch)
    base = _logits(arch, config, weights, IDS)
    for col in (3, 6):
      other = _logits(arch, config, weights, _changed(IDS, 0, col, 10 - IDS[0, col]))
      np.testing.assert_array_equal(other[:, :col], base[:, :col])
      assert np.abs(other[0, col] - base[0, col]).max() > 1e-6
      np.testing.assert_array_equal(other[1], base[1])


def _influence(arch, config, weights, query, key):
  """Largest change of row 0's logits at ``query`` when the token at ``key`` changes."""
  base = _logits(arch, config, weights, IDS)
  other = _logits(arch, config, weights, _changed(IDS, 0, key, 10 - IDS[0, key]))
  return np.abs(other[0, query] - base[0, query]).max()


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_one_sliding_layer_sees_exactly_the_last_window_positions(arch):
  # HF's convention: query i reads keys i - W < j <= i, so W = 3 keys, itself included.
  with jax.enable_x64(True):
    config, weights = _model(arch, num_hidden_layers=1)  # Gemma 2's layer 0 is local
    assert ref.attention_windows(arch, config) == (3,)
    assert _influence(arch, config, weights, 6, 3) == 0.0  # i - W: outside
    assert _influence(arch, config, weights, 6, 4) > 1e-6  # i - W + 1: inside
    assert _influence(arch, config, weights, 6, 6) > 1e-6


def test_mistral_receptive_field_grows_by_window_minus_one_per_layer():
  # Two local layers: 6 reads 4..6, each of which read 2..6, so 2 matters and 1 does not.
  with jax.enable_x64(True):
    config, weights = _model("mistral", num_hidden_layers=2)
    assert _influence("mistral", config, weights, 6, 1) == 0.0
    assert _influence("mistral", config, weights, 6, 2) > 1e-6


def test_gemma2_even_layers_are_local_odd_layers_global():
  with jax.enable_x64(True):
    config, weights = _model("gemma2", num_hidden_layers=2)
    assert ref.attention_windows("gemma2", config) == (3, None)
    assert _influence("gemma2", config, weights, 6, 0) > 1e-6  # layer 1 reads the whole row
    config = ref.config_for("gemma2", num_hidden_layers=1, layer_types=["full_attention"])
    assert ref.attention_windows("gemma2", config) == (None,)
    assert _influence("gemma2", config, weights, 6, 0) > 1e-6


def test_qwen2_and_llama_windows_follow_their_configs():
  assert ref.attention_windows("qwen2", ref.config_for("qwen2")) == (None, None)
  config = ref.config_for("qwen2", use_sliding_window=True, max_window_layers=1)
  assert ref.attention_windows("qwen2", config) == (None, 3)
  assert ref.attention_windows("llama", ref.config_for("llama", sliding_window=3)) == (None,) * 2


@ARCHS
def test_packed_segments_equal_separate_rows(arch):
  # Row 0 packs segment A = ids[0, :3] and segment B = ids[0, 3:] with positions restarting.
  # B's logits equal those of B at the start of a row (positions 0..3; what follows it cannot
  # matter, by causality), and A's tokens have no influence on them.
  segments = np.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
  positions = np.array([[0, 1, 2, 0, 1, 2, 3]] * 2)
  alone = np.concatenate([IDS[:, 3:], IDS[:, :3]], axis=1)
  with jax.enable_x64(True):
    config, weights = _model(arch)
    packed = _logits(arch, config, weights, IDS, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(packed[:, 3:], _logits(arch, config, weights, alone)[:, :4],
                               rtol=0, atol=1e-12)
    np.testing.assert_array_equal(packed[:, :3], _logits(arch, config, weights, IDS)[:, :3])
    other = _logits(arch, config, weights, _changed(IDS, 0, 1, 10 - IDS[0, 1]),
                    positions=positions, segment_ids=segments)
    np.testing.assert_array_equal(other[0, 3:], packed[0, 3:])
    assert np.abs(other[0, 1] - packed[0, 1]).max() > 1e-6


def test_llama3_rope_scaling_frequencies_by_hand():
  # d = 8, theta = 10^4: omega = 10^{-m}, wavelengths 2 pi 10^m = 6.28, 62.8, 628, 6283.
  # C = 1024, low = 1, high = 8: high-frequency edge C/8 = 128, low-frequency edge 1024.
  # m = 0, 1 below 128: kept; m = 3 above 1024: divided by f = 8; m = 2 in between:
  # sigma = (1024 / (200 pi) - 1) / 7 = 0.0899638..., omega' = 0.01 ((1 - sigma) / 8 + sigma).
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 8.0, "original_max_position_embeddings": 1024}
  config = ref.config_for("llama", hidden_size=16, num_attention_heads=2, head_dim=8,
                          rope_scaling=scaling)
  sigma = (1024 / (200 * math.pi) - 1) / 7
  assert abs(sigma - 0.0899638) < 1e-7
  expected = [1.0, 0.1, 0.01 * ((1 - sigma) / 8 + sigma), 0.001 / 8]
  with jax.enable_x64(True):
    np.testing.assert_allclose(ref.rope_inv_frequencies(config), expected, rtol=1e-13)
    np.testing.assert_allclose(ref.rope_inv_frequencies(ref.config_for("llama", head_dim=8)),
                               [1.0, 0.1, 0.01, 0.001], rtol=1e-13)
    # newer HF configs: rope_parameters holds theta and the type together
    newer = ref.config_for("llama", head_dim=8, rope_theta=None, rope_scaling=None,
                           rope_parameters={**scaling, "rope_theta": 10000.0})
    np.testing.assert_allclose(ref.rope_inv_frequencies(newer), expected, rtol=1e-13)
    # the scaled frequencies reach the logits (positions far enough for 0.001 vs 0.000125)
    config = ref.config_for("llama",
                            rope_scaling={**scaling, "original_max_position_embeddings": 8})
    weights = ref.random_weights("llama", config, jax.random.key(0))
    far = np.array([[0, 200, 400, 600, 800, 1000, 1200]] * 2)
    scaled = _logits("llama", config, weights, IDS, positions=far)
    plain = _logits("llama", ref.config_for("llama"), weights, IDS, positions=far)
    assert np.abs(scaled - plain).max() > 1e-6


def test_gemma2_final_softcap_bounds_the_logits():
  with jax.enable_x64(True):
    config, weights = _model("gemma2")
    weights["model.embed_tokens.weight"] = 40 * weights["model.embed_tokens.weight"]
    capped = _logits("gemma2", config, weights, IDS)
    raw = _logits("gemma2", ref.config_for("gemma2", final_logit_softcapping=None), weights, IDS)
  assert np.abs(raw).max() > 10 * 3.0  # far beyond the cap: tanh saturates
  assert 2.9 < np.abs(capped).max() <= 3.0
  np.testing.assert_allclose(capped, 3.0 * np.tanh(raw / 3.0), rtol=1e-13, atol=1e-13)


def test_bad_arguments():
  config = ref.config_for("llama")
  with pytest.raises(ValueError, match="arch must be one of"):
    ref.config_for("gpt3")
  with pytest.raises(ValueError, match=r"ids must be int\[B, T\]"):
    ref.forward("llama", config, {}, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="positions must have the shape of ids"):
    ref.forward("llama", config, {}, jnp.zeros((1, 3), jnp.int32), positions=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="rope_type must be"):
    ref.rope_inv_frequencies(ref.config_for("llama", rope_scaling={"rope_type": "yarn"}),
                             jnp.float32)
