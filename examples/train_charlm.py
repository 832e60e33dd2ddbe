"""Train a small character-level transformer with jlayers on the Python Language Reference.

The text is the reference documentation every CPython ships (``pydoc_data.topics.topics``: 79
topics, about 465 000 characters, 103 distinct ones), concatenated in sorted key order; no
download. Characters are the vocabulary; the first 90 % trains, the last 10 % validates.

The model is :class:`jlayers.TransformerLM`, built from jlayers layers only. ``--arch gpt``
(the default): token embedding plus learned positions, pre-norm blocks (LayerNorm → causal
multi-head attention → residual; LayerNorm → Linear → GELU → Linear → residual), a final
LayerNorm and output weights tied to the token embedding. ``--arch llama``
(:meth:`jlayers.TransformerLM.llama`): rotary positions, RMS norms, grouped-query attention
(half as many key/value heads as query heads), a SwiGLU MLP of ``2 · features`` and output
weights tied to the token embedding. Default size: 4 layers, 4 heads, 128
features, context 64. Every backward pass in it is hand-derived; before training, the whole
model's gradients through the rules are compared with autodiff of the twins in float64.

``--pack`` trains on rows packed from the documents (the topics): each row carries segment ids
(one per document fragment in it), positions restart at every document start, attention stays
within a document and no character is predicted across a document boundary. Without it, rows
are windows of the concatenated text, as if it were one document.

Training: mean softmax cross-entropy per character through ``TransformerLM.loss`` (the
hidden states go to :func:`jlayers.linear_cross_entropy`: no logits are formed), optax AdamW (1e-3, β₂ = 0.99, weight decay
0.1 on the matrices) with 100 warm-up steps and cosine decay to 1e-4, gradient clipping at
norm 1, a jit-compiled step. The validation loss (nats per character, over the whole
validation text) is printed every ``--eval-every`` steps and at the end, then a sample is
generated from a prompt.

Run from the repository root (``pip install -e '.[examples]'``)::

    python examples/train_charlm.py                     # 2 000 steps of batch 32
    python examples/train_charlm.py --arch llama        # RoPE, SwiGLU, RMS norm, GQA
    python examples/train_charlm.py --arch llama --pack # rows packed from the documents
    python examples/train_charlm.py --impl autodiff     # the same model through autodiff
    python examples/train_charlm.py --plot curves.png   # train/validation curves
    python examples/train_charlm.py --dtype bfloat16    # bfloat16 compute, float32 params
    python examples/train_charlm.py --remat             # recompute each block's activations
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/train_charlm.py --devices 8     # data-parallel on 8 (CPU) devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/train_charlm.py --mesh 2x4 --parallel tensor  # data x model mesh
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlayers


def load_documents() -> list[str]:
  """The topics of ``pydoc_data.topics`` in sorted key order."""
  from pydoc_data.topics import topics  # noqa: PLC0415

  return [topics[key] for key in sorted(topics)]


def load_text() -> str:
  """The topics of ``pydoc_data.topics`` concatenated in sorted key order."""
  return "".join(load_documents())


class Vocabulary:
  """The distinct characters of a text, sorted: ``encode`` to int32 ids and ``decode`` back."""

  def __init__(self, text: str):
    self.chars = sorted(set(text))
    self.index = {c: i for i, c in enumerate(self.chars)}

  def __len__(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    return np.array([self.index[c] for c in text], np.int32)

  def decode(self, ids) -> str:
    return "".join(self.chars[int(i)] for i in ids)


def load_data(train_fraction: float = 0.9):
  """``(vocabulary, train ids, validation ids)``: int32 ids, the split at 90 % of the text."""
  text = load_text()
  vocab = Vocabulary(text)
  ids = vocab.encode(text)
  cut = int(len(ids) * train_fraction)
  return vocab, ids[:cut], ids[cut:]


def document_ids(length: int) -> np.ndarray:
  """``int32[length]``: the index of the document each character of the text belongs to."""
  sizes = [len(d) for d in load_documents()]
  return np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)[:length]


def build_model(vocab_size: int, *, arch="gpt", context=64, features=128, layers=4, heads=4,
                dtype=None, remat=False) -> jlayers.TransformerLM:
  """``arch="gpt"``: GPT-2's architecture; ``"llama"``: Llama's, with ``heads // 2`` key/value
  heads, a SwiGLU MLP of ``2 · features`` (three matrices: ``6 · features²`` params, against
  GPT's ``8 · features²``) and the output tied to the token embedding (as Llama 3.2's small
  models)."""
  common = {"features": features, "layers": layers, "heads": heads, "dtype": dtype,
            "remat": remat}
  if arch == "gpt":
    return jlayers.TransformerLM.gpt2(vocab_size, context, **common)
  return jlayers.TransformerLM.llama(vocab_size, context, num_kv_heads=max(1, heads // 2),
                                     mlp_features=2 * features, tied=True, **common)


def packing(rows, docs):
  """``(segment ids, positions, where)`` of rows ``int[B, T + 1]`` whose characters belong to
  the documents ``docs: int[B, T + 1]``: a segment per document fragment, positions restarting
  at 0 at each fragment's start, and ``where`` False for a target in another document than its
  input."""
  docs = np.asarray(docs)
  start = np.concatenate([np.ones((len(docs), 1), bool), docs[:, 1:] != docs[:, :-1]], axis=1)
  segments = np.cumsum(start, axis=1).astype(np.int32) - 1
  index = np.arange(docs.shape[1])
  positions = index - np.maximum.accumulate(np.where(start, index, 0), axis=1)
  keep = docs[:, 1:] == docs[:, :-1]
  return segments[:, :-1], positions[:, :-1].astype(np.int32), keep


def token_losses(model, params, ids, *, impl, segments=None, positions=None, where=None):
  """Per-character cross-entropy ``float32[B, T]`` of predicting ``ids[:, 1:]`` from
  ``ids[:, :-1]`` (``ids: int[B, T + 1]``), through ``model.loss`` (no logits formed); packed
  rows take their segment ids, positions and ``where`` (0 where False)."""
  return model.loss(params, ids[:, :-1], ids[:, 1:], where=where, positions=positions,
                    segment_ids=segments, reduction="none", impl=impl)


def loss_fn(model, params, ids, *, impl, packed=None):
  """The mean loss of a batch: ``packed`` is ``None`` or ``(segments, positions, where)``."""
  if packed is None:
    return model.loss(params, ids[:, :-1], ids[:, 1:], impl=impl)
  segments, positions, where = packed
  return model.loss(params, ids[:, :-1], ids[:, 1:], where=where, positions=positions,
                    segment_ids=segments, impl=impl)


def make_optimizer(steps: int, *, lr=1e-3, warmup=100, weight_decay=0.1, clip=1.0):
  """Clipping at global norm ``clip``, then AdamW with linear warm-up and cosine decay to
  ``lr / 10``; weight decay on the matrices (embeddings, kernels) only."""
  warmup = min(warmup, steps - 1)  # at least one step of decay
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                end_value=lr / 10)
  decay = functools.partial(jax.tree_util.tree_map, lambda p: p.ndim >= 2)
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay,
                                 mask=decay)), schedule


def make_train_step(model, optimizer, impl):
  """Jitted ``(params, opt_state, ids, packed=None) -> (params, opt_state, loss)``, params
  and state donated."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model, impl=impl))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, ids, packed=None):
    loss, grads = grad_fn(params, ids, packed=packed)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def random_windows(rng, data, batch_size, context, docs=None):
  """``int32[batch_size, context + 1]`` windows of ``data`` at uniformly random offsets; with
  ``docs`` (the document of each character), also their ``packing``."""
  starts = rng.integers(0, len(data) - context - 1, batch_size)
  rows = np.stack([data[s:s + context + 1] for s in starts])
  if docs is None:
    return rows
  return rows, packing(rows, np.stack([docs[s:s + context + 1] for s in starts]))


