"""The ``generate`` section of ``python -m jlayers.bench``: decoding through the key/value cache
against recomputing the window, and against Flax linen's ``decode=True`` cache.

The models are the character LM of ``examples/train_charlm.py`` at context 512 (vocabulary
:data:`VOCAB`): GPT-2's architecture (4 pre-LayerNorm blocks of 128 features, 4 heads, a
tanh-GELU MLP of 512, learned positions, tied logits) and its Llama variant (2 key/value heads,
a SwiGLU MLP of 256, rotary positions, RMS norms, tied logits). Every row continues a random
prompt of :data:`PROMPT` tokens greedily to the whole context, float32, at batch 1 and 8:

* **cache** — :func:`jlayers.generate` (the prompt in one pass, then a compiled
  ``lax.while_loop`` of one token per step), no end-of-sequence token: every row makes all
  ``context − prompt`` tokens. Timed whole, prefill included.
* **recompute** — what sampling did before the cache: per new token, the model over the whole
  window (the tokens so far at its start, padded to the context), the logits read at the last
  real position and their argmax written into the next slot; one jitted ``lax.fori_loop`` of
  ``recompute_steps`` steps (every step costs the same: the window is always full length), so
  its tokens per second are a rate, not a whole generation.
* **Flax linen** (GPT only) — the same model in Flax (:func:`flax_decode_model`, the
  jlayers weights copied in, :func:`flax_params`) with ``nn.MultiHeadDotProductAttention
  (decode=True)``: the cache sized by ``init`` on a full-length input, then one token per
  ``apply(..., mutable=["cache"])``, the prompt fed token by token (Flax's cache takes one
  query at a time) and the greedy loop a ``lax.fori_loop``, all in one jitted program.

Prefills differ (jlayers runs the prompt as one pass, Flax one token at a time), so the two
libraries are compared on the decode loop alone, measured like for like: each is also timed
making one token (its prefill and first choice, same cache size), and the decode loop's time
per step is ``(whole − prefill only) / (new tokens − 1)``.
"""

from __future__ import annotations

import functools
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlayers import _bench_peers as peers
from jlayers import _kv_cache
from jlayers.generation import generate
from jlayers.transformer import TransformerLM

VOCAB = 96
PROMPT = 16

GENERATE_TARGET = {"recompute": 10.0, "flax": 1.0}
"""The cache makes tokens at least ``recompute`` × as fast as recomputing the window (charlm
model, context 512), and its decode loop takes at most ``flax`` × Flax linen's time per step."""


