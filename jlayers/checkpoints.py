"""Weights of Hugging Face ``transformers`` checkpoints as :class:`jlayers.TransformerLM`
params.

:func:`load_hf` reads a checkpoint directory as ``save_pretrained`` writes it (``config.json``
and ``model.safetensors``, or shards listed by ``model.safetensors.index.json``) into a model
and its params; :func:`params_from_hf` turns tensors already in memory into params.

A checkpoint's tensors are named as ``transformers`` writes them in ``model.safetensors``
(``model.layers.0.self_attn.q_proj.weight``, GPT-2's ``transformer.h.0.attn.c_attn.weight``);
torch's ``nn.Linear`` stores ``[out, in]`` and jlayers' kernels are ``[in, out]``, so those are
transposed, and GPT-2's fused query/key/value projection is split. Every tensor of the model
must be present with its shape, and every tensor present must be used: anything else is a
``ValueError`` naming the tensor.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jlayers.transformer import TransformerLM

# GPT-2 buffers that older checkpoints hold: causal masks, not weights.
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _entries(model: TransformerLM) -> list[tuple[str, tuple, str]]:
  """``(tensor name, params path, how)`` of every tensor; ``how`` is ``"same"``,
  ``"transpose"`` (a torch ``Linear``) or ``"qkv"`` (GPT-2's fused projection)."""
  if model.positions == "learned":  # GPT-2
    out = [("transformer.wte.weight", ("embed", "embedding"), "same"),
           ("transformer.wpe.weight", ("position", "embedding"), "positions"),
           ("transformer.ln_f.weight", ("norm", "scale"), "same"),
           ("transformer.ln_f.bias", ("norm", "offset"), "same")]
    for i in range(model.layers):
      h, b = f"transformer.h.{i}.", f"block_{i}"
      for hf, ours in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
        out += [(f"{h}{hf}.weight", (b, ours, "scale"), "same"),
                (f"{h}{hf}.bias", (b, ours, "offset"), "same")]
      for part in ("weight", "bias"):
        ours = "kernel" if part == "weight" else "bias"
        out += [(f"{h}attn.c_attn.{part}", (b, "attention", ours), "qkv"),
                (f"{h}attn.c_proj.{part}", (b, "attention", "out", ours), "same"),
                (f"{h}mlp.c_fc.{part}", (b, "mlp", "fc1", ours), "same"),
                (f"{h}mlp.c_proj.{part}", (b, "mlp", "fc2", ours), "same")]
    return out
  out = [("model.embed_tokens.weight", ("embed", "embedding"), "same"),
         ("model.norm.weight", ("norm", "scale"), "same")]
  if not model.tied:
    out.append(("lm_head.weight", ("head", "kernel"), "transpose"))
  for i in range(model.layers):
    h, b = f"model.layers.{i}.", f"block_{i}"
    for hf, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"),
                     ("o_proj", "out")):
      out.append((f"{h}self_attn.{hf}.weight", (b, "attention", ours, "kernel"), "transpose"))
      if model.qkv_bias and ours != "out":
        out.append((f"{h}self_attn.{hf}.bias", (b, "attention", ours, "bias"), "same"))
    for hf in ("gate", "up", "down"):
      out.append((f"{h}mlp.{hf}_proj.weight", (b, "mlp", hf, "kernel"), "transpose"))
    norms = ((("input_layernorm", "attention_norm"), ("post_attention_layernorm",
                                                      "attention_post_norm"),
              ("pre_feedforward_layernorm", "mlp_norm"),
              ("post_feedforward_layernorm", "mlp_post_norm")) if model.post_norms else
             (("input_layernorm", "attention_norm"), ("post_attention_layernorm", "mlp_norm")))
    out += [(f"{h}{hf}.weight", (b, ours, "scale"), "same") for hf, ours in norms]
  return out