def make_evaluate(model, impl):
  """Jitted sum of the per-character losses of a batch of windows, those with ``valid``
  False left out."""

  @jax.jit
  def total(params, ids, valid):
    losses = token_losses(model, params, ids, impl=impl)
    return jnp.sum(jnp.where(valid.reshape(-1, 1), losses, jnp.zeros_like(losses)))

  return total


RULES = {"fsdp": jlayers.partitioning.FSDP, "tensor": jlayers.partitioning.TENSOR,
         "both": jlayers.partitioning.FSDP + jlayers.partitioning.TENSOR}


def placement_for(devices=None, mesh=None, parallel="fsdp"):
  """``jlayers.DataParallel(devices)``, or with ``mesh=(data, model)`` a
  ``jlayers.ModelParallel`` laid out by ``RULES[parallel]``."""
  if mesh is None:
    return jlayers.DataParallel(devices)
  if devices is not None:
    raise ValueError("give devices (data parallel) or mesh (data x model), not both")
  return jlayers.ModelParallel(*mesh, RULES[parallel])


def validation_loss(total_fn, params, data, context, batch_size, placement) -> float:
  """Mean nats per character over ``data`` cut into consecutive windows of ``context + 1``
  (every character after the first of a window is predicted once), in batches padded to
  ``batch_size`` with windows marked invalid."""
  count = (len(data) - 1) // context
  windows = np.stack([data[i * context:(i + 1) * context + 1] for i in range(count)])
  total = 0.0
  for start in range(0, count, batch_size):
    ids = windows[start:start + batch_size]
    valid = np.ones(len(ids), bool)
    pad = batch_size - len(ids)
    if pad:
      ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    total += float(total_fn(params, *placement.split((ids, valid))))
  return total / (count * context)