def charlm_models(context: int = 512, *, features: int = 128, layers: int = 4,
                  heads: int = 4) -> dict[str, TransformerLM]:
  """``{"gpt": ..., "llama": ...}``: the example's character LM in its two architectures
  (``examples/train_charlm.py``'s ``build_model``), vocabulary :data:`VOCAB`."""
  arch = {"features": features, "layers": layers, "heads": heads}
  return {"gpt": TransformerLM.gpt2(VOCAB, context, **arch),
          "llama": TransformerLM.llama(VOCAB, context, num_kv_heads=max(1, heads // 2),
                                       mlp_features=2 * features, tied=True, **arch)}


def recompute_runner(model: TransformerLM, prompt_len: int, steps: int):
  """Jitted ``(params, prompt int32[B, prompt_len]) -> window int32[B, context]``: ``steps``
  greedy tokens, each from a full forward over the window padded to the context."""
  context = model.context

  @jax.jit
  def run(params, prompt):
    b = prompt.shape[0]
    window = jnp.zeros((b, context), jnp.int32).at[:, :prompt_len].set(prompt)

    def step(i, window):
      logits, _ = model.apply(params, {}, window)
      last = prompt_len - 1 + i
      token = jnp.argmax(lax.dynamic_index_in_dim(logits, last, axis=1, keepdims=False),
                         axis=-1).astype(jnp.int32)
      return lax.dynamic_update_slice(window, token[:, None], (jnp.zeros_like(last), last + 1))

    return lax.fori_loop(0, steps, step, window)

  return run


def flax_decode_model(vocab_size: int, context: int, *, features: int = 128, layers: int = 4,
                      heads: int = 4):
  """The GPT character LM as a Flax linen module for decoding:
  ``apply({"params", "cache"}, ids int32[B, T], positions int32[1, T], mutable=["cache"])
  -> (logits float32[B, T, vocab_size], {"cache": ...})``. Pre-LayerNorm blocks (eps 1e-5)
  of ``nn.MultiHeadDotProductAttention(decode=True)`` (biases) and a tanh-GELU MLP of
  ``4 · features``, learned positions, tied logits (``Embed.attend``), as
  ``peers.flax_transformer_model``. ``init`` on ``T = context`` ids sizes the cache; then
  ``T = 1`` per call. Needs Flax."""
  import flax.linen as nn  # noqa: PLC0415 (optional dependency)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.LayerNorm(epsilon=peers.LN_EPS, name="attention_norm")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=features,
                                              out_features=features, decode=True,
                                              name="attention")(h)
      h = nn.LayerNorm(epsilon=peers.LN_EPS, name="mlp_norm")(x)
      h = nn.gelu(nn.Dense(4 * features, name="fc1")(h), approximate=True)
      return x + nn.Dense(features, name="fc2")(h)

  class DecodeLM(nn.Module):
    @nn.compact
    def __call__(self, ids, positions):
      embed = nn.Embed(vocab_size, features, name="embed")
      x = embed(ids) + nn.Embed(context, features, name="position")(positions)
      for i in range(layers):
        x = Block(name=f"block_{i}")(x)
      return embed.attend(nn.LayerNorm(epsilon=peers.LN_EPS, name="norm")(x))

  return DecodeLM()


def flax_params(params, heads: int) -> dict:
  """The params of a jlayers GPT ``TransformerLM`` in :func:`flax_decode_model`'s layout:
  attention kernels split per head (``[F, N, H]``, the output's ``[N, H, F]``), LayerNorm
  offsets as ``bias``."""
  def norm(p):
    return {"scale": p["scale"], "bias": p["offset"]}

  def dense(p):
    return {"kernel": p["kernel"], "bias": p["bias"]}

  out = {"embed": params["embed"], "position": params["position"],
         "norm": norm(params["norm"])}
  for name, block in params.items():
    if not name.startswith("block_"):
      continue
    attention = {}
    for proj in ("query", "key", "value"):
      kernel = block["attention"][proj]["kernel"]
      attention[proj] = {"kernel": kernel.reshape(kernel.shape[0], heads, -1),
                         "bias": block["attention"][proj]["bias"].reshape(heads, -1)}
    kernel = block["attention"]["out"]["kernel"]
    attention["out"] = {"kernel": kernel.reshape(heads, -1, kernel.shape[-1]),
                        "bias": block["attention"]["out"]["bias"]}
    out[name] = {"attention_norm": norm(block["attention_norm"]), "attention": attention,
                 "mlp_norm": norm(block["mlp_norm"]), "fc1": dense(block["mlp"]["fc1"]),
                 "fc2": dense(block["mlp"]["fc2"])}
  return out


