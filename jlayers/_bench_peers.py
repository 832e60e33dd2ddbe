"""The benchmark models in peer libraries (the CNN in Flax linen and PyTorch eager, the
transformer LM in Flax linen), their shared batches and optimisers, and the benchmark's timers.

The CNN: both peers build the same architecture as the jlayers train-step benchmark:

  x: float32[N, 28, 28, 1]  (NHWC; PyTorch gets the NCHW transpose float32[N, 1, 28, 28])
  → conv 3×3, 32, SAME → BatchNorm → ReLU → maxpool 2×2   float32[N, 14, 14, 32]
  → conv 3×3, 64, SAME → BatchNorm → ReLU → maxpool 2×2   float32[N, 7, 7, 64]
  → flatten float32[N, 3136] → linear 128 → ReLU → dropout 0.5 → linear 10  float32[N, 10]

Convolutions carry no bias (BatchNorm's offset makes it redundant). The loss is the mean softmax
cross-entropy against integer labels ``int[N]``; the optimiser is SGD with momentum 0.9 and
learning rate 0.01. BatchNorm runs in training mode (batch statistics, running statistics
updated with momentum 0.99 in Flax's convention, i.e. PyTorch ``momentum=0.01``; eps 1e-5) and
dropout draws a fresh mask every step.

The transformer LM: :func:`flax_transformer_model` builds the architecture of
``jlayers.TransformerLM(103, context)`` (the transformer train-step benchmark), ≈0.81 M params:

  ids: int32[B, T]  (T ≤ context; the batch is int32[B, context + 1], uniform in [0, 103))
  → token embedding [103, 128] + learned position embedding [context, 128]  float32[B, T, 128]
  → 4 pre-norm blocks, each
      x + out(attention(q(LN(x)), k(LN(x)), v(LN(x)), causal))   4 heads of 32, biases
      x + Dense 128(GELU tanh(Dense 512(LN(x))))                  float32[B, T, 128]
  → LayerNorm → logits x @ embeddingᵀ (tied to the token embedding)  float32[B, T, 103]

LayerNorms have eps 1e-5, a scale and an offset; embeddings are initialised with unit-variance
rows, kernels LeCun-normal, biases zero. The model reads ``ids[:, :-1]`` and the loss is the
mean softmax cross-entropy against ``ids[:, 1:]``; the optimiser (:func:`transformer_optimizer`)
clips the global gradient norm to 1 and runs AdamW (learning rate 1e-3, b1 0.9, b2 0.99, weight
decay 0.1 on kernels and embeddings only).

Flax and PyTorch are optional (``pip install "jlayers[bench]"``) and imported only inside the
functions here, so ``import jlayers`` never needs them. Each ``*_runner`` returns ``None`` when
its library is missing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
LEARNING_RATE = 0.01
MOMENTUM = 0.9
BN_MOMENTUM = 0.99  # Flax convention: running = m * running + (1 - m) * batch.
TORCH_BN_MOMENTUM = 0.01  # The same, in PyTorch's convention (1 - m).
BN_EPS = 1e-5
DROPOUT_RATE = 0.5
VOCAB_SIZE = 103
LM_LEARNING_RATE = 1e-3
LM_BETAS = (0.9, 0.99)
LM_WEIGHT_DECAY = 0.1
LM_CLIP_NORM = 1.0
LN_EPS = 1e-5


def time_interleaved(runners: dict[str, Callable[[], Any]], steps: int = 10, warmup: int = 3,
                     rounds: int = 5) -> dict[str, list[float]]:
  """Wall times in ms of several implementations, taken call by call in alternation.

  Each runner is warmed up; then ``steps * rounds`` times, every runner is called once in turn
  (the order reversed every other time), so that drift in the machine's speed (frequency,
  memory bandwidth shared with neighbours) falls on all of them alike and the ratios of their
  medians are fair even when absolute times wander.

  Returns:
    ``{name: [ms of each of the steps * rounds timed calls]}``.
  """
  names = list(runners)
  for name in names:
    for _ in range(warmup):
      jax.block_until_ready(runners[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  for i in range(steps * rounds):
    for name in (names if i % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      jax.block_until_ready(runners[name]())
      times[name].append(1e3 * (time.perf_counter() - start))
  return times


def optax_linear_cross_entropy(x, w, labels, *, reduction: str = "none", **options):
  """The language-model loss as optax users write it: the whole logits ``x @ w``
  (``float[..., V]``), then ``optax.softmax_cross_entropy_with_integer_labels`` per token and
  the reduction (``"none"``, ``"mean"`` or ``"sum"``); differentiated by JAX. No options
  beyond ``reduction`` (the benchmark's cases use none)."""
  import optax  # noqa: PLC0415

  if options:
    raise TypeError(f"optax_linear_cross_entropy takes no {sorted(options)}")
  loss = optax.softmax_cross_entropy_with_integer_labels(x @ w, labels)
  if reduction == "none":
    return loss
  return loss.mean() if reduction == "mean" else loss.sum()


def compiled_step_runner(compiled, carry: tuple, batch: tuple, key: jax.Array,
                         calls: int) -> tuple[Callable[[], Any], int | None]:
  """A no-argument runner of ``compiled(*carry, *batch, key) -> (*carry, loss)`` that feeds each
  call the previous call's (donated) carry and a fresh key, as a training loop does; the
  ``calls`` keys are split up front. Also returns the compiled step's temporary memory."""
  keys = iter(list(jax.random.split(key, calls)))

  def run():
    nonlocal carry
    *new, loss = compiled(*carry, *batch, next(keys))
    carry = tuple(new)
    return loss

  analysis = compiled.memory_analysis()
  return run, None if analysis is None else int(analysis.temp_size_in_bytes)


def synthetic_batch(batch_size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The benchmark's fixed batch, identical for every library.

  Returns:
    ``images: float32[batch_size, 28, 28, 1]`` (NHWC, standard normal) and
    ``labels: int64[batch_size]`` in ``[0, 10)``.
  """
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, *IMAGE_SHAPE), np.float32)
  labels = rng.integers(0, NUM_CLASSES, batch_size)
  return images, labels


def flax_model():
  """The CNN as a Flax linen module: ``apply(variables, x: float32[N, 28, 28, 1], train=...)``.

  Variables are ``{"params": ..., "batch_stats": ...}``; with ``train=True`` the call needs
  ``rngs={"dropout": key}`` and ``mutable=["batch_stats"]``. Returns logits ``float32[N, 10]``.
  """
  import flax.linen as nn  # noqa: PLC0415 (optional dependency)

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):
      for features in (32, 64):
        x = nn.Conv(features, (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS)(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(nn.Dense(128)(x))
      x = nn.Dropout(DROPOUT_RATE, deterministic=not train)(x)
      return nn.Dense(NUM_CLASSES)(x)

  return CNN()


def flax_setup(batch_size: int = 128, seed: int = 0):
  """Initial state, batch and jitted train step of the Flax CNN.

  Returns:
    ``(step, (params, batch_stats, opt_state, x, y), key)`` where ``x: float32[N, 28, 28, 1]``,
    ``y: int32[N]``, and ``step(params, batch_stats, opt_state, x, y, key) -> (params,
    batch_stats, opt_state, loss: float32[])`` is ``jax.jit``-compiled with the first three
    arguments donated, so callers must pass each step's outputs to the next.
  """
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  model = flax_model()
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  images, labels = synthetic_batch(batch_size, seed)
  x, y = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
  init_key, key = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key, x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)

  def step(params, batch_stats, opt_state, x, y, key):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, rngs={"dropout": key}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2)), (params, batch_stats, opt_state, x, y), key


def flax_runner(batch_size: int = 128, seed: int = 0, calls: int = 100) -> dict | None:
  """The jitted Flax training step, ready to time.

  Returns:
    ``{"run": no-argument step, good for ``calls`` calls, "temp_bytes": int | None (compiled
    temporary memory), "version": "flax X.Y.Z"}``, or ``None`` if Flax is not installed.
  """
  try:
    import flax  # noqa: PLC0415
  except ImportError:
    return None
  step, (params, batch_stats, opt_state, x, y), key = flax_setup(batch_size, seed)
  compiled = step.lower(params, batch_stats, opt_state, x, y, key).compile()
  run, temp = compiled_step_runner(compiled, (params, batch_stats, opt_state), (x, y), key, calls)
  return {"run": run, "temp_bytes": temp, "version": f"flax {flax.__version__}"}


def torch_model():
  """The CNN as a ``torch.nn.Sequential``: ``float32[N, 1, 28, 28] -> float32[N, 10]`` logits."""
  from torch import nn  # noqa: PLC0415 (optional dependency)

  def block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding="same", bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=TORCH_BN_MOMENTUM), nn.ReLU(),
            nn.MaxPool2d(2)]

  return nn.Sequential(*block(1, 32), *block(32, 64), nn.Flatten(), nn.Linear(7 * 7 * 64, 128),
                       nn.ReLU(), nn.Dropout(DROPOUT_RATE), nn.Linear(128, NUM_CLASSES))


def torch_setup(batch_size: int = 128, seed: int = 0):
  """Model (in train mode), optimiser, batch and eager train step of the PyTorch CNN.

  Returns:
    ``(step, model, x, y)`` with ``x: float32[N, 1, 28, 28]``, ``y: int64[N]`` and
    ``step() -> loss: float32[]`` (detached) doing zero_grad, forward, loss, backward and an
    SGD update in place. Dropout masks come from torch's generator, seeded with ``seed``.
  """
  import torch  # noqa: PLC0415

  torch.manual_seed(seed)
  model = torch_model()
  model.train()
  opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
  images, labels = synthetic_batch(batch_size, seed)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(labels.astype(np.int64))

  def step():
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()

  return step, model, x, y


def torch_runner(batch_size: int = 128, seed: int = 0) -> dict | None:
  """The PyTorch eager (CPU) training step, ready to time; ``torch.set_num_threads`` is left at
  its default and reported.

  Returns:
    ``{"run": no-argument step, "temp_bytes": None, "version": "torch X.Y.Z (N threads)"}``,
    or ``None`` if PyTorch is not installed.
  """
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  step, *_ = torch_setup(batch_size, seed)
  return {"run": step, "temp_bytes": None,
          "version": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"}


def synthetic_tokens(batch_size: int = 32, context: int = 64, seed: int = 0) -> np.ndarray:
  """The transformer benchmark's fixed batch, identical for every implementation.

  Returns:
    ``ids: int32[batch_size, context + 1]``, uniform in ``[0, VOCAB_SIZE)``: the model reads
    ``ids[:, :-1]`` and predicts ``ids[:, 1:]``.
  """
  rng = np.random.default_rng(seed)
  return rng.integers(0, VOCAB_SIZE, (batch_size, context + 1)).astype(np.int32)


def decay_mask(params):
  """``True`` for the parameters AdamW decays: those of rank ≥ 2 (kernels and embeddings), but
  no bias, so that Flax's per-head attention biases ``[heads, head_size]`` are spared as their
  jlayers counterparts (rank 1) are."""
  def decays(path, leaf):
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    return leaf.ndim >= 2 and name != "bias"

  return jax.tree_util.tree_map_with_path(decays, params)


def transformer_optimizer():
  """The transformer benchmark's optimiser, identical for every implementation: the global
  gradient norm clipped to ``LM_CLIP_NORM``, then AdamW with :func:`decay_mask`."""
  import optax  # noqa: PLC0415

  b1, b2 = LM_BETAS
  return optax.chain(optax.clip_by_global_norm(LM_CLIP_NORM),
                     optax.adamw(LM_LEARNING_RATE, b1=b1, b2=b2, weight_decay=LM_WEIGHT_DECAY,
                                 mask=decay_mask))


def flax_transformer_model(context: int, *, features: int = 128, layers: int = 4,
                           heads: int = 4):
  """The transformer LM as a Flax linen module (see the module docstring):
  ``apply({"params": ...}, ids: int32[B, T]) -> logits float32[B, T, VOCAB_SIZE]``, ``T ≤
  context``. Attention is ``nn.MultiHeadDotProductAttention`` under ``nn.make_causal_mask``."""
  import flax.linen as nn  # noqa: PLC0415 (optional dependency)
  import jax.numpy as jnp  # noqa: PLC0415

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
      h = nn.LayerNorm(epsilon=LN_EPS, name="attention_norm")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=features,
                                              out_features=features, name="attention")(
                                                  h, mask=mask)
      h = nn.LayerNorm(epsilon=LN_EPS, name="mlp_norm")(x)
      h = nn.gelu(nn.Dense(4 * features, name="fc1")(h), approximate=True)
      return x + nn.Dense(features, name="fc2")(h)

  class TransformerLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(VOCAB_SIZE, features, name="embed")
      positions = jnp.arange(ids.shape[1], dtype=jnp.int32).reshape(1, -1)
      x = embed(ids) + nn.Embed(context, features, name="position")(positions)
      mask = nn.make_causal_mask(ids)
      for i in range(layers):
        x = Block(name=f"block_{i}")(x, mask)
      return embed.attend(nn.LayerNorm(epsilon=LN_EPS, name="norm")(x))

  return TransformerLM()


def flax_llama_model(context: int, *, features: int = 128, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, mlp_features: int = 352, rope_base: float = 10000.0):
  """The Llama-configuration LM (``bench.bench_llama``) as a Flax linen module: RMS norms (``nn.RMSNorm``), rotary
  embeddings and the SwiGLU MLP written in plain JAX, grouped-query causal attention through
  ``jax.nn.dot_product_attention``, an untied bias-free head. ``apply({"params": ...}, ids)
  -> logits float32[B, T, VOCAB_SIZE]``."""
  import flax.linen as nn  # noqa: PLC0415 (optional dependency)
  import jax.numpy as jnp  # noqa: PLC0415

  head = features // heads

  def rope(x, positions):  # rotate-half pairs (i, i + H/2)
    f = rope_base ** (-jnp.arange(0, head, 2, dtype=jnp.float32) / head)
    theta = positions[:, None].astype(jnp.float32) * f[None, :]
    cos, sin = jnp.cos(theta)[None, :, None, :], jnp.sin(theta)[None, :, None, :]
    a, b = x[..., :head // 2], x[..., head // 2:]
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      b, t, _ = x.shape
      positions = jnp.arange(t)
      h = nn.RMSNorm(epsilon=1e-5, name="attention_norm")(x)
      q = nn.Dense(heads * head, use_bias=False, name="query")(h).reshape(b, t, heads, head)
      k = nn.Dense(kv_heads * head, use_bias=False, name="key")(h).reshape(b, t, kv_heads, head)
      v = nn.Dense(kv_heads * head, use_bias=False, name="value")(h).reshape(b, t, kv_heads,
                                                                               head)
      o = jax.nn.dot_product_attention(rope(q, positions), rope(k, positions), v,
                                       is_causal=True)
      x = x + nn.Dense(features, use_bias=False, name="out")(o.reshape(b, t, heads * head))
      h = nn.RMSNorm(epsilon=1e-5, name="mlp_norm")(x)
      gate = nn.Dense(mlp_features, use_bias=False, name="gate")(h)
      up = nn.Dense(mlp_features, use_bias=False, name="up")(h)
      return x + nn.Dense(features, use_bias=False, name="down")(jax.nn.silu(gate) * up)

  class LlamaLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
      x = nn.Embed(VOCAB_SIZE, features, name="embed")(ids)
      for i in range(layers):
        x = Block(name=f"block_{i}")(x)
      x = nn.RMSNorm(epsilon=1e-5, name="norm")(x)
      return nn.Dense(VOCAB_SIZE, use_bias=False, name="head")(x)

  return LlamaLM()


def flax_transformer_runner(context: int = 64, batch_size: int = 32, seed: int = 0,
                            calls: int = 100, *, features: int = 128, layers: int = 4,
                            heads: int = 4) -> dict | None:
  """The jitted Flax transformer training step on :func:`synthetic_tokens`, compiled once with
  its params and optimiser state donated, ready to time (as ``bench.transformer_runner``).

  Returns:
    ``{"run": no-argument step, good for ``calls`` calls, "temp_bytes": int | None (compiled
    temporary memory), "version": "flax X.Y.Z"}``, or ``None`` if Flax is not installed.
  """
  return _flax_lm_runner(lambda: flax_transformer_model(context, features=features,
                                                        layers=layers, heads=heads),
                         context, batch_size, seed, calls)


def _flax_lm_runner(build, context: int, batch_size: int, seed: int, calls: int):
  """The training step of the Flax module ``build()`` (logits from ids; mean cross-entropy of
  the next token), or ``None`` if Flax is not installed."""
  try:
    import flax  # noqa: PLC0415
  except ImportError:
    return None
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  model = build()
  ids = jnp.asarray(synthetic_tokens(batch_size, context, seed))
  params = model.init(jax.random.key(seed), ids[:, :-1])["params"]

  def loss_fn(params, ids):
    logits = model.apply({"params": params}, ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  run, temp = lm_step_runner(loss_fn, params, ids, seed, calls)
  return {"run": run, "temp_bytes": temp, "version": f"flax {flax.__version__}"}


def lm_step_runner(loss_fn, params, ids, seed: int, calls: int):
  """The training step ``(params, opt_state, ids, key) -> (params, opt_state, loss)`` of
  ``loss_fn(params, ids)`` with :func:`transformer_optimizer` (the same for every
  implementation), jitted and compiled once with params and optimiser state donated; returns
  :func:`compiled_step_runner`'s ``(run, temp_bytes)``."""
  import optax  # noqa: PLC0415

  tx = transformer_optimizer()

  def step(params, opt_state, ids, key):
    del key  # no dropout: the step is deterministic
    loss, grads = jax.value_and_grad(loss_fn)(params, ids)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  key = jax.random.key(seed + 1)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, ids, key).compile()
  return compiled_step_runner(compiled, (params, opt_state), (ids,), key, calls)


def flax_llama_runner(context: int = 512, batch_size: int = 32, seed: int = 0,
                      calls: int = 100, **arch) -> dict | None:
  """The jitted Flax Llama training step (as :func:`flax_transformer_runner`), or ``None``
  without Flax."""
  return _flax_lm_runner(lambda: flax_llama_model(context, **arch), context, batch_size, seed,
                         calls)