def generate(model, params, vocab, prompt: str, length: int, key, *, temperature=0.8,
             impl="manual") -> tuple[str, dict]:
  """``prompt`` followed by ``length`` sampled characters, through the key/value cache
  (:func:`jlayers.generate`: the prompt in one pass, then one character per step), and the
  speed: ``{"tokens", "seconds", "tokens_per_second"}`` of the compiled calls.

  The model sees at most ``context`` characters, so the text is sampled in chunks: the first
  continues the prompt up to the context; each next one starts a fresh cache from the last
  ``context // 2`` characters and adds as many (every chunk after the first has one shape, so
  one compiled program serves them all)."""
  context = model.context
  keep = max(1, context // 2)
  ids = list(vocab.encode(prompt))[-(context - 1):]
  first = len(ids)
  timed = {"tokens": 0, "seconds": 0.0}
  shapes = set()
  chunk = 0
  while len(ids) - first < length:
    recent = ids[-keep:] if chunk else ids
    new = context - len(recent)
    t = time.perf_counter()
    out = jlayers.generate(model, params, np.asarray([recent], np.int32), max_new_tokens=new,
                           key=jax.random.fold_in(key, chunk), temperature=temperature,
                           impl=impl)
    tokens = np.asarray(out.tokens[0]).tolist()  # waits for the result
    if (len(recent), new) in shapes:  # compiled before: time it
      timed["tokens"] += new
      timed["seconds"] += time.perf_counter() - t
    shapes.add((len(recent), new))
    ids += tokens
    chunk += 1
  text = prompt + vocab.decode(ids[first:first + length])
  timed["tokens_per_second"] = (timed["tokens"] / timed["seconds"] if timed["seconds"]
                                else float("nan"))
  return text, timed


def gradient_check(model, params, ids) -> tuple[float, float]:
  """``(worst relative difference, largest |key-bias gradient|)`` between the gradients of
  the loss through the manual rules and through autodiff of the twins, in float64.

  Attention's key biases add ``q · b`` to every score of a row, which softmax ignores: their
  exact gradient is 0, so they are reported by their size instead of a ratio of rounding
  errors."""
  with jax.enable_x64(True):
    p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
    diffs = jlayers.grad_differences(
        lambda p, ids, *, impl: loss_fn(model, p, ids, impl=impl), p64, jnp.asarray(ids))
    grads = jax.jit(jax.grad(functools.partial(loss_fn, model, impl="manual")))(p64, ids)
    key_bias = [np.abs(np.asarray(leaf)).max() for path, leaf in
                jax.tree_util.tree_leaves_with_path(grads)
                if "'key'" in jax.tree_util.keystr(path) and "'bias'" in jax.tree_util.keystr(path)]
  worst = max(v for k, v in diffs.items() if not ("'key'" in k and "'bias'" in k))
  return worst, max(key_bias, default=0.0)


def _progress(total):
  """A tqdm bar when tqdm is installed (the examples extra), else ``None``."""
  try:
    from tqdm import tqdm  # noqa: PLC0415
  except ImportError:
    return None
  return tqdm(total=total, unit="step", file=sys.stdout, mininterval=1.0, ascii=True)


def train(*, steps=2000, batch_size=32, arch="gpt", pack=False, context=64, features=128,
          layers=4, heads=4, lr=1e-3, warmup=100, seed=0, impl="manual", dtype=None, remat=False,
          devices=None, mesh=None, parallel="fsdp", eval_every=250, check_grads=True,
          sample_length=300, prompt="The ", log=print, progress=True):
  """Trains and evaluates; returns a dict of the final numbers and the curves.

  ``devices``: data-parallel on a mesh of that many devices. ``mesh=(data, model)``: a
  ``data`` × ``model`` mesh with the params laid out by ``parallel`` (``"fsdp"``: every
  matrix split along its model features over ``data``; ``"tensor"``: heads, MLP features and
  the vocabulary over ``model``; ``"both"``)."""
  start = time.perf_counter()
  vocab, train_ids, val_ids = load_data()
  placement = placement_for(devices, mesh, parallel)
  if batch_size % placement.devices:
    raise ValueError(f"batch size {batch_size} must be a multiple of --devices "
                     f"{placement.devices}")
  model = build_model(len(vocab), arch=arch, context=context, features=features,
                      layers=layers, heads=heads, dtype=dtype, remat=remat)
  docs = document_ids(len(train_ids)) if pack else None
  key = jax.random.key(seed)
  params, _ = model.init(jax.random.fold_in(key, 0), (batch_size, context),
                         input_dtype=jnp.int32)
  n_params = sum(a.size for a in jax.tree_util.tree_leaves(params))
  log(f"text: {len(train_ids) + len(val_ids)} characters ({len(train_ids)} train, "
      f"{len(val_ids)} validation), vocabulary {len(vocab)}; model: {arch}, {layers} layers, "
      f"{heads} "
      f"heads, {features} features, context {context}, {n_params / 1e6:.2f} M params; "
      f"impl={impl}, backend={jax.default_backend()}, devices={placement.devices}"
      f"{'' if mesh is None else f' ({mesh[0]} data x {mesh[1]} model, {parallel})'}, "
      f"dtype={jnp.dtype(dtype or jnp.float32).name}{', remat' if remat else ''}"
      f"{', packed rows' if pack else ''}")

  rng = np.random.default_rng(seed)
  grad_error = key_bias = None
  if check_grads:
    t = time.perf_counter()
    check_model = build_model(len(vocab), arch=arch, context=context, features=features,
                              layers=layers, heads=heads)
    grad_error, key_bias = gradient_check(check_model, params,
                                          random_windows(rng, train_ids, 4, context))
    log(f"gradient check (float64, the whole model, one batch): worst relative difference "
        f"manual vs autodiff {grad_error:.2e} over every param array but the key biases, "
        f"whose exact gradient is 0 (largest |gradient| {key_bias:.1e})  "
        f"({time.perf_counter() - t:.1f} s)")

  optimizer, schedule = make_optimizer(steps, lr=lr, warmup=warmup)
  opt_state = optimizer.init(params)
  step = make_train_step(model, optimizer, impl)
  total_fn = make_evaluate(model, impl)
  eval_batch = max(placement.devices, 64 - 64 % placement.devices)
  history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
  if mesh is None:
    params, opt_state = placement.replicate((params, opt_state))
  else:  # the optimizer state made from the placed params is laid out as they are
    params = placement.place(params)
    with placement.context():
      opt_state = jax.jit(optimizer.init)(params)
  bar = _progress(steps) if progress else None
  t_train = time.perf_counter()
  with placement.context():
    for i in range(1, steps + 1):
      if pack:
        rows, packed = random_windows(rng, train_ids, batch_size, context, docs)
        params, opt_state, loss = step(params, opt_state, *placement.split((rows, packed)))
      else:
        batch = placement.split(random_windows(rng, train_ids, batch_size, context))
        params, opt_state, loss = step(params, opt_state, batch)
      if placement.devices > 1:
        # One step in flight on a mesh. With 8 CPU devices on 2 cores, letting steps queue up
        # (asynchronous dispatch) twice ended in an all-reduce that never gathered all 8
        # devices (XLA:CPU's rendezvous timeout); waiting for each step has not.
        loss.block_until_ready()
      history["step"].append(i)
      history["train_loss"].append(loss)
      if bar is not None and (i % 10 == 0 or i == steps):
        bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{float(schedule(i)):.1e}", refresh=False)
        bar.update(i - bar.n)
      if i % eval_every == 0 or i == steps:
        val = validation_loss(total_fn, params, val_ids, context, eval_batch, placement)
        history["val_step"].append(i)
        history["val_loss"].append(val)
        message = (f"step {i:5d}  train loss {float(loss):.4f}  validation loss {val:.4f} "
                   f"nats/char  ({i / (time.perf_counter() - t_train):.2f} steps/s)")
        if bar is not None:
          bar.write(message)
        else:
          log(message)
  if bar is not None:
    bar.close()
  history["train_loss"] = [float(v) for v in history["train_loss"]]
  train_time = time.perf_counter() - t_train
  val = history["val_loss"][-1]
  log(f"validation loss: {val:.4f} nats/char ({val / math.log(2):.3f} bits/char) after "
      f"{steps} steps; training {train_time:.1f} s ({steps / train_time:.2f} steps/s)")
  text = None
  if sample_length:
    # Through the host: an array put on one device keeps the mesh in its type.
    single = jax.device_put(jax.device_get(params)) if placement.devices > 1 else params
    text, speed = generate(model, single, vocab, prompt, sample_length,
                           jax.random.fold_in(key, 1), impl=impl)
    rate = (f"{speed['tokens_per_second']:,.0f} tokens/s compiled" if speed["seconds"] else
            "too short to time a chunk that was compiled before")
    log(f"sample ({sample_length} characters after the prompt {prompt!r}, through the "
        f"key/value cache: {rate}):\n{text}")
  wall = time.perf_counter() - start
  log(f"total wall time: {wall:.1f} s")
  return {"val_loss": val, "grad_error": grad_error, "key_bias_grad": key_bias,
          "history": history, "sample": text, "wall_time": wall, "train_time": train_time,
          "params": params, "n_params": n_params}


def plot(history, path) -> None:
  """Train (a running mean over 50 steps) and validation curves, as a PNG."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  train = np.asarray(history["train_loss"])
  width = min(50, len(train))
  smooth = np.convolve(train, np.ones(width) / width, mode="valid")
  fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
  ax.plot(history["step"], train, color="tab:blue", alpha=0.2, linewidth=0.8)
  ax.plot(history["step"][width - 1:], smooth, color="tab:blue", label="train (mean of 50)")
  ax.plot(history["val_step"], history["val_loss"], "o-", color="tab:orange",
          label="validation")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/char)")
  ax.set_ylim(top=min(4.0, float(train.max()) + 0.1))
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("jlayers TransformerLM on the Python Language Reference")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--arch", choices=("gpt", "llama"), default="gpt",
                      help="GPT-2's architecture or Llama's (RoPE, SwiGLU, RMS norm, GQA)")
  parser.add_argument("--pack", action="store_true",
                      help="rows packed from the documents, with segment ids")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--context", type=int, default=64)
  parser.add_argument("--features", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
  parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--impl", choices=("manual", "autodiff"), default="manual")
  parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="computation dtype of the layers (params stay float32)")
  parser.add_argument("--remat", action="store_true",
                      help="recompute each block's activations in the backward pass")
  parser.add_argument("--devices", type=int, default=None,
                      help="train data-parallel on a mesh of this many devices")
  parser.add_argument("--mesh", default=None, metavar="DxM",
                      help="train on a data x model mesh, e.g. 2x4 (params laid out by --parallel)")
  parser.add_argument("--parallel", choices=tuple(RULES), default="fsdp",
                      help="with --mesh: FSDP over data, tensor parallelism over model, or both")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (one process per host)")
  parser.add_argument("--eval-every", type=int, default=250,
                      help="validation loss every this many steps")
  parser.add_argument("--no-grad-check", dest="check_grads", action="store_false",
                      help="skip the float64 manual-vs-autodiff gradient comparison")
  parser.add_argument("--sample-length", type=int, default=300)
  parser.add_argument("--prompt", default="The ")
  parser.add_argument("--plot", metavar="FILE", help="write the loss curves to this PNG")
  parser.add_argument("--no-progress", dest="progress", action="store_false",
                      help="no progress bar")
  parser.add_argument("--max-val-loss", type=float, default=None,
                      help="exit with status 1 if the final validation loss is above this")
  args = parser.parse_args(argv)
  for name in ("steps", "batch_size", "context", "features", "layers", "heads", "eval_every"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive")
  if args.lr <= 0 or args.warmup < 0 or args.sample_length < 0:
    parser.error("--lr must be positive, --warmup and --sample-length non-negative")
  if args.devices is not None and args.devices < 1:
    parser.error("--devices must be positive")
  mesh = None
  if args.mesh is not None:
    try:
      mesh = tuple(int(n) for n in args.mesh.lower().split("x"))
    except ValueError:
      mesh = ()
    if len(mesh) != 2 or min(mesh) < 1:
      parser.error(f"--mesh must be DxM with positive D and M (e.g. 2x4), got {args.mesh!r}")
    if args.devices is not None:
      parser.error("--mesh and --devices exclude each other")
  vocab = Vocabulary(load_text())
  unknown = sorted(set(args.prompt) - set(vocab.chars))
  if unknown:
    parser.error(f"--prompt has characters outside the text's vocabulary: {unknown}")
  if args.distributed:
    jax.distributed.initialize()
  dtype = None if args.dtype == "float32" else jnp.dtype(args.dtype)
  result = train(steps=args.steps, batch_size=args.batch_size, arch=args.arch, pack=args.pack,
                 context=args.context,
                 features=args.features, layers=args.layers, heads=args.heads, lr=args.lr,
                 warmup=args.warmup, seed=args.seed, impl=args.impl, dtype=dtype,
                 remat=args.remat, devices=args.devices, mesh=mesh, parallel=args.parallel,
                 eval_every=args.eval_every,
                 check_grads=args.check_grads, sample_length=args.sample_length,
                 prompt=args.prompt, progress=args.progress)
  if args.plot:
    plot(result["history"], args.plot)
    print(f"loss curves written to {args.plot}")
  if args.max_val_loss is not None and result["val_loss"] > args.max_val_loss:
    print(f"validation loss {result['val_loss']:.4f} is above --max-val-loss "
          f"{args.max_val_loss}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