def flax_generate_runner(model: TransformerLM, batch_size: int, prompt_len: int):
  """Greedy decoding with Flax's cache for the GPT ``model``'s architecture: ``{"run":
  jitted (flax params, prompt int32[B, prompt_len], new_tokens (static)) -> int32[B,
  new_tokens] (the cache, ``context`` tokens per row, made inside), "version": "flax X.Y.Z"}``,
  or ``None`` without Flax."""
  try:
    import flax  # noqa: PLC0415
  except ImportError:
    return None
  net = flax_decode_model(model.vocab_size, model.context, features=model.features,
                          layers=model.layers, heads=model.heads)
  full = jnp.zeros((batch_size, model.context), jnp.int32)
  shapes = jax.eval_shape(
      lambda: net.init(jax.random.key(0), full, jnp.arange(model.context)[None]))["cache"]

  @functools.partial(jax.jit, static_argnums=2)
  def run(params, prompt, new_tokens):
    b = prompt.shape[0]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def step(cache, token, position):
      logits, variables = net.apply({"params": params, "cache": cache}, token[:, None],
                                    jnp.reshape(position, (1, 1)), mutable=["cache"])
      return variables["cache"], logits[:, 0]

    def feed(i, carry):
      return step(carry[0], prompt[:, i], i)

    logits = jnp.zeros((b, model.vocab_size), jnp.float32)
    cache, logits = lax.fori_loop(0, prompt_len, feed, (cache, logits))
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    tokens = jnp.zeros((b, new_tokens), jnp.int32).at[:, 0].set(token)

    def body(i, carry):
      cache, token, tokens = carry
      cache, logits = step(cache, token, prompt_len + i - 1)
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      return cache, token, lax.dynamic_update_slice(tokens, token[:, None],
                                                    (jnp.zeros_like(i), i))

    return lax.fori_loop(1, new_tokens, body, (cache, token, tokens))[2]

  return {"run": run, "version": f"flax {flax.__version__}"}


def _param_bytes(params) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))


def bench_generate(steps: int, warmup: int, rounds: int, *, context: int = 512,
                   prompt_len: int = PROMPT, batches: tuple[int, ...] = (1, 8),
                   recompute_steps: int = 8, archs: tuple[str, ...] = ("gpt", "llama"),
                   features: int = 128, layers: int = 4, heads: int = 4,
                   seed: int = 0) -> dict:
  """Tokens per second of the cache and of recomputation, and the decode loop's time per
  step against Flax linen (see the module docstring), for each model and batch; all the
  programs of one model and batch timed in alternating rounds (medians; the first call of each,
  which compiles, is among the ``warmup`` ones).

  Returns:
    ``{"context", "prompt", "new_tokens", "recompute_steps", "flax" (its version, when
    installed), "rows": [...]}``, a row per model and batch: ``{"model", "batch",
    "param_bytes", "cache_bytes_per_token", "cache_bytes" (the cache of B × context tokens,
    as allocated), "cache_ms" (whole generation),
    "cache_tokens_per_s", "recompute_ms" (its steps), "recompute_tokens_per_s",
    "cache_vs_recompute" (tokens per second ratio), "recompute_agrees" (its tokens equal the
    cache's), "cache_step_ms" (decode loop, per step)}`` and, for GPT with Flax installed,
    ``"flax_ms", "flax_step_ms", "flax_tokens_per_s", "flax_agrees", "step_ratio"``
    (jlayers' decode step ÷ Flax's).
  """
  new = context - prompt_len
  warmup = max(warmup, 1)  # the compiling call is never timed
  models = charlm_models(context, features=features, layers=layers, heads=heads)
  rng = np.random.default_rng(seed)
  result = {"context": context, "prompt": prompt_len, "new_tokens": new,
            "recompute_steps": recompute_steps, "rows": []}
  for arch in archs:
    model = models[arch]
    params, _ = model.init(jax.random.key(seed), (1, context), input_dtype=jnp.int32)
    recompute = recompute_runner(model, prompt_len, recompute_steps)
    for b in batches:
      prompt = jnp.asarray(rng.integers(0, VOCAB, (b, prompt_len)), jnp.int32)
      cache = functools.partial(generate, model, params, prompt, temperature=0.0,
                                max_length=context)
      runners = {"cache": lambda cache=cache: cache(max_new_tokens=new).tokens,
                 "cache prefill": lambda cache=cache: cache(max_new_tokens=1).tokens,
                 "recompute": functools.partial(recompute, params, prompt)}
      flax = flax_generate_runner(model, b, prompt_len) if arch == "gpt" else None
      if flax is not None:
        fparams = flax_params(params, heads)
        runners["flax"] = functools.partial(flax["run"], fparams, prompt, new)
        runners["flax prefill"] = functools.partial(flax["run"], fparams, prompt, 1)
        result["flax"] = flax["version"]
      ms = {name: statistics.median(times) for name, times in
            peers.time_interleaved(runners, steps, warmup, rounds).items()}
      tokens = np.asarray(runners["cache"]())
      window = np.asarray(runners["recompute"]())
      row = {"model": arch, "batch": b, "param_bytes": _param_bytes(params),
             "cache_bytes_per_token": model.cache_bytes_per_token(),
             "cache_bytes": _kv_cache.nbytes(jax.eval_shape(
                 functools.partial(model.init_cache, b, context))),
             "cache_ms": ms["cache"], "cache_tokens_per_s": 1e3 * b * new / ms["cache"],
             "recompute_ms": ms["recompute"],
             "recompute_tokens_per_s": 1e3 * b * recompute_steps / ms["recompute"],
             "recompute_agrees": bool(np.array_equal(
                 window[:, prompt_len:prompt_len + recompute_steps],
                 tokens[:, :recompute_steps])),
             "cache_step_ms": (ms["cache"] - ms["cache prefill"]) / (new - 1)}
      row["cache_vs_recompute"] = row["cache_tokens_per_s"] / row["recompute_tokens_per_s"]
      if flax is not None:
        row.update(flax_ms=ms["flax"], flax_tokens_per_s=1e3 * b * new / ms["flax"],
                   flax_step_ms=(ms["flax"] - ms["flax prefill"]) / (new - 1),
                   flax_agrees=bool(np.array_equal(np.asarray(runners["flax"]()), tokens)))
        row["step_ratio"] = row["cache_step_ms"] / row["flax_step_ms"]
      result["rows"].append(row)
      del runners
  return result


