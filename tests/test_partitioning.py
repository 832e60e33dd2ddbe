"""Parameter layouts from logical axis names (:mod:`jlayers.partitioning`): the names each
preset's params get, the specs a user's rules make of them, and the layouts the mesh tests
train with (``tests/test_mesh.py`` runs them on 8 devices)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import jlayers
from jlayers import partitioning

_LLAMA = jlayers.TransformerLM.llama(12, 8, features=16, layers=1, heads=4, num_kv_heads=2,
                                     mlp_features=24, tied=False)
_GPT = jlayers.TransformerLM.gpt2(12, 8, features=16, layers=1, heads=2)


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]}


def test_every_preset_param_gets_a_logical_name_per_axis():
  """Written by hand from the layers' param names: the projections in and out of attention
  and the MLP, embeddings, head and norms; every array of GPT-2 and Llama is named."""
  llama = _flat(partitioning.param_axes(_LLAMA.init_shapes()))
  assert llama["['block_0']['attention']['query']['kernel']"] == ("embed", "heads")
  assert llama["['block_0']['attention']['key']['kernel']"] == ("embed", "kv_heads")
  assert llama["['block_0']['attention']['out']['kernel']"] == ("heads", "embed")
  assert llama["['block_0']['mlp']['gate']['kernel']"] == ("embed", "mlp")
  assert llama["['block_0']['mlp']['down']['kernel']"] == ("mlp", "embed")
  assert llama["['embed']['embedding']"] == ("vocab", "embed")
  assert llama["['head']['kernel']"] == ("embed", "vocab")
  assert llama["['norm']['scale']"] == ("embed",)
  gpt = _flat(partitioning.param_axes(_GPT.init_shapes()))
  assert gpt["['position']['embedding']"] == ("positions", "embed")
  assert gpt["['block_0']['mlp']['fc1']['bias']"] == ("mlp",)
  assert gpt["['block_0']['attention']['query']['bias']"] == ("heads",)
  for axes in (*llama.values(), *gpt.values()):
    assert None not in axes, axes


def test_logical_spec_takes_the_first_free_mesh_axis():
  rules = (("embed", "data"), ("mlp", "model"), ("mlp", "data"), ("heads", ("data", "model")))
  assert partitioning.logical_spec(("embed", "mlp"), rules) == P("data", "model")
  assert partitioning.logical_spec(("mlp", "embed"), rules) == P("model", "data")
  assert partitioning.logical_spec(("mlp", "mlp"), rules) == P("model", "data")
  assert partitioning.logical_spec(("embed", "heads"), rules) == P("data", None)
  assert partitioning.logical_spec(("vocab", None), rules) == P(None, None)


def test_param_specs_of_the_built_in_rules_and_a_mesh_that_does_not_divide():
  mesh = AbstractMesh((2, 4), ("data", "model"))
  shapes = _LLAMA.init_shapes()
  specs = _flat(partitioning.param_specs(shapes, partitioning.FSDP + partitioning.TENSOR))
  assert specs["['block_0']['attention']['query']['kernel']"] == P("data", "model")
  assert specs["['block_0']['attention']['out']['kernel']"] == P("model", "data")
  assert specs["['embed']['embedding']"] == P("model", "data")
  fitted = _flat(partitioning.param_specs(shapes, partitioning.TENSOR, mesh=mesh))
  assert fitted["['embed']['embedding']"].spec == P("model", None)  # 12 rows over 4
  assert fitted["['block_0']['mlp']['gate']['kernel']"].spec == P(None, "model")  # 24 over 4
  odd = jlayers.TransformerLM.llama(10, 8, features=16, layers=1, heads=4, num_kv_heads=2,
                                    mlp_features=24)
  kept = _flat(partitioning.param_specs(odd.init_shapes(), partitioning.TENSOR, mesh=mesh))
  assert kept["['embed']['embedding']"].spec == P(None, None)  # a vocabulary of 10 stays whole


def test_overrides_name_a_users_own_params_and_are_checked():
  params = {"encoder": {"proj": {"kernel": jax.ShapeDtypeStruct((4, 6), jnp.float32)}}}
  assert partitioning.param_axes(params)["encoder"]["proj"]["kernel"] == (None, None)
  named = partitioning.param_axes(params, overrides={"proj/kernel": ("embed", "mlp")})
  assert named["encoder"]["proj"]["kernel"] == ("embed", "mlp")
  with pytest.raises(ValueError, match="names 1 axes, but encoder/proj/kernel has shape"):
    partitioning.param_axes(params, overrides={"proj/kernel": ("embed",)})


def test_init_sharded_needs_a_mesh():
  with pytest.raises(ValueError, match="no mesh"):
    partitioning.init_sharded(_GPT, jax.random.key(0), (1, 8), rules=partitioning.FSDP,
                              input_dtype=jnp.int32)


def test_linear_out_sharding_and_model_parallel_reject_bad_input():
  x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
  with pytest.raises(TypeError, match="out_sharding must be None, a jax.sharding.PartitionSpec"):
    jlayers.linear(x, w, out_sharding="data")
  with pytest.raises(ValueError, match=r"out_sharding must have at most 2 entries"):
    jlayers.linear(x, w, out_sharding=P("data", None, None))
  with pytest.raises(ValueError, match=r"out_sharding must have at most 2 entries"):
    jax.jit(lambda x, w: jlayers.linear(x, w, out_sharding=P("data", None, None)))(x, w)
  assert jlayers.linear(x, w, out_sharding=P("data")).shape == (2, 4)  # no mesh: a no-op
  with pytest.raises(ValueError, match="model must be a positive int, got 0"):
    jlayers.ModelParallel(1, 0, partitioning.FSDP)
  with pytest.raises(ValueError, match="a 4 x 4 mesh needs 16 devices"):
    jlayers.ModelParallel(4, 4, partitioning.FSDP)
