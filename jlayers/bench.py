"""``python -m jlayers.bench``: manual rules against autodiff (and peers), as same-run ratios.

Four sections, each measured in one run on one machine (jit, warm-up, then the implementations
timed in alternating rounds so that drift in machine speed falls on all alike; medians):

* **ops** — forward+backward of every op at a realistic size (the bench cases of its grid,
  :data:`jlayers.grids.GRIDS`): milliseconds and compiled temporary memory for the manual rule
  and the autodiff twin, and their ratios (manual / autodiff: below 1 is better). Ops with a peer in
  :data:`OP_PEERS` (``dot_product_attention``: ``jax.nn.dot_product_attention``) also time the
  peer on the same inputs and cotangent, interleaved with the other two, in a table of their own.
* **linear throughput** — ``linear`` forward+backward (three matmuls) against one plain matmul
  of the same size, as a fraction of the matmul's FLOP rate.
* **train step** — a whole CNN training step (28×28×1, batch 128, SGD with momentum) with
  jlayers manual, jlayers autodiff and, when installed (``pip install "jlayers[bench]"``), the
  same architecture in Flax linen and PyTorch eager.
* **transformer** — a whole training step of ``jlayers.TransformerLM(103, context)`` (4 pre-norm
  blocks of 128 features, 4 causal heads, tied logits; batch 32, contexts 64 and 512; global
  norm clipping and AdamW) with jlayers manual, jlayers autodiff and, when installed, the same
  architecture in Flax linen.
* **llama** (only when named in ``--sections``) — a training step of
  ``TransformerLM.llama(103, 512)`` (4 blocks of 128 features, 4 query and 2 key/value heads,
  a SwiGLU MLP of 352; batch 32; the loss through ``TransformerLM.loss``) with jlayers manual,
  jlayers autodiff and a Flax linen peer of the same architecture (its rotary embedding and
  SwiGLU in plain JAX, attention through ``jax.nn.dot_product_attention``).
* **attention_options** (only when named in ``--sections``) — causal
  ``dot_product_attention`` forward+backward (batch 1, 8 heads of 64, float32, manual): the
  soft cap and segment ids against plain causal at T = 2 048, and a local window of 256 at
  T = 2 048 and 8 192 per query row (blocks outside the window are skipped), timed in
  alternating rounds.
* **lm_head** (only when named in ``--sections``: minutes per run) — ``linear_cross_entropy``
  at a language model's size (8 192 tokens, H = 1 024, V = 32 768, float32, value and gradient
  for ``reduction="mean"`` and ``"none"``) against its twin (``linear`` then the cross-entropy,
  autodiff) and optax on the materialised logits; then the compiled temporary memory alone at
  V = 131 072 and 256 000, where the unfused programs would not fit in memory to run.
* **attention_kernels** (only when named in ``--sections``; made for a GPU or TPU) —
  attention's forward+backward in bfloat16 at B = 4, N = 16, H = 128, T up to 16 384: jlayers
  (its Pallas kernels there) against ``jax.nn.dot_product_attention``'s cuDNN and XLA forms, in
  TFLOP/s and fractions of the device's peak (:mod:`jlayers._bench_kernels`; on a CPU one small
  shape, to show that it runs).
* **generate** (only when named in ``--sections``: minutes per run) — greedy generation to
  context 512 with the example's character LMs (GPT and Llama, batch 1 and 8, float32):
  ``jlayers.generate`` through the key/value cache against recomputing the whole window per
  token, and its decode loop against Flax linen's ``decode=True`` cache; the cache's bytes
  next to the params' (:mod:`jlayers._bench_generate`).

Prints a Markdown table; ``--json`` prints the same figures for machines.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlayers import __version__ as jlayers_version
from jlayers import _bench_generate, _bench_kernels, _platform, reference, testing
from jlayers import _bench_peers as peers
from jlayers.grids import GRIDS
from jlayers.layers import BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU
from jlayers.linear import linear_op
from jlayers.linear_cross_entropy import linear_cross_entropy_op
from jlayers.loss import softmax_cross_entropy_with_integer_labels_op as xent_op
from jlayers.models import Sequential
from jlayers.transformer import TransformerLM

DEFAULT_SECTIONS = ("ops", "linear", "train", "transformer")
SECTIONS = (*DEFAULT_SECTIONS, "lm_head", "attention_options", "llama", "generate",
            "attention_kernels")


def temp_bytes(jitted, *args) -> int | None:
  """Compiled temporary memory of ``jitted(*args)`` in bytes (None if the backend says nothing)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


