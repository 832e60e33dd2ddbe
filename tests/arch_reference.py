r"""A second, independent implementation of five decoder-only language models, in plain JAX.

GPT-2, Llama 2/3 (3.1 rope scaling included), Mistral, Qwen2 and Gemma 2, written from their
published equations and from the computations of Hugging Face ``transformers``' modeling code,
reading the configuration keys that ``config.json`` holds and the tensor names and layouts
that ``model.safetensors`` holds. It is a test-side reference: clarity over speed, a full
``[B, N, T, S]`` softmax, every layer a Python loop, nothing shared with the library under test.

Notation: ``B`` batch, ``T`` sequence length, ``D`` hidden size, ``N`` query heads, ``K`` key
and value heads, ``d`` head size, ``I`` MLP width, ``V`` vocabulary, ``L`` layers. A torch
``nn.Linear`` weight is stored ``[out, in]`` and applied as :math:`y = x W^\top + b`; GPT-2's
``Conv1D`` weight is stored ``[in, out]`` and applied as :math:`y = x W + b`.

Masks (every architecture). Query ``i`` may read key ``j`` iff

.. math::

  j \le i \;\wedge\; \mathrm{seg}_j = \mathrm{seg}_i \;\wedge\; (W = \infty \vee j > i - W),

with ``i, j`` indices in the row (not position ids: HF's masks compare cache positions, which
are the row indices), ``seg`` the segment ids (all equal by default) and ``W`` the layer's
sliding window. A query therefore sees exactly the last ``W`` keys, itself included. The masked
scores are set to :math:`-\infty` before the softmax (HF adds the dtype's most negative number:
the same probabilities, since every row keeps at least its diagonal).

Packed rows. HF (5.x) takes no segment ids: called with position ids and neither an attention
mask nor a cache, it infers them, a new segment wherever the position does not grow by exactly
1 (so non-consecutive positions, even in an unpacked row, split it), and then measures windows
in positions. This module takes the segments explicitly and measures windows in row indices:
the same whenever positions count 0, 1, 2, ... (or any run of +1 steps) inside each segment.

Sliding-window boundary. HF's mask is ``kv_idx > q_idx - sliding_window`` (``masking_utils``;
older versions built the same band with ``tril(ones, diagonal=-sliding_window)`` as the masked
part; the flash path passes ``window_size=(W - 1, W - 1)``), and Mistral's own inference code
builds it with xformers' local causal mask, ``triu(.., diagonal=1 - W)``: both give ``W`` keys,
``i - W < j <= i``. The Mistral paper's wording ("positions between i - W and i") and the
one-file reference released with Mistral 7B (``triu(.., diagonal=-W)``) give ``W + 1`` keys;
this module follows HF, the code that produced and reads the checkpoints.

Rotary embedding (Llama, Mistral, Qwen2, Gemma 2), HF's "rotate half" layout: the pair of
coordinate ``m`` is ``(m, m + d/2)``, not ``(2m, 2m+1)``:

.. math::

  \omega_m = \theta^{-2m/d},\quad \alpha_{t,m} = p_t\,\omega_m,\quad
  c_t = [\cos\alpha_t, \cos\alpha_t],\; s_t = [\sin\alpha_t, \sin\alpha_t],\\
  \mathrm{rope}(x)_t = x_t \odot c_t + [-x_{t,d/2:}, x_{t,:d/2}] \odot s_t,

applied to queries and keys, per head, with ``p`` the position ids and ``θ = rope_theta``.
Llama 3.1 (``rope_scaling["rope_type"] == "llama3"``, factor ``f``, ``low_freq_factor``
:math:`\ell`, ``high_freq_factor`` ``h``, ``original_max_position_embeddings`` ``C``), with
wavelength :math:`\lambda_m = 2\pi/\omega_m`:

.. math::

  \omega'_m = \begin{cases} \omega_m & \lambda_m < C/h \\ \omega_m / f & \lambda_m > C/\ell \\
  (1 - \sigma_m)\,\omega_m / f + \sigma_m\,\omega_m, \;
  \sigma_m = \dfrac{C/\lambda_m - \ell}{h - \ell} & \text{otherwise}\end{cases}

(continuous at both edges, so which side owns the boundary does not matter). Its attention
factor is 1: the cosines and sines are not rescaled.

Attention (GQA): query head ``n`` reads key/value head ``n // (N / K)`` (HF's ``repeat_kv``
repeats each key head ``N/K`` times, consecutively):

.. math::

  S_{n,i,j} = \mathrm{cap}(\tau\, q_{i,n} \cdot k_{j,n//(N/K)}),\quad
  P = \mathrm{softmax}_j(S \text{ masked}),\quad o_{i,n} = \textstyle\sum_j P_{n,i,j} v_j,

with :math:`\tau = d^{-1/2}` except Gemma 2 (``query_pre_attn_scalar ** -0.5``) and
:math:`\mathrm{cap}(s) = c\tanh(s/c)` for Gemma 2 (``c = attn_logit_softcapping``, applied before
the mask, as HF does), the identity elsewhere. Heads are concatenated ``[n0 d-block, n1, ...]``
before the output projection (HF's ``view(B, T, N, d)`` of the projection).

GPT-2 (pre-LayerNorm, learned positions, ``gelu_new``, LM head tied to ``wte``):

.. math::

  h^0 = \mathrm{wte}[x] + \mathrm{wpe}[p],\quad
  [q, k, v] = \mathrm{LN}_1(h) W_{attn} + b_{attn},\quad
  h \mathrel{+}= \mathrm{Attn}(q, k, v) W_{proj} + b_{proj},\\
  h \mathrel{+}= g(\mathrm{LN}_2(h) W_{fc} + b_{fc}) W_{proj2} + b_{proj2},\quad
  \mathrm{logits} = \mathrm{LN}_f(h^L)\,\mathrm{wte}^\top,

:math:`\mathrm{LN}(x) = (x - \mu)/\sqrt{\sigma^2 + \epsilon} \odot w + b` (biased variance,
``layer_norm_epsilon``), :math:`g(x) = \tfrac12 x (1 + \tanh(\sqrt{2/\pi}(x + 0.044715 x^3)))`,
MLP width ``n_inner`` or ``4 n_embd``. ``scale_attn_by_inverse_layer_idx`` and
``reorder_and_upcast_attn`` are not supported (False in every released GPT-2).

Llama / Mistral / Qwen2 (pre-RMSNorm, SwiGLU):

.. math::

  h^0 = E[x],\quad h \mathrel{+}= \mathrm{Attn}(\mathrm{RMS}(h; w_{in})),\quad
  h \mathrel{+}= W_{down}(\mathrm{silu}(W_{gate} u) \odot W_{up} u),\;
  u = \mathrm{RMS}(h; w_{post}),\\
  \mathrm{logits} = \mathrm{RMS}(h^L; w_{norm})\, W_{head}^\top,\quad
  \mathrm{RMS}(x; w) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot w,

``W_head = lm_head`` or ``E`` when ``tie_word_embeddings``. ``post_attention_layernorm`` is the
norm *before the MLP* in these three. Biases: Llama's q/k/v/o when ``attention_bias``, its
gate/up/down when ``mlp_bias``; Qwen2 always has q/k/v biases and never an o bias; Mistral none.
Sliding windows: Mistral applies ``sliding_window`` (if not None) on every layer; Qwen2 only
when ``use_sliding_window``, on layers ``i >= max_window_layers`` (HF's default layer types; the
released Qwen2 configs set ``use_sliding_window: false``); Llama never. A ``layer_types`` list in
the config (newer HF), ``"sliding_attention"``/``"full_attention"`` per layer, takes precedence.

Gemma 2 (GeGLU, sandwich norms, soft-capping, tied head):

.. math::

  h^0 = E[x] \cdot \mathrm{round}_{dtype}(\sqrt D),\quad
  h \mathrel{+}= \mathrm{RMS}_1(\mathrm{Attn}(\mathrm{RMS}_0(h))),\quad
  h \mathrel{+}= \mathrm{RMS}_3(W_{down}(g(W_{gate} u) \odot W_{up} u)),\;
  u = \mathrm{RMS}_2(h),\\
  \mathrm{logits} = c_f \tanh(\mathrm{RMS}(h^L) E^\top / c_f),\quad
  \mathrm{RMS}(x; w) = x / \sqrt{\mathrm{mean}(x^2) + \epsilon} \odot (1 + w),

with norms 0–3 ``input_layernorm``, ``post_attention_layernorm``, ``pre_feedforward_layernorm``,
``post_feedforward_layernorm``, ``g`` the tanh GELU (``gelu_pytorch_tanh``), ``c_f =
final_logit_softcapping``. Layer types: HF's default is ``"sliding_attention" if (i + 1) % 2
else "full_attention"``, so layers 0, 2, 4, ... use ``sliding_window`` and layers 1, 3, ...
are global. The normaliser √D is a tensor *of the hidden states' dtype* in HF (in bfloat16
√3072 = 55.4256 becomes 55.5); this module rounds it to the weights' dtype the same way.

Dtypes. HF upcasts in several places: RMSNorm and LayerNorm statistics in float32 (Llama
multiplies ``w`` after casting :math:`\hat x` back to the input dtype, Gemma 2 multiplies
``1 + w`` in float32 and casts after), the rotary angles, cosines and sines in float32
(``inv_freq`` float32, positions cast to float32), the attention softmax in float32. This
module computes everything in the weights' dtype (that of the embedding table): float64
weights give a float64 model end to end, which is what the comparisons at 1e-10 need. The one
exception is half precision's rotary angles, computed in float32 and the cosines and sines
rounded to the weights' dtype, as HF does (a bfloat16 position past 256 is not an integer).

Checkpoint names: those that ``save_pretrained`` writes for ``*ForCausalLM`` (GPT-2:
``GPT2LMHeadModel``, prefix ``transformer.``); tied heads are not stored. Older GPT-2 files on
the hub use no ``transformer.`` prefix and also hold the ``attn.bias`` / ``attn.masked_bias``
mask buffers, which are not parameters: a loader drops them.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ARCHS = ("gpt2", "llama", "mistral", "qwen2", "gemma2")

_TINY = {
  "gpt2": {
    "n_embd": 16, "n_head": 4, "n_layer": 2, "n_positions": 16, "vocab_size": 11,
    "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None,
  },
  "llama": {
    "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 4, "num_hidden_layers": 2, "vocab_size": 11,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "hidden_act": "silu",
  },
  "mistral": {
    "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": None, "num_hidden_layers": 2, "vocab_size": 11,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "sliding_window": 3, "hidden_act": "silu",
  },
  "qwen2": {
    "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 11,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 3,
    "max_window_layers": 2, "hidden_act": "silu",
  },
  # head_dim * heads != hidden_size and query_pre_attn_scalar != head_dim, as in the released
  # Gemma 2 models (9B: 16 x 256 vs 3584; 27B: 1/sqrt(144) with d = 128); small caps so that
  # the tanh bends the tiny model's scores and logits.
  "gemma2": {
    "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 6, "num_hidden_layers": 3, "vocab_size": 11,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": True, "attention_bias": False, "sliding_window": 3,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
    "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
    "query_pre_attn_scalar": 8,
  },
}

_TIED_DEFAULT = {"llama": False, "mistral": False, "qwen2": False, "gemma2": True}


def _check_arch(fn, arch):
  if arch not in ARCHS:
    raise ValueError(f"arch_reference.{fn}: arch must be one of {ARCHS}, got {arch!r}")


def config_for(arch, **overrides):
  """A tiny configuration of ``arch`` in HF's ``config.json`` keys, with ``overrides`` applied.

  Args:
    arch: one of ``ARCHS``.
    **overrides: keys to set or replace.

  Returns:
    dict: hidden 16, 4 heads, 2 key/value heads, 2-3 layers, vocabulary 11, MLP width 24
    (GPT-2: 64), sliding window 3 for Mistral and Gemma 2.
  """
  _check_arch("config_for", arch)
  config = dict(_TINY[arch])
  config.update(overrides)
  return config


def head_dim(config):
  """``head_dim`` when the config gives it, else ``hidden_size // num_attention_heads``.

  Args:
    config: a Llama-family config dict.

  Returns:
    int: the per-head size ``d``.
  """
  return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _tied(arch, config):
  return arch == "gpt2" or config.get("tie_word_embeddings", _TIED_DEFAULT[arch])


def tensor_names(arch, config):
  """Every tensor a checkpoint of ``arch`` holds, with its shape, in HF's names and layouts.

  Args:
    arch: one of ``ARCHS``.
    config: its config dict.

  Returns:
    dict[str, tuple[int, ...]]: name -> shape, e.g. ``model.layers.0.self_attn.q_proj.weight``
    -> ``(N * d, D)`` (``[out, in]``), ``transformer.h.0.attn.c_attn.weight`` -> ``(D, 3 D)``
    (``[in, out]``). Tied heads are absent.
  """
  _check_arch("tensor_names", arch)
  names = {}
  if arch == "gpt2":
    dim, vocab = config["n_embd"], config["vocab_size"]
    inner = config.get("n_inner") or 4 * dim
    names["transformer.wte.weight"] = (vocab, dim)
    names["transformer.wpe.weight"] = (config["n_positions"], dim)
    for i in range(config["n_layer"]):
      p = f"transformer.h.{i}."
      for sub, shape in (("ln_1", (dim,)), ("attn.c_attn", (dim, 3 * dim)),
                         ("attn.c_proj", (dim, dim)), ("ln_2", (dim,)),
                         ("mlp.c_fc", (dim, inner)), ("mlp.c_proj", (inner, dim))):
        names[p + sub + ".weight"] = shape
        names[p + sub + ".bias"] = shape[-1:]
    names["transformer.ln_f.weight"] = (dim,)
    names["transformer.ln_f.bias"] = (dim,)
    return names
  dim, vocab, inner = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
  d, heads, kv = head_dim(config), config["num_attention_heads"], config["num_key_value_heads"]
  qkv_bias = arch == "qwen2" or (arch in ("llama", "gemma2") and config.get("attention_bias"))
  o_bias = arch in ("llama", "gemma2") and config.get("attention_bias")
  mlp_bias = arch == "llama" and config.get("mlp_bias")
  names["model.embed_tokens.weight"] = (vocab, dim)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    for proj, out in (("q", heads * d), ("k", kv * d), ("v", kv * d)):
      names[f"{p}self_attn.{proj}_proj.weight"] = (out, dim)
      if qkv_bias:
        names[f"{p}self_attn.{proj}_proj.bias"] = (out,)
    names[f"{p}self_attn.o_proj.weight"] = (dim, heads * d)
    if o_bias:
      names[f"{p}self_attn.o_proj.bias"] = (dim,)
    for proj, shape in (("gate", (inner, dim)), ("up", (inner, dim)), ("down", (dim, inner))):
      names[f"{p}mlp.{proj}_proj.weight"] = shape
      if mlp_bias:
        names[f"{p}mlp.{proj}_proj.bias"] = shape[:1]
    norms = ["input_layernorm", "post_attention_layernorm"]
    if arch == "gemma2":
      norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for norm in norms:
      names[f"{p}{norm}.weight"] = (dim,)
  names["model.norm.weight"] = (dim,)
  if not _tied(arch, config):
    names["lm_head.weight"] = (vocab, dim)
  return names


def random_weights(arch, config, key, dtype=jnp.float64):
  """Random weights for every tensor of ``tensor_names(arch, config)``.

  Drawn by numpy (seeded by the key's data) in float32 and cast, so that the same key gives the
  same model in every dtype. Norm
  weights lie near their neutral value (1; Gemma 2's ``1 + w`` form: 0), biases and
  LayerNorm shifts are nonzero (``0.2 N(0, 1)``), projections ``N(0, 1/fan_in)``,
  embeddings ``0.5 N(0, 1)``.

  Args:
    arch: one of ``ARCHS``.
    config: its config dict.
    key: a PRNG key.
    dtype: the weights' dtype (float64 needs x64 enabled).

  Returns:
    dict[str, Array]: name -> ``dtype[shape]``.
  """
  names = tensor_names(arch, config)
  sizes = [math.prod(shape) for shape in names.values()]
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  rng = np.random.default_rng(np.asarray(key).ravel().tolist())  # numpy: nothing to compile
  flat = rng.standard_normal(sum(sizes)).astype(np.float32)
  offsets = np.cumsum([0] + sizes)
  weights = {}
  for (name, shape), start, stop in zip(names.items(), offsets[:-1], offsets[1:]):
    noise = flat[start:stop].reshape(shape)
    if name.endswith(".bias"):
      value = 0.2 * noise
    elif len(shape) == 1:  # a norm's scale
      value = (0.0 if arch == "gemma2" else 1.0) + 0.2 * noise
    elif name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight", "lm_head.weight")):
      value = 0.5 * noise
    else:
      fan_in = shape[0] if arch == "gpt2" else shape[1]  # Conv1D [in, out]; Linear [out, in]
      value = noise / np.float32(math.sqrt(fan_in))
    weights[name] = jnp.asarray(value.astype(np.float32), dtype)
  return weights


def rope_inv_frequencies(config, dtype=jnp.float64):
  """The rotary inverse frequencies :math:`\\omega'_m`, Llama 3.1 scaling applied if asked.

  Reads ``rope_theta`` and ``rope_scaling`` (or, as newer HF writes them, ``rope_parameters``
  with ``rope_theta`` and ``rope_type`` inside); ``rope_type`` ``"default"`` or ``"llama3"``.

  Computed in float64 (numpy: a function of the config alone), then rounded to ``dtype``.

  Args:
    config: a Llama-family config dict.
    dtype: the result's dtype.

  Returns:
    ``dtype[d / 2]``: :math:`\\omega'_m`, ``m = 0 .. d/2 - 1``.
  """
  d = head_dim(config)
  scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
  theta = scaling.get("rope_theta", config.get("rope_theta", 10000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind not in ("default", "llama3"):
    raise ValueError(f"arch_reference: rope_type must be 'default' or 'llama3', got {kind!r}")
  inv = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  if kind == "llama3":
    factor, low = scaling["factor"], scaling["low_freq_factor"]
    high, context = scaling["high_freq_factor"], scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    sigma = (context / wavelength - low) / (high - low)
    medium = (1 - sigma) * inv / factor + sigma * inv
    inv = np.where(wavelength < context / high, inv,
                   np.where(wavelength > context / low, inv / factor, medium))
  return jnp.asarray(inv, dtype)


def attention_windows(arch, config):
  """Each layer's sliding window (``None``: global attention), as HF assigns them.

  Args:
    arch: one of ``ARCHS``.
    config: its config dict.

  Returns:
    tuple[int | None, ...]: one entry per layer.
  """
  _check_arch("attention_windows", arch)
  if arch == "gpt2":
    return (None,) * config["n_layer"]
  layers, window = config["num_hidden_layers"], config.get("sliding_window")
  if arch == "llama" or window is None:
    return (None,) * layers
  types = config.get("layer_types")
  if types is None:
    if arch == "mistral":
      types = ["sliding_attention"] * layers
    elif arch == "gemma2":
      types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    else:  # qwen2
      use, first = config.get("use_sliding_window", False), config.get("max_window_layers", 0)
      types = ["sliding_attention" if use and i >= first else "full_attention"
               for i in range(layers)]
  return tuple(window if t == "sliding_attention" else None for t in types)


def _row(v, ndim):
  """``v[..., C]`` broadcast-ready against an array of rank ``ndim`` (no implicit ranks)."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def _linear(x, w, name, bias):
  """torch ``nn.Linear``: ``x @ W.T + b``, ``W: [out, in]``."""
  y = jnp.einsum("...i,oi->...o", x, w[name + ".weight"])
  return y + _row(w[name + ".bias"], y.ndim) if bias else y


def _conv1d(x, w, name):
  """GPT-2's ``Conv1D``: ``x @ W + b``, ``W: [in, out]``."""
  y = jnp.einsum("...i,io->...o", x, w[name + ".weight"])
  return y + _row(w[name + ".bias"], y.ndim)


def _layer_norm(x, w, b, eps):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * _row(w, x.ndim) + _row(b, x.ndim)


def _rms_norm(x, w, eps, *, one_plus):
  scale = 1.0 + w if one_plus else w
  return x / jnp.sqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * _row(scale, x.ndim)


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
  return x / (1.0 + jnp.exp(-x))


_ACTIVATIONS = {"silu": _silu, "gelu_pytorch_tanh": _gelu_tanh, "gelu_new": _gelu_tanh}


def _allowed(segment_ids, window):
  """bool[B, T, T]: may query i read key j (causal, same segment, inside the window)."""
  t = segment_ids.shape[1]
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  ok = j <= i
  if window is not None:
    ok = ok & (j > i - window)
  return ok[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])


def _attend(q, k, v, allowed, scale, softcap):
  """Softmax attention. q: [B, T, N, d]; k, v: [B, T, K, d]; allowed: bool[B, T, T]."""
  k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)  # head n reads kv head n // (N / K)
  v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
  s = jnp.einsum("bind,bjnd->bnij", q, k) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(allowed[:, None], s, -jnp.inf)
  e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
  p = e / jnp.sum(e, axis=-1, keepdims=True)
  o = jnp.einsum("bnij,bjnd->bind", p, v)
  return o.reshape(o.shape[:2] + (-1,))