def print_generate_table(result, out=sys.stdout):
  t, r = GENERATE_TARGET, result
  print(f"Greedy generation (charlm models, vocab {VOCAB}, float32: a {r['prompt']}-token "
        f"prompt continued by {r['new_tokens']} tokens to context {r['context']}). tokens/s "
        f"are of whole generations, except recomputation's (the window's full forward per "
        f"token, a rate over {r['recompute_steps']} steps); ms / decode step is the decode loop "
        f"alone, (whole − prefill and first token) / {r['new_tokens'] - 1}, against "
        f"{r.get('flax', 'Flax linen')}'s decode=True cache. Targets: the cache ≥ "
        f"{t['recompute']:g}× recomputation's tokens/s, jlayers' decode step ≤ {t['flax']:g}× "
        "Flax's:\n", file=out)
  print("| model | batch | cache tokens/s | recompute tokens/s | cache ÷ recompute | same tokens "
        "| jlayers ms / decode step | Flax ms / decode step | jlayers ÷ Flax | Flax tokens/s | "
        "same tokens as Flax |", file=out)
  print("|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|:-:|", file=out)
  for row in result["rows"]:
    flax = ([f"{row['flax_step_ms']:.3f}", f"{row['step_ratio']:.2f}×",
             f"{row['flax_tokens_per_s']:.0f}", "yes" if row["flax_agrees"] else "no"]
            if "flax_ms" in row else ["n/a"] * 4)
    print(f"| {row['model']} | {row['batch']} | {row['cache_tokens_per_s']:.0f} | "
          f"{row['recompute_tokens_per_s']:.0f} | {row['cache_vs_recompute']:.1f}× | "
          f"{'yes' if row['recompute_agrees'] else 'no'} | {row['cache_step_ms']:.3f} | "
          f"{' | '.join(flax)} |", file=out)
  print("\n| model | params | cache bytes / token | batch | cache (batch × context) | cache ÷ "
        "params |", file=out)
  print("|---|---:|---:|---:|---:|---:|", file=out)
  for row in result["rows"]:
    params, cache = row["param_bytes"], row["cache_bytes"]
    print(f"| {row['model']} | {params / 2**20:.2f} MiB | {row['cache_bytes_per_token']} B | "
          f"{row['batch']} | {cache / 2**20:.2f} MiB | {cache / params:.2f}× |", file=out)
  print(file=out)