class Peer(NamedTuple):
  """Another library's implementation of an op, benchmarked next to the manual rule and twin.

  ``fn`` takes the op's positional arguments and the keyword configuration of its cases;
  ``title`` and ``label`` name it in the Markdown table, whose heading states ``target``.
  """

  title: str
  name: str
  label: str
  fn: Callable
  target: str


def _jax_nn_attention(q, k, v, *, mask=None, causal=False, scale=None):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal)


OP_PEERS: dict[str, Peer] = {
    "dot_product_attention": Peer(
        "attention", "jax.nn.dot_product_attention", "jax.nn", _jax_nn_attention,
        "target: manual temporary memory ≤ 0.1× the twin's at T = 2048, time ≤ 1.0× the "
        "twin's at both lengths"),
    "linear_cross_entropy": Peer(
        "linear + cross-entropy", "optax.softmax_cross_entropy_with_integer_labels(x @ w)",
        "optax", peers.optax_linear_cross_entropy,
        "the targets are set at a language model's size: see the lm_head section"),
}
"""Peers of jlayers' ops, keyed by op name: :func:`bench_op` times them as a third
implementation."""


def bench_op(grid, case, steps: int, warmup: int, rounds: int, seed: int = 0) -> dict:
  """Manual versus autodiff forward+backward of one of ``grid.bench`` (float32), interleaved
  with the op's peer in :data:`OP_PEERS` if it has one (fields ``peer``, ``peer_ms``,
  ``peer_temp``, ``peer_time_ratio = manual_ms / peer_ms``, ``peer_temp_ratio``)."""
  rng = np.random.default_rng(seed)
  args = case.make(rng, jnp.float32)
  primals = tuple(args[i] for i in case.diff)
  cot = testing.random_like(rng, jax.eval_shape(testing.restrict(grid.reference, case, args),
                                                *primals))
  row = {"op": grid.name, "size": case.id}
  runners, programs = {}, {}
  for impl, fn in (("manual", grid.manual), ("autodiff", grid.reference)):
    f = testing.vjp_runner(fn, case)
    runners[impl] = functools.partial(f, args, primals, cot)
    programs[impl] = canonical_hlo(f.lower(args, primals, cot).compile().as_text())
    row[f"{impl}_temp"] = temp_bytes(f, args, primals, cot)
    row[f"{impl}_saved"] = saved_bytes(testing.restrict(fn, case, args), primals)
  peer = OP_PEERS.get(grid.name)
  if peer is not None:
    f = testing.vjp_runner(peer.fn, case)
    runners["peer"] = functools.partial(f, args, primals, cot)
    row["peer"] = peer.name
    row["peer_temp"] = temp_bytes(f, args, primals, cot)
  for impl, times in peers.time_interleaved(runners, steps, warmup, rounds).items():
    row[f"{impl}_ms"] = statistics.median(times)
  row["time_ratio"] = row["manual_ms"] / row["autodiff_ms"]
  row["same_program"] = programs["manual"] == programs["autodiff"]
  row["temp_ratio"] = (row["manual_temp"] / row["autodiff_temp"]
                       if row["autodiff_temp"] else None)
  row["saved_ratio"] = (row["manual_saved"] / row["autodiff_saved"]
                        if row["autodiff_saved"] else None)
  if peer is not None:
    row["peer_time_ratio"] = row["manual_ms"] / row["peer_ms"]
    row["peer_temp_ratio"] = row["manual_temp"] / row["peer_temp"] if row["peer_temp"] else None
  return row


def per_image(rows) -> dict | None:
  """Manual conv2d fwd+bwd time per image at batch 127 and 128 (28×28×32→64): the patch loop
  pads 127 images to whole chunks instead of needing a divisor of the batch."""
  by_size = {r["size"]: r for r in rows if r["op"] == "conv2d"}
  odd, even = by_size.get("127x28x28x32-3x3to64-same"), by_size.get("128x28x28x32-3x3to64-same")
  if odd is None or even is None:
    return None
  a, b = odd["manual_ms"] / 127, even["manual_ms"] / 128
  return {"batch127_ms_per_image": a, "batch128_ms_per_image": b, "ratio": a / b}


def canonical_hlo(text: str) -> str:
  """Compiled HLO with metadata dropped and every ``%name`` renumbered by first appearance, so
  that two programs compare equal exactly when XLA will run the same instructions."""
  names: dict[str, str] = {}
  lines = [re.sub(r", metadata=\{[^}]*\}", "", line).strip() for line in text.splitlines()
           if " = " in line and "%" in line]
  return "\n".join(re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(), f"%{len(names)}"),
                          line) for line in lines)