def _rope(x, cos, sin):
  """Rotate half. x: [B, T, H, d]; cos, sin: [B, T, 1, d]."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _layer(weights, prefix):
  """One layer's tensors, their names relative to ``prefix``."""
  return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# The layers are jitted only to compile each one once (it is reused by every layer of that
# shape, and by every model that shares it); they are plain functions of their arguments.
@functools.partial(jax.jit, static_argnames=("heads", "eps"))
def _gpt2_block(h, w, allowed, *, heads, eps):
  b, t, dim = h.shape
  a = _layer_norm(h, w["ln_1.weight"], w["ln_1.bias"], eps)
  q, k, v = jnp.split(_conv1d(a, w, "attn.c_attn"), 3, axis=-1)
  q, k, v = (z.reshape(b, t, heads, dim // heads) for z in (q, k, v))
  h = h + _conv1d(_attend(q, k, v, allowed, (dim // heads) ** -0.5, None), w, "attn.c_proj")
  m = _layer_norm(h, w["ln_2.weight"], w["ln_2.bias"], eps)
  return h + _conv1d(_gelu_tanh(_conv1d(m, w, "mlp.c_fc")), w, "mlp.c_proj")


def _gpt2(config, weights, ids, positions, segment_ids):
  eps, heads = config["layer_norm_epsilon"], config["n_head"]
  if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
    raise ValueError("arch_reference: GPT-2's scale_attn_by_inverse_layer_idx and "
                     "reorder_and_upcast_attn are not supported")
  if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
    raise ValueError("arch_reference: GPT-2's activation_function must be gelu_new, got "
                     f"{config['activation_function']!r}")
  wte = weights["transformer.wte.weight"]
  h = wte[ids] + weights["transformer.wpe.weight"][positions]
  allowed = _allowed(segment_ids, None)
  for i in range(config["n_layer"]):
    h = _gpt2_block(h, _layer(weights, f"transformer.h.{i}."), allowed, heads=heads, eps=eps)
  h = _layer_norm(h, weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"], eps)
  return jnp.einsum("btd,vd->btv", h, wte)


@functools.partial(jax.jit, static_argnames=(
  "gemma", "heads", "kv", "eps", "scale", "softcap", "act", "qkv_bias", "o_bias", "mlp_bias"))
def _decoder_layer(h, w, cos, sin, allowed, *, gemma, heads, kv, eps, scale, softcap, act,
                   qkv_bias, o_bias, mlp_bias):
  b, t, _ = h.shape
  d = cos.shape[-1]

  def norm(x, name):
    return _rms_norm(x, w[name + ".weight"], eps, one_plus=gemma)

  a = norm(h, "input_layernorm")
  q = _linear(a, w, "self_attn.q_proj", qkv_bias).reshape(b, t, heads, d)
  k = _linear(a, w, "self_attn.k_proj", qkv_bias).reshape(b, t, kv, d)
  v = _linear(a, w, "self_attn.v_proj", qkv_bias).reshape(b, t, kv, d)
  o = _attend(_rope(q, cos, sin), _rope(k, cos, sin), v, allowed, scale, softcap)
  o = _linear(o, w, "self_attn.o_proj", o_bias)
  if gemma:
    o = norm(o, "post_attention_layernorm")
  h = h + o
  u = norm(h, "pre_feedforward_layernorm" if gemma else "post_attention_layernorm")
  gate = _ACTIVATIONS[act](_linear(u, w, "mlp.gate_proj", mlp_bias))
  m = _linear(gate * _linear(u, w, "mlp.up_proj", mlp_bias), w, "mlp.down_proj", mlp_bias)
  if gemma:
    m = norm(m, "post_feedforward_layernorm")
  return h + m


def _llama_family(arch, config, weights, ids, positions, segment_ids):
  gemma = arch == "gemma2"
  act = config.get("hidden_activation") or config.get("hidden_act", "silu")
  if act not in _ACTIVATIONS:
    raise ValueError(f"arch_reference: the activation must be silu or a tanh gelu, got {act!r}")
  eps = config.get("rms_norm_eps", 1e-6)
  static = {
    "gemma": gemma, "heads": config["num_attention_heads"], "eps": eps, "act": act,
    "kv": config["num_key_value_heads"],
    "scale": config["query_pre_attn_scalar"] ** -0.5 if gemma else head_dim(config) ** -0.5,
    "softcap": config.get("attn_logit_softcapping") if gemma else None,
    "qkv_bias": arch == "qwen2" or (arch != "mistral" and bool(config.get("attention_bias"))),
    "o_bias": arch in ("llama", "gemma2") and bool(config.get("attention_bias")),
    "mlp_bias": arch == "llama" and bool(config.get("mlp_bias")),
  }
  table = weights["model.embed_tokens.weight"]
  h = table[ids]
  if gemma:  # HF: torch.tensor(hidden_size ** 0.5, dtype=hidden_states.dtype)
    h = h * jnp.asarray(config["hidden_size"] ** 0.5, dtype=h.dtype)
  rope_dtype = h.dtype if jnp.finfo(h.dtype).bits >= 32 else jnp.float32  # bf16: 256 + 1 = 256
  inv_freq = rope_inv_frequencies(config, rope_dtype)
  angles = positions.astype(rope_dtype)[..., None] * _row(inv_freq, 3)  # [B, T, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, d]
  cos, sin = jnp.cos(angles).astype(h.dtype), jnp.sin(angles).astype(h.dtype)
  for i, window in enumerate(attention_windows(arch, config)):
    h = _decoder_layer(h, _layer(weights, f"model.layers.{i}."), cos, sin,
                       _allowed(segment_ids, window), **static)
  h = _rms_norm(h, weights["model.norm.weight"], eps, one_plus=gemma)
  head = table if _tied(arch, config) else weights["lm_head.weight"]
  logits = jnp.einsum("btd,vd->btv", h, head)
  cap = config.get("final_logit_softcapping") if gemma else None
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def forward(arch, config, weights, ids, *, positions=None, segment_ids=None):
  """The logits of the ``arch`` language model, computed as HF's modeling code does.

  Args:
    arch: one of ``ARCHS``.
    config: its config dict (HF's ``config.json`` keys).
    weights: dict name -> array, HF's checkpoint names and layouts (``tensor_names``), all of
      one floating dtype, in which everything is computed.
    ids: ``int[B, T]`` token ids.
    positions: ``int[B, T]`` position ids; default ``arange(T)`` in every row.
    segment_ids: ``int[B, T]``; a token attends only to earlier tokens of its own segment.
      Default: one segment per row.

  Returns:
    ``float[B, T, V]`` logits, in the weights' dtype.
  """
  _check_arch("forward", arch)
  ids = jnp.asarray(ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"arch_reference.forward: ids must be int[B, T], got {ids.dtype}{ids.shape}")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  if segment_ids is None:
    segment_ids = jnp.zeros(ids.shape, jnp.int32)
  for name, value in (("positions", positions), ("segment_ids", segment_ids)):
    if jnp.shape(value) != ids.shape:
      raise ValueError(f"arch_reference.forward: {name} must have the shape of ids {ids.shape}, "
                       f"got {jnp.shape(value)}")
  positions, segment_ids = jnp.asarray(positions), jnp.asarray(segment_ids)
  if arch == "gpt2":
    return _gpt2(config, weights, ids, positions, segment_ids)
  return _llama_family(arch, config, weights, ids, positions, segment_ids)
