"""``jlayers.checkpoints.load_hf`` on checkpoint directories written here in the layout that
``transformers``' ``save_pretrained`` gives them (``config.json``, ``model.safetensors`` or
shards and ``model.safetensors.index.json``), with the tensors of ``tests/arch_reference.py``:
the params equal ``params_from_hf`` of the same tensors, and the loaded model's float32 logits
equal the plain-JAX reference's."""

import json
import sys

import arch_reference as ref
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jlayers.checkpoints import load_hf, params_from_hf

safetensors_numpy = pytest.importorskip("safetensors.numpy")

# transformers' config.json: the model type and the class that saved it.
_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gemma2": "Gemma2ForCausalLM"}
T = 9  # longer than the windows (3), shorter than GPT-2's 16 positions


def _checkpoint(arch, dtype=np.float32):
  """``(config, tensors)``: the reference's tiny config and random tensors, as NumPy."""
  config = ref.config_for(arch)
  weights = ref.random_weights(arch, config, jax.random.key(2), dtype=jnp.float32)
  return config, {k: np.asarray(v).astype(dtype) for k, v in weights.items()}


def _save(root, arch, config, tensors, shards=1):
  """Writes ``root`` as ``save_pretrained`` does; ``shards > 1``: that many files and an
  index."""
  root.mkdir(parents=True, exist_ok=True)
  dtype = next(iter(tensors.values())).dtype
  config = {**config, "model_type": arch, "architectures": [_CLASSES[arch]],
            "torch_dtype": "bfloat16" if dtype == ml_dtypes.bfloat16 else "float32"}
  (root / "config.json").write_text(json.dumps(config, indent=2))
  if shards == 1:
    safetensors_numpy.save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    return root
  names = list(tensors)
  weight_map = {}
  for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    safetensors_numpy.save_file({names[j]: tensors[names[j]] for j in part}, root / file,
                                metadata={"format": "pt"})
    weight_map.update({names[j]: file for j in part})
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
           "weight_map": weight_map}
  (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return root


def _assert_equal_trees(got, want):
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("arch", ref.ARCHS)
def test_load_gives_the_params_and_the_logits_of_the_reference(arch, tmp_path):
  config, tensors = _checkpoint(arch)
  model, params = load_hf(_save(tmp_path, arch, config, tensors), context=T)
  assert model.context == T and model.param_dtype == jnp.float32
  _assert_equal_trees(params, params_from_hf(model, tensors))
  ids = jnp.asarray(np.random.default_rng(0).integers(0, config["vocab_size"], (2, T)),
                    jnp.int32)

  @jax.jit  # one program: the reference and the loaded model
  def run(params, weights):
    return ref.forward(arch, config, weights, ids), model.apply(params, {}, ids)[0]

  want, got = run(params, tensors)
  assert got.dtype == want.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])  # the fused qkv; the tied head
def test_sharded_checkpoint_equals_the_single_file(arch, tmp_path):
  config, tensors = _checkpoint(arch)
  _, single = load_hf(_save(tmp_path / "single", arch, config, tensors), context=T)
  root = _save(tmp_path / "sharded", arch, config, tensors, shards=2)
  assert len(list(root.glob("*.safetensors"))) == 2
  _, sharded = load_hf(root, context=T)
  _assert_equal_trees(sharded, single)


def test_bfloat16_checkpoint_round_trips_exactly(tmp_path):
  config, tensors = _checkpoint("qwen2", ml_dtypes.bfloat16)  # biases too
  root = _save(tmp_path, "qwen2", config, tensors)
  with open(root / "model.safetensors", "rb") as f:  # stored as BF16, not converted
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
  model, params = load_hf(root, context=T, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  _assert_equal_trees(params, params_from_hf(model, tensors, dtype=jnp.bfloat16))
  np.testing.assert_array_equal(  # bit for bit, transposed
      np.asarray(params["block_1"]["attention"]["query"]["kernel"]).view(np.uint16),
      tensors["model.layers.1.self_attn.q_proj.weight"].T.view(np.uint16))
  _, upcast = load_hf(root, context=T)  # the model's float32: exact too
  _assert_equal_trees(upcast, jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params))


def test_missing_files_are_named(tmp_path):
  config, tensors = _checkpoint("llama")
  with pytest.raises(FileNotFoundError, match="no checkpoint directory .*nowhere"):
    load_hf(tmp_path / "nowhere")
  root = _save(tmp_path / "llama", "llama", config, tensors)
  (root / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    load_hf(root)
  root = _save(tmp_path / "llama", "llama", config, tensors)
  (root / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="neither model.safetensors nor "
                                              "model.safetensors.index.json"):
    load_hf(root)
  root = _save(tmp_path / "sharded", "llama", config, tensors, shards=2)
  (root / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="lists 'model-00002-of-00002.safetensors'"):
    load_hf(root)


def test_wrong_tensors_are_named(tmp_path):
  config, tensors = _checkpoint("llama")
  renamed = dict(tensors)
  renamed["model.layers.1.mlp.upproj.weight"] = renamed.pop("model.layers.1.mlp.up_proj.weight")
  with pytest.raises(ValueError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
    load_hf(_save(tmp_path / "renamed", "llama", config, renamed))
  wrong = dict(tensors, **{"model.norm.weight": np.ones(5, np.float32)})
  with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' gives params\['norm', "
                                       r"'scale'\] the shape \(5,\)"):
    load_hf(_save(tmp_path / "wrong", "llama", config, wrong))
  root = _save(tmp_path / "twice", "llama", config, tensors, shards=2)
  first = safetensors_numpy.load_file(root / "model-00001-of-00002.safetensors")
  safetensors_numpy.save_file(dict(first, **{"model.norm.weight": tensors["model.norm.weight"]}),
                              root / "model-00001-of-00002.safetensors")
  with pytest.raises(ValueError, match="'model.norm.weight' is in both"):
    load_hf(root)


def test_without_safetensors_the_error_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(ImportError, match=r"pip install safetensors \(or pip install "
                                        r"'jlayers\[hf\]'\)"):
    load_hf(tmp_path)