def saved_bytes(fn, primals) -> int:
  """Bytes ``fn`` keeps for its backward pass that are not its own inputs (residuals), with the
  platform-dependent rules traced in the formulation of the default backend (tracing alone
  would list the residuals of every platform's formulation)."""
  with _platform.formulation("cpu" if jax.default_backend() == "cpu" else "native"):
    res = testing.saved_residuals(fn, *primals)
  return sum(aval.size * aval.dtype.itemsize for aval, why in res
             if not why.startswith("from the argument"))


def bench_linear_throughput(steps: int, warmup: int, rounds: int, n: int = 1024) -> dict:
  """``linear`` fwd+bwd (output, dx, dw: three n³-MAC matmuls) against one plain ``x @ w``."""
  rng = np.random.default_rng(0)
  x, w, g = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(3))
  matmul = jax.jit(jnp.matmul)
  lin = jax.jit(lambda x, w, g: (lambda out, pullback: (out, pullback(g)))(
      *jax.vjp(linear_op.manual, x, w)))
  times = peers.time_interleaved({"matmul": lambda: matmul(x, w), "linear": lambda: lin(x, w, g)},
                                 steps, warmup, rounds)
  matmul_ms, linear_ms = statistics.median(times["matmul"]), statistics.median(times["linear"])
  return {"n": n, "matmul_ms": matmul_ms, "linear_fwd_bwd_ms": linear_ms,
          "matmul_gflops": 2 * n**3 / matmul_ms / 1e6,
          "linear_gflops": 3 * 2 * n**3 / linear_ms / 1e6,
          "fraction_of_matmul": 3 * matmul_ms / linear_ms}


def cnn() -> Sequential:
  """The benchmark CNN (the same architecture as the Flax and PyTorch peers):
  ``float32[N, 28, 28, 1] -> float32[N, 10]``."""
  def block(features):
    return [Conv2d(features, 3, padding="SAME", use_bias=False), BatchNorm(), ReLU(),
            MaxPool2d(2)]
  return Sequential([*block(32), *block(64), Flatten(), Linear(128), ReLU(),
                     Dropout(peers.DROPOUT_RATE), Linear(peers.NUM_CLASSES)])


def jlayers_runner(impl: str, batch_size: int = 128, seed: int = 0, calls: int = 100) -> dict:
  """The jitted SGD-with-momentum training step of :func:`cnn` on the peers' synthetic batch,
  compiled once with its state donated, ready to time (see ``_bench_peers.flax_runner``)."""
  model = cnn()
  x_np, y_np = peers.synthetic_batch(batch_size, seed)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  params, state = model.init(jax.random.key(seed), x.shape)
  opt = optax.sgd(peers.LEARNING_RATE, momentum=peers.MOMENTUM)
  xent = xent_op.select(impl)

  def loss_fn(params, state, x, y, key):
    logits, state = model.apply(params, state, x, key=key, train=True, impl=impl)
    return jnp.mean(xent(logits, y)), state

  def step(params, state, opt_state, x, y, key):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y, key)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  opt_state = opt.init(params)
  key = jax.random.key(seed + 1)
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      params, state, opt_state, x, y, key).compile()
  run, temp = peers.compiled_step_runner(compiled, (params, state, opt_state), (x, y), key, calls)
  return {"run": run, "temp_bytes": temp, "version": f"jlayers {jlayers_version}"}


def bench_train_step(steps: int, warmup: int, rounds: int) -> dict:
  """jlayers manual and autodiff and the installed peers, timed in alternating rounds."""
  calls = warmup + 1 + steps * rounds
  setups = {"jlayers manual": jlayers_runner("manual", calls=calls),
            "jlayers autodiff": jlayers_runner("autodiff", calls=calls),
            "Flax linen": peers.flax_runner(calls=calls),
            "PyTorch eager": peers.torch_runner()}
  setups = {name: s for name, s in setups.items() if s is not None}
  times = peers.time_interleaved({name: s["run"] for name, s in setups.items()}, steps, warmup,
                                 rounds)
  return {name: {"ms": statistics.median(times[name]), "ms_all": times[name],
                 "temp_bytes": s["temp_bytes"], "version": s["version"]}
          for name, s in setups.items()}


def transformer_runner(impl: str, context: int = 64, batch_size: int = 32, seed: int = 0,
                       calls: int = 100, *, features: int = 128, layers: int = 4,
                       heads: int = 4) -> dict:
  """The jitted training step of ``TransformerLM(VOCAB_SIZE, context)`` on the peers' token
  batch (:func:`_bench_peers.synthetic_tokens`) with their optimiser
  (:func:`_bench_peers.transformer_optimizer`), compiled once with params and optimiser state
  donated, ready to time (see ``_bench_peers.flax_transformer_runner``)."""
  model = TransformerLM(peers.VOCAB_SIZE, context, features=features, layers=layers,
                        heads=heads)
  ids = jnp.asarray(peers.synthetic_tokens(batch_size, context, seed))
  params, _ = model.init(jax.random.key(seed), (batch_size, context), input_dtype=jnp.int32)
  xent = xent_op.select(impl)

  def loss_fn(params, ids):
    logits, _ = model.apply(params, {}, ids[:, :-1], impl=impl)
    return jnp.mean(xent(logits, ids[:, 1:]))

  run, temp = peers.lm_step_runner(loss_fn, params, ids, seed, calls)
  return {"run": run, "temp_bytes": temp, "version": f"jlayers {jlayers_version}"}


