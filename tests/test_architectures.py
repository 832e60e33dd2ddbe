"""Each ``TransformerLM`` preset against the same architecture written a second time in plain
JAX from its published equations (``tests/arch_reference.py``, which imports nothing of
jlayers), with the weights of one random checkpoint in Hugging Face's layout loaded by
:func:`jlayers.checkpoints.params_from_hf`: float64 logits and the gradients of every
checkpoint tensor, with ``impl="manual"`` and ``impl="autodiff"``, within 1e-10 relative."""

import arch_reference as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlayers
from jlayers.checkpoints import params_from_hf

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 4}
ARCHS = {  # Llama 2 is Llama 3.1 without the frequency scaling: one case for both
    "gpt2": ("gpt2", {}),
    "llama3.1": ("llama", {"rope_scaling": LLAMA31, "rope_theta": 500000.0}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "gemma2": ("gemma2", {}),
}
T = 9  # longer than the windows (3), so that they cut


def _setup(name):
  arch, overrides = ARCHS[name]
  config = ref.config_for(arch, **overrides)
  weights = ref.random_weights(arch, config, jax.random.key(1))
  model = jlayers.TransformerLM.from_hf_config({**config, "model_type": arch}, context=T,
                                               param_dtype=jnp.float64)
  return arch, config, weights, model


def _rel(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_and_every_gradient_equal_the_plain_jax_architecture(name):
  with jax.enable_x64(True):
    arch, config, weights, model = _setup(name)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, config["vocab_size"], (2, T)), jnp.int32)
    cot = jnp.asarray(rng.standard_normal((2, T, config["vocab_size"])))

    def reference(weights):
      logits = ref.forward(arch, config, weights, ids)
      return jnp.sum(logits * cot), logits

    def ours(weights, impl):
      logits = model.apply(params_from_hf(model, weights), {}, ids, impl=impl)[0]
      return jnp.sum(logits * cot), logits

    grad = jax.value_and_grad

    @jax.jit  # one program: the reference and both implementations
    def run(weights):
      return [grad(f, has_aux=True)(weights) for f in
              (reference, lambda w: ours(w, "manual"), lambda w: ours(w, "autodiff"))]

    ((_, want), want_grads), *runs = run(weights)
    for impl, ((_, got), grads) in zip(("manual", "autodiff"), runs):
      assert _rel(got, want) <= 1e-10, impl
      worst = max((_rel(grads[k], want_grads[k]), k) for k in want_grads)
      assert worst[0] <= 1e-10, (impl, worst)


@pytest.mark.parametrize("name", ["gemma2"])  # windows, soft caps and rotary: the most at stake
def test_packed_rows_and_the_loss_without_logits(name):
  """Two documents packed in each row with segment ids and restarting positions give the
  reference's logits, and ``loss`` (``linear_cross_entropy`` on the hidden states) equals the
  cross-entropy of those logits, its gradients manual and autodiff alike."""
  with jax.enable_x64(True):
    arch, config, weights, model = _setup(name)
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, config["vocab_size"], (2, T)), jnp.int32)
    seg = jnp.asarray([[0] * 4 + [1] * 5, [0] * 7 + [1] * 2], jnp.int32)
    pos = jnp.asarray([list(range(4)) + list(range(5)), list(range(7)) + list(range(2))],
                      jnp.int32)
    params = params_from_hf(model, weights)
    targets = jnp.roll(ids, -1, axis=1)
    keep = jnp.roll(seg, -1, axis=1) == seg  # no prediction across documents

    def loss(params, impl):
      return model.loss(params, ids, targets, where=keep, positions=pos, segment_ids=seg,
                        impl=impl)

    @jax.jit  # one program
    def run(params, weights):
      want = ref.forward(arch, config, weights, ids, positions=pos, segment_ids=seg)
      got = model.apply(params, {}, ids, positions=pos, segment_ids=seg)[0]
      return want, got, [jax.value_and_grad(loss)(params, i) for i in ("manual", "autodiff")]

    want, got, ((vm, gm), (va, ga)) = run(params, weights)
    assert _rel(got, want) <= 1e-10
    logp = jax.nn.log_softmax(want, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    expected = jnp.sum(jnp.where(keep, nll, 0)) / jnp.sum(keep.astype(nll.dtype))
    for value in (vm, va):
      assert abs(float(value) - float(expected)) <= 1e-12 * abs(float(expected))
    assert max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(_rel, gm, ga))) <= 1e-10


@jax.enable_x64(True)
def test_checkpoint_errors_name_the_tensor():
  arch, config, weights, model = _setup("llama3.1")
  missing = dict(weights)
  del missing["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
    params_from_hf(model, missing)
  wrong = dict(weights, **{"model.norm.weight": np.ones(5)})
  with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' gives params\['norm', "
                                       r"'scale'\] the shape \(5,\)"):
    params_from_hf(model, wrong)
  extra = dict(weights, **{"model.layers.7.mlp.up_proj.weight": np.ones(5)})
  with pytest.raises(ValueError, match="match nothing"):
    params_from_hf(model, extra)