def _put(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def params_from_hf(model: TransformerLM, tensors: Mapping[str, Any], *,
                   dtype=None) -> dict:
  """``model``'s params from the tensors of a Hugging Face checkpoint of its architecture.

  Args:
    model: a :class:`jlayers.TransformerLM` built for the checkpoint (e.g. with
      :meth:`TransformerLM.from_hf_config`).
    tensors: ``{name: array}`` as ``transformers`` names them (NumPy or JAX arrays, e.g. from
      ``safetensors.numpy.load_file``); GPT-2 names with or without the ``transformer.``
      prefix.
    dtype: the params' dtype; default ``model.param_dtype``.

  Returns:
    The params, as ``model.init`` lays them out.

  Raises:
    ValueError: a tensor the model needs is missing or has another shape than the model's
      (both named), or a tensor matches nothing in the model.
  """
  dtype = model.param_dtype if dtype is None else dtype
  tensors = dict(tensors)
  if model.positions == "learned":
    tensors = {(k if k.startswith("transformer.") or k == "lm_head.weight"
                else f"transformer.{k}"): v for k, v in tensors.items()
               if not k.endswith(_GPT2_BUFFERS)}
    tensors.pop("lm_head.weight", None)  # GPT-2's head is the token embedding
  head = model.head_features or model.features // model.heads
  kv = (model.num_kv_heads or model.heads) * head
  params: dict = {}
  used = set()
  for name, path, how in _entries(model):
    if name not in tensors:
      raise ValueError(f"params_from_hf: the checkpoint has no tensor {name!r}, which "
                       f"{type(model).__name__} needs for params{list(path)}")
    value = jnp.asarray(tensors[name])
    used.add(name)
    if how == "transpose":
      value = value.T
    if how == "positions":
      if value.shape[0] < model.context:
        raise ValueError(f"params_from_hf: {name!r} has {value.shape[0]} positions, fewer "
                         f"than the model's context {model.context}")
      value = value[:model.context]
    if how == "qkv":
      sizes = (model.heads * head, kv, kv)
      if value.shape[-1] != sum(sizes):
        raise ValueError(f"params_from_hf: {name!r} has shape {tuple(value.shape)}, expected "
                         f"a last axis of {sum(sizes)} (query, key and value)")
      parts = jnp.split(value, [sizes[0], sizes[0] + sizes[1]], axis=-1)
      for part, which in zip(parts, ("query", "key", "value")):
        _put(params, path[:-1] + (which, path[-1]), part.astype(dtype))
      continue
    _put(params, path, value.astype(dtype))
  unused = sorted(set(tensors) - used)
  if unused:
    raise ValueError(f"params_from_hf: tensors {unused[:5]} match nothing in "
                     f"{type(model).__name__} ({len(unused)} unused)")
  want = model.init_shapes()
  for name, path, how in _entries(model):
    paths = ([path[:-1] + (w, path[-1]) for w in ("query", "key", "value")] if how == "qkv"
             else [path])
    for p in paths:
      got, expected = _get(params, p).shape, _get(want, p).shape
      if got != expected:
        raise ValueError(f"params_from_hf: tensor {name!r} gives params{list(p)} the shape "
                         f"{got}, but the model has {expected}")
  return params


_INDEX = "model.safetensors.index.json"


def _weight_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The ``.safetensors`` files of the checkpoint in ``root``, each checked to exist."""
  single, index = root / "model.safetensors", root / _INDEX
  if single.is_file():
    return [single]
  if not index.is_file():
    raise FileNotFoundError(f"load_hf: {str(root)!r} has neither model.safetensors nor {_INDEX} "
                            "(torch .bin checkpoints are not read)")
  listing = json.loads(index.read_text())
  if "weight_map" not in listing:
    raise ValueError(f"load_hf: {str(index)!r} has no \"weight_map\" (tensor name -> file)")
  files = [root / name for name in dict.fromkeys(listing["weight_map"].values())]
  for file in files:
    if not file.is_file():
      raise FileNotFoundError(f"load_hf: {str(index)!r} lists {file.name!r}, but "
                              f"{str(file)!r} does not exist")
  return files


def load_hf(path: str | os.PathLike, *, dtype=None, context: int | None = None,
            **overrides) -> tuple[TransformerLM, dict]:
  """The model and params of a Hugging Face checkpoint saved on disk.

  Reads ``config.json`` into :meth:`TransformerLM.from_hf_config` and every tensor of the
  weight files with the ``safetensors`` package's NumPy reader (no torch), then hands them to
  :func:`params_from_hf`. bfloat16 tensors are read as ``ml_dtypes.bfloat16`` arrays, exactly.

  Args:
    path: a directory holding ``config.json`` and either ``model.safetensors`` or the shards
      that ``model.safetensors.index.json`` lists in its ``"weight_map"`` (tensor name -> file
      name), as ``save_pretrained`` writes them.
    dtype: the params' dtype; default the model's ``param_dtype`` (float32 unless
      ``overrides`` set it).
    context: the model's context; default the config's maximum positions. GPT-2's learned
      position table is cut to it.
    **overrides: further :class:`TransformerLM` options (``dtype``, ``param_dtype``,
      ``remat``, ...), passed to :meth:`TransformerLM.from_hf_config`.

  Returns:
    ``(model, params)``: the :class:`TransformerLM` and its params, as ``model.init`` lays
    them out.

  Raises:
    FileNotFoundError: ``path``, its ``config.json`` or its weight files (``model.safetensors``
      or the index), or a file the index lists, does not exist (the path is named).
    ValueError: the config's ``model_type`` is not supported, the index has no
      ``"weight_map"``, a tensor is in two shards, or a tensor is missing, extra or of the
      wrong shape (named, by :func:`params_from_hf`).
    ImportError: the ``safetensors`` package is not installed.

  Examples:
    .. code-block:: python

      model, params = jlayers.checkpoints.load_hf("path/to/Qwen2.5-0.5B", context=2048,
                                                  dtype=jnp.bfloat16)
      logits = model.apply(params, {}, ids)[0]
  """
  try:
    from safetensors.numpy import load_file
  except ImportError as error:
    raise ImportError("load_hf reads checkpoints with the safetensors package: pip install "
                      "safetensors (or pip install 'jlayers[hf]')") from error
  root = pathlib.Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"load_hf: no checkpoint directory {str(root)!r}")
  config_file = root / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"load_hf: {str(root)!r} has no config.json ({str(config_file)!r})")
  files = _weight_files(root)
  model = TransformerLM.from_hf_config(json.loads(config_file.read_text()), context=context,
                                       **overrides)
  # safetensors gives BF16 tensors numpy's dtype "bfloat16", which ml_dtypes registers; jax
  # imports ml_dtypes, so it is registered by now.
  tensors: dict = {}
  found_in: dict = {}
  for file in files:
    for name, value in load_file(str(file)).items():
      if name in tensors:
        raise ValueError(f"load_hf: tensor {name!r} is in both {found_in[name].name!r} and "
                         f"{file.name!r}")
      tensors[name], found_in[name] = value, file
  return model, params_from_hf(model, tensors, dtype=dtype)