TRANSFORMER_TARGET = {"context": 512, "peer": "Flax linen", "time": 0.8, "temp": 0.5}
"""At this context, jlayers manual should take at most ``time`` × the peer's time per step and
``temp`` × its compiled temporary memory."""


def bench_transformer(steps: int, warmup: int, rounds: int, contexts=(64, 512),
                      batch_size: int = 32, *, features: int = 128, layers: int = 4,
                      heads: int = 4) -> list[dict]:
  """The transformer training step of jlayers manual and autodiff and Flax linen (if installed),
  timed in alternating rounds, one context after the other.

  Returns:
    per context, ``{"context", "batch", "features", "layers", "heads", "implementations": {name: {"ms" (median), "ms_all",
    "fastest_ms", "temp_bytes", "version", "manual_time_ratio" (jlayers manual's ms ÷ this),
    "manual_temp_ratio" (its temporary memory ÷ this; None when unknown)}}}``.
  """
  calls = warmup + 1 + steps * rounds
  arch = {"features": features, "layers": layers, "heads": heads}
  results = []
  for context in contexts:
    setups = {"jlayers manual": transformer_runner("manual", context, batch_size, calls=calls,
                                                   **arch),
              "jlayers autodiff": transformer_runner("autodiff", context, batch_size,
                                                     calls=calls, **arch),
              "Flax linen": peers.flax_transformer_runner(context, batch_size, calls=calls,
                                                          **arch)}
    setups = {name: s for name, s in setups.items() if s is not None}
    times = peers.time_interleaved({name: s["run"] for name, s in setups.items()}, steps,
                                   warmup, rounds)
    rows = {name: {"ms": statistics.median(times[name]), "ms_all": times[name],
                   "fastest_ms": min(times[name]), "temp_bytes": s["temp_bytes"],
                   "version": s["version"]} for name, s in setups.items()}
    base = rows["jlayers manual"]
    for r in rows.values():
      r["manual_time_ratio"] = base["ms"] / r["ms"]
      r["manual_temp_ratio"] = (base["temp_bytes"] / r["temp_bytes"]
                                if base["temp_bytes"] is not None and r["temp_bytes"] else None)
    results.append({"context": context, "batch": batch_size, **arch, "implementations": rows})
    del setups  # free this context's compiled steps and state before the next
  return results


LM_HEAD_TARGET = {"temp": 0.05, "time": {"mean": 1.05, "none": 1.4}}
"""``linear_cross_entropy`` at 8 192 tokens, H = 1 024, V = 32 768 (float32, value and
gradient): at most ``temp`` × the twin's and optax's compiled temporary memory, and at most
``time[reduction]`` × the twin's time."""


def _lm_head_twin(x, w, labels, *, reduction="none"):
  """``linear`` then the cross-entropy, both twins (autodiff), then the reduction."""
  loss = reference.softmax_cross_entropy_with_integer_labels(reference.linear(x, w), labels)
  return loss if reduction == "none" else getattr(loss, reduction)()


def bench_lm_head(steps: int, warmup: int, rounds: int, tokens: int = 8192,
                  features: int = 1024, vocab: int = 32768,
                  memory_vocabs: tuple[int, ...] = (131072, 256000),
                  reductions: tuple[str, ...] = ("mean", "none"), seed: int = 0) -> list[dict]:
  """Value and gradient (in ``x`` and ``w``, cotangent 1) of ``linear_cross_entropy`` against
  its twin and optax, float32: timed in alternating rounds at ``vocab``, compiled only (their
  temporary memory) at each of ``memory_vocabs``.

  Returns:
    one row per vocabulary and reduction: ``{"tokens", "features", "vocab", "reduction",
    "timed", "<impl>_temp" and, when timed, "<impl>_ms" for impl in manual, twin, optax,
    "time_ratio" (manual ÷ twin), "optax_time_ratio", "temp_ratio", "optax_temp_ratio"}``.
  """
  impls = {"manual": linear_cross_entropy_op.manual, "twin": _lm_head_twin,
           "optax": peers.optax_linear_cross_entropy}
  rng = np.random.default_rng(seed)
  rows = []
  for v in (vocab, *memory_vocabs):
    timed = v == vocab
    shapes = (((tokens, features), jnp.float32), ((features, v), jnp.float32),
              ((tokens,), jnp.int32))
    if timed:
      args = (jnp.asarray(rng.standard_normal((tokens, features)), jnp.float32),
              jnp.asarray(rng.standard_normal((features, v)) / features**0.5, jnp.float32),
              jnp.asarray(rng.integers(0, v, tokens), jnp.int32))
    else:
      args = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes)
    for reduction in reductions:
      row = {"tokens": tokens, "features": features, "vocab": v, "reduction": reduction,
             "timed": timed}
      runners = {}
      for name, fn in impls.items():
        def value_and_grad(x, w, labels, fn=fn, reduction=reduction):
          loss, pullback = jax.vjp(lambda x, w: fn(x, w, labels, reduction=reduction), x, w)
          return loss, pullback(jnp.ones_like(loss))

        compiled = jax.jit(value_and_grad).lower(*args).compile()
        analysis = compiled.memory_analysis()
        row[f"{name}_temp"] = None if analysis is None else int(analysis.temp_size_in_bytes)
        if timed:
          runners[name] = functools.partial(compiled, *args)
      if timed:
        for name, times in peers.time_interleaved(runners, steps, warmup, rounds).items():
          row[f"{name}_ms"] = statistics.median(times)
        row["time_ratio"] = row["manual_ms"] / row["twin_ms"]
        row["optax_time_ratio"] = row["manual_ms"] / row["optax_ms"]
      for peer, key in (("twin", "temp_ratio"), ("optax", "optax_temp_ratio")):
        row[key] = (row["manual_temp"] / row[f"{peer}_temp"]
                    if row["manual_temp"] is not None and row[f"{peer}_temp"] else None)
      rows.append(row)
      del runners
  return rows


ATTENTION_OPTIONS_TARGET = {"window_per_row": 1.3, "option": 1.2}
"""Per-query-row time at T = 8 192 within ``window_per_row`` × T = 2 048's with a window of
256; soft cap and segment ids within ``option`` × plain causal at T = 2 048."""


LLAMA_TARGET = {"time": 0.75, "temp": 0.4}
"""jlayers manual's training step at most ``time`` × the Flax peer's time and ``temp`` × its
compiled temporary memory."""


def bench_llama(steps: int, warmup: int, rounds: int, context: int = 512,
                batch_size: int = 32) -> dict:
  """The Llama training step (see the module docstring): per implementation ``ms``,
  ``temp_bytes``, and jlayers manual's ratios to it."""
  arch = {"features": 128, "layers": 4, "heads": 4}
  calls = warmup + 1 + steps * rounds
  setups = {}
  model = TransformerLM.llama(peers.VOCAB_SIZE, context, num_kv_heads=2, mlp_features=352,
                              **arch)
  ids = jnp.asarray(peers.synthetic_tokens(batch_size, context, 0))
  params, _ = model.init(jax.random.key(0), (batch_size, context), input_dtype=jnp.int32)
  for impl in ("manual", "autodiff"):
    def loss_fn(params, ids, impl=impl):
      return model.loss(params, ids[:, :-1], ids[:, 1:], impl=impl)

    own = jax.tree_util.tree_map(jnp.copy, params)  # each runner donates its own
    run, temp = peers.lm_step_runner(loss_fn, own, ids, 0, calls)
    setups[f"jlayers {impl}"] = {"run": run, "temp_bytes": temp,
                                 "version": f"jlayers {jlayers_version}"}
  flax = peers.flax_llama_runner(context, batch_size, calls=calls, kv_heads=2,
                                 mlp_features=352, **arch)
  if flax is not None:
    setups["Flax linen"] = flax
  times = peers.time_interleaved({n: s["run"] for n, s in setups.items()}, steps, warmup,
                                 rounds)
  rows = {n: {"ms": statistics.median(times[n]), "temp_bytes": s["temp_bytes"],
              "version": s["version"]} for n, s in setups.items()}
  base = rows["jlayers manual"]
  for r in rows.values():
    r["manual_time_ratio"] = base["ms"] / r["ms"]
    r["manual_temp_ratio"] = (base["temp_bytes"] / r["temp_bytes"]
                              if base["temp_bytes"] is not None and r["temp_bytes"] else None)
  return {"context": context, "batch": batch_size, "implementations": rows}


def print_llama_table(result, out=sys.stdout):
  t = LLAMA_TARGET
  print(f"Llama training step (context {result['context']}, batch {result['batch']}); target: "
        f"jlayers manual ≤ {t['time']}× Flax linen's time and ≤ {t['temp']}× its temporary "
        "memory:\n", file=out)
  print("| implementation | ms / step | temp memory | manual time ÷ this | manual memory ÷ this |",
        file=out)
  print("|---|---:|---:|---:|---:|", file=out)
  for name, r in result["implementations"].items():
    print(f"| {name} ({r['version']}) | {r['ms']:.1f} | {_fmt_bytes(r['temp_bytes'])} | "
          f"{_fmt_ratio(r['manual_time_ratio'])} | {_fmt_ratio(r['manual_temp_ratio'])} |",
          file=out)
  print(file=out)


def bench_attention_options(steps: int, warmup: int, rounds: int, seed: int = 0) -> dict:
  """Milliseconds of causal attention's forward+backward with each option (see the module
  docstring) and the ratios of :data:`ATTENTION_OPTIONS_TARGET`."""
  from jlayers.attention import dot_product_attention  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  runners = {}
  for name, t, options in (("causal", 2048, {}), ("soft cap 30", 2048, {"logits_soft_cap": 30.0}),
                           ("segment ids (4 of 512)", 2048, {"segments": True}),
                           ("window 256, T=2048", 2048, {"local_window_size": (256, 0)}),
                           ("window 256, T=8192", 8192, {"local_window_size": (256, 0)})):
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 8, 64)), jnp.float32) for _ in range(3))
    options = dict(options)
    if options.pop("segments", False):
      options["q_segment_ids"] = jnp.asarray((np.arange(t) // 512)[None], jnp.int32)

    def fwd_bwd(q, k, v, options=options):
      out, pullback = jax.vjp(
          lambda q, k, v: dot_product_attention(q, k, v, causal=True, **options), q, k, v)
      return pullback(out)

    runners[name] = functools.partial(jax.jit(fwd_bwd), q, k, v)
  ms = {n: statistics.median(t) for n, t in
        peers.time_interleaved(runners, steps, warmup, rounds).items()}
  return {"ms": ms,
          "soft_cap_ratio": ms["soft cap 30"] / ms["causal"],
          "segments_ratio": ms["segment ids (4 of 512)"] / ms["causal"],
          "window_per_row_ratio": (ms["window 256, T=8192"] / 8192)
          / (ms["window 256, T=2048"] / 2048)}


def print_attention_options_table(result, out=sys.stdout):
  t = ATTENTION_OPTIONS_TARGET
  print(f"dot_product_attention options (causal, forward+backward, float32, manual); targets: "
        f"soft cap and segment ids ≤ {t['option']}× plain causal, window per query row at "
        f"T = 8192 ≤ {t['window_per_row']}× T = 2048:\n", file=out)
  print("| case | ms |", file=out)
  print("|---|---:|", file=out)
  for name, ms in result["ms"].items():
    print(f"| {name} | {ms:.1f} |", file=out)
  print(f"\nsoft cap ÷ causal {result['soft_cap_ratio']:.2f}×, segment ids ÷ causal "
        f"{result['segments_ratio']:.2f}×, window per row T=8192 ÷ T=2048 "
        f"{result['window_per_row_ratio']:.2f}×\n", file=out)


def print_lm_head_table(rows, out=sys.stdout):
  t = LM_HEAD_TARGET
  a = rows[0]
  print(f"linear_cross_entropy (value and gradient, float32, {a['tokens']} tokens, H = "
        f"{a['features']}) vs its twin (linear then the cross-entropy, autodiff) vs optax on "
        f"the materialised logits; target at V = 32768: temporary memory ≤ {t['temp']}× the "
        f"twin's and optax's, time ≤ {t['time']['mean']}× the twin's for mean and ≤ "
        f"{t['time']['none']}× for none; rows without times are compiled only:\n", file=out)
  print("| V | reduction | manual ms | twin ms | optax ms | manual ÷ twin time | manual ÷ optax "
        "time | manual temp | twin temp | optax temp | manual ÷ twin temp | manual ÷ optax "
        "temp |", file=out)
  print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)
  for r in rows:
    ms = [f"{r[k]:.1f}" if r["timed"] else "not run" for k in ("manual_ms", "twin_ms",
                                                              "optax_ms")]
    ratios = [_fmt_ratio(r.get(k)) for k in ("time_ratio", "optax_time_ratio")]
    print(f"| {r['vocab']} | {r['reduction']} | {' | '.join(ms)} | {' | '.join(ratios)} | "
          f"{_fmt_bytes(r['manual_temp'])} | {_fmt_bytes(r['twin_temp'])} | "
          f"{_fmt_bytes(r['optax_temp'])} | {_fmt_small(r['temp_ratio'])} | "
          f"{_fmt_small(r['optax_temp_ratio'])} |", file=out)
  print(file=out)


def _fmt_bytes(b):
  return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_ratio(r):
  return "n/a" if r is None else f"{r:.2f}×"


def _fmt_small(r):
  """A ratio to three significant digits (memory ratios far below 0.01)."""
  return "n/a" if r is None else f"{r:.3g}×"


def print_tables(report, out=sys.stdout):
  m = report["machine"]
  print(f"Machine: {m['cpu']} ({m['cores']} cores), {m['platform']}, jax {m['jax']}, "
        f"backend {m['backend']}; median of {report['rounds']} alternating rounds × "
        f"{report['steps']} runs after {report['warmup']} warm-up; 1-minute load average "
        f"{m['load_average_1min']:.1f} at the start.\n", file=out)
  if report.get("ops"):
    print("| op | size | manual ms | autodiff ms | time ratio | same XLA program | manual temp "
          "| autodiff temp | temp ratio | saved for bwd, manual / autodiff |", file=out)
    print("|---|---|---:|---:|---:|:-:|---:|---:|---:|---:|", file=out)
    for r in report["ops"]:
      print(f"| {r['op']} | {r['size']} | {r['manual_ms']:.2f} | {r['autodiff_ms']:.2f} | "
            f"{_fmt_ratio(r['time_ratio'])} | {'yes' if r['same_program'] else 'no'} | "
            f"{_fmt_bytes(r['manual_temp'])} | "
            f"{_fmt_bytes(r['autodiff_temp'])} | {_fmt_ratio(r['temp_ratio'])} | "
            f"{_fmt_bytes(r['manual_saved'])} / {_fmt_bytes(r['autodiff_saved'])} |", file=out)
    print(file=out)
    for op, peer in OP_PEERS.items():
      rows = [r for r in report["ops"] if r["op"] == op and "peer" in r]
      if rows:
        print_peer_table(peer, rows, out)
  if report.get("per_image"):
    r = report["per_image"]
    print(f"conv2d fwd+bwd per image (manual, 28×28×32→64): batch 127 "
          f"{r['batch127_ms_per_image']:.3f} ms, batch 128 {r['batch128_ms_per_image']:.3f} ms: "
          f"{r['ratio']:.2f}× .\n", file=out)
  if report.get("linear"):
    r = report["linear"]
    print(f"linear {r['n']}×{r['n']} fwd+bwd: {r['linear_fwd_bwd_ms']:.2f} ms "
          f"({r['linear_gflops']:.0f} GFLOP/s) vs one matmul {r['matmul_ms']:.2f} ms "
          f"({r['matmul_gflops']:.0f} GFLOP/s): {100 * r['fraction_of_matmul']:.0f} % of the "
          "matmul throughput.\n", file=out)
  if report.get("train"):
    rows = report["train"]
    base = rows["jlayers manual"]
    print("CNN training step (28×28×1, batch 128, conv32-BN-ReLU-pool-conv64-BN-ReLU-pool-"
          "linear128-ReLU-dropout-linear10, SGD momentum):\n", file=out)
    print("| implementation | ms / step (median) | fastest | temp memory | jlayers manual time "
          "÷ this | jlayers manual memory ÷ this |", file=out)
    print("|---|---:|---:|---:|---:|---:|", file=out)
    for name, r in rows.items():
      mem = (base["temp_bytes"] / r["temp_bytes"]) if r.get("temp_bytes") else None
      print(f"| {name} ({r['version']}) | {r['ms']:.1f} | {min(r['ms_all']):.1f} | "
            f"{_fmt_bytes(r.get('temp_bytes'))} | {_fmt_ratio(base['ms'] / r['ms'])} | "
            f"{_fmt_ratio(mem)} |", file=out)
    print(file=out)
  if report.get("transformer"):
    print_transformer_table(report["transformer"], out)
  if report.get("lm_head"):
    print_lm_head_table(report["lm_head"], out)
  if report.get("attention_options"):
    print_attention_options_table(report["attention_options"], out)
  if report.get("llama"):
    print_llama_table(report["llama"], out)
  if report.get("generate"):
    _bench_generate.print_generate_table(report["generate"], out)
  if report.get("attention_kernels"):
    _bench_kernels.print_attention_kernels_table(report["attention_kernels"], out)


def print_peer_table(peer: Peer, rows, out=sys.stdout):
  """The rows of one op with a peer: manual, twin and peer side by side."""
  p = peer.label
  print(f"{peer.title}: manual vs twin vs {peer.name} (fwd+bwd, float32; {peer.target}):\n",
        file=out)
  print(f"| size | manual ms | twin ms | {p} ms | manual ÷ twin time | manual ÷ {p} time | "
        f"manual temp | twin temp | {p} temp | manual ÷ twin temp | manual ÷ {p} temp |",
        file=out)
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", file=out)
  for r in rows:
    print(f"| {r['size']} | {r['manual_ms']:.2f} | {r['autodiff_ms']:.2f} | {r['peer_ms']:.2f} | "
          f"{_fmt_ratio(r['time_ratio'])} | {_fmt_ratio(r['peer_time_ratio'])} | "
          f"{_fmt_bytes(r['manual_temp'])} | {_fmt_bytes(r['autodiff_temp'])} | "
          f"{_fmt_bytes(r['peer_temp'])} | {_fmt_ratio(r['temp_ratio'])} | "
          f"{_fmt_ratio(r['peer_temp_ratio'])} |", file=out)
  print(file=out)


def print_transformer_table(results, out=sys.stdout):
  t, a = TRANSFORMER_TARGET, results[0]
  print(f"Transformer LM training step (vocab {peers.VOCAB_SIZE}, token + position embedding, "
        f"{a['layers']} pre-norm blocks of {a['features']} features with {a['heads']} causal "
        f"heads and a {4 * a['features']} GELU MLP, tied logits; clip-by-global-norm 1 + "
        "AdamW):\n", file=out)
  print("| context | batch | implementation | ms / step (median) | fastest | temp memory | "
        "jlayers manual time ÷ this | jlayers manual memory ÷ this |", file=out)
  print("|---:|---:|---|---:|---:|---:|---:|---:|", file=out)
  for res in results:
    for name, r in res["implementations"].items():
      print(f"| {res['context']} | {res['batch']} | {name} ({r['version']}) | {r['ms']:.1f} | "
            f"{r['fastest_ms']:.1f} | {_fmt_bytes(r['temp_bytes'])} | "
            f"{_fmt_ratio(r['manual_time_ratio'])} | {_fmt_ratio(r['manual_temp_ratio'])} |",
            file=out)
  print(f"\nTarget: jlayers manual ≤ {t['time']}× {t['peer']} in time and ≤ {t['temp']}× in "
        f"temporary memory at context {t['context']}.\n", file=out)


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(terse=True),
          "jax": jax.__version__, "backend": jax.default_backend(),
          "load_average_1min": os.getloadavg()[0]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jlayers.bench", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("--op", action="append", metavar="NAME", help="only this op (repeatable)")
  parser.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but "
                      "lm_head)")
  parser.add_argument("--contexts", default="64,512",
                      help="comma-separated contexts of the transformer section (batch 32)")
  parser.add_argument("--steps", type=int, default=10, help="timed runs per measurement")
  parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
  parser.add_argument("--rounds", type=int, default=5,
                      help="alternating rounds: implementations are timed in turn, steps each")
  parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
  args = parser.parse_args(argv)
  sections = set(args.sections.split(","))
  if sections - set(SECTIONS) or set(args.op or ()) - set(GRIDS):
    parser.error(f"unknown section or op: {sorted(sections - set(SECTIONS))} "
                 f"{sorted(set(args.op or ()) - set(GRIDS))}; ops: {', '.join(GRIDS)}")
  try:
    contexts = tuple(int(c) for c in args.contexts.split(","))
  except ValueError:
    contexts = ()
  if not contexts or min(contexts) < 1:
    parser.error(f"--contexts must be comma-separated positive integers, got {args.contexts!r}")
  report = {"machine": machine(), "steps": args.steps, "warmup": args.warmup,
            "rounds": args.rounds}
  if "ops" in sections:
    report["ops"] = [bench_op(grid, case, args.steps, args.warmup, args.rounds)
                     for name, grid in GRIDS.items() if not args.op or name in args.op
                     for case in grid.bench]
    report["per_image"] = per_image(report["ops"])
  if "linear" in sections:
    report["linear"] = bench_linear_throughput(args.steps, args.warmup, args.rounds)
  if "train" in sections:
    report["train"] = bench_train_step(args.steps, args.warmup, args.rounds)
  if "transformer" in sections:
    report["transformer"] = bench_transformer(args.steps, args.warmup, args.rounds, contexts)
  if "lm_head" in sections:
    report["lm_head"] = bench_lm_head(args.steps, args.warmup, args.rounds)
  if "llama" in sections:
    report["llama"] = bench_llama(args.steps, args.warmup, args.rounds)
  if "generate" in sections:
    report["generate"] = _bench_generate.bench_generate(args.steps, args.warmup, args.rounds)
  if "attention_options" in sections:
    report["attention_options"] = bench_attention_options(args.steps, args.warmup,
                                                          args.rounds)
  if "attention_kernels" in sections:
    report["attention_kernels"] = _bench_kernels.bench_attention_kernels(
        args.steps, args.warmup, args.rounds)
  if args.json:
    json.dump(report, sys.stdout, indent=1)
    print()
  else:
    print_tables(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
