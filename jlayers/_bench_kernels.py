"""The ``attention_kernels`` section of :mod:`jlayers.bench`: attention's forward+backward in
bfloat16 by jlayers (the Pallas kernels on a GPU or TPU; the XLA form on a CPU) against
``jax.nn.dot_product_attention`` with ``implementation="cudnn"`` (GPUs only) and ``"xla"``, at
B = 4, N = 16 query heads of H = 128, K = 4 and 16 key/value heads, T = S ∈ {1 024, 4 096,
16 384}, causal and not: milliseconds, TFLOP/s and, where the device's bfloat16 peak is known
(:data:`PEAK_TFLOPS`), the fraction of it.

FLOPs are counted as seven products of ``T × S × H`` per head, two in the forward and five in
the backward (the scores again, ``dV``, ``dP``, ``dQ``, ``dK``), ``2·T·S·H`` each, halved when
causal: the convention of FlashAttention-2's figures.
"""

from __future__ import annotations

import functools
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jlayers import _bench_peers as peers

SHAPES = ((1024, 4), (1024, 16), (4096, 4), (4096, 16), (16384, 4), (16384, 16))
"""``(T, K)`` of the section on an accelerator (B = 4, N = 16, H = 128)."""
CPU_SHAPES = ((256, 4),)
"""On a CPU (where the section only checks that it runs): one small shape."""
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L4": 121.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0}
"""Dense bfloat16 peak TFLOP/s by device kind (the vendors' figures, no sparsity)."""
TARGET = {"cudnn": 1.25, "min_t": 4096}
"""jlayers' time ≤ 1.25× cuDNN's at T ≥ 4 096."""


def peak(kind: str) -> float | None:
  return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def flops(b, n, t, s, h, causal) -> float:
  return 7 * 2 * b * n * t * s * h * (0.5 if causal else 1.0)


def bench_attention_kernels(steps: int, warmup: int, rounds: int, seed: int = 0) -> dict:
  """Rows of ``{T, K, causal, ms per implementation, TFLOP/s, fraction of peak, jlayers ÷
  cuDNN}`` (see the module docstring)."""
  from jlayers.attention import dot_product_attention  # noqa: PLC0415

  device = jax.devices()[0]
  on_gpu = device.platform == "gpu"
  shapes = CPU_SHAPES if device.platform == "cpu" else SHAPES
  b, n, h = 4, 16, 128
  rng = np.random.default_rng(seed)
  rows = []
  for t, heads in shapes:
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.bfloat16) for _ in range(2))
    for causal in (False, True):
      impls = {"jlayers": lambda q, k, v, c: dot_product_attention(q, k, v, causal=c),
               "jax.nn xla": lambda q, k, v, c: jax.nn.dot_product_attention(
                   q, k, v, is_causal=c, implementation="xla")}
      if on_gpu:
        impls["jax.nn cudnn"] = lambda q, k, v, c: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn")
      runners = {}
      for name, fn in impls.items():
        def fwd_bwd(q, k, v, fn=fn, causal=causal):
          out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, causal), q, k, v)
          return pullback(out)

        try:
          runner = functools.partial(jax.jit(fwd_bwd), q, k, v)
          jax.block_until_ready(runner())
          runners[name] = runner
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
          print(f"attention_kernels: {name} at T={t}, K={heads}: {type(e).__name__}: {e}",
                file=sys.stderr)
      ms = {name: statistics.median(times) for name, times in
            peers.time_interleaved(runners, steps, warmup, rounds).items()}
      work = flops(b, n, t, t, h, causal)
      top = peak(device.device_kind)
      tflops = {name: work / (m * 1e-3) / 1e12 for name, m in ms.items()}
      rows.append({"T": t, "K": heads, "causal": causal, "ms": ms, "tflops": tflops,
                   "peak_fraction": {name: (f / top if top else None)
                                     for name, f in tflops.items()},
                   "vs_cudnn": (ms["jlayers"] / ms["jax.nn cudnn"]
                                if "jax.nn cudnn" in ms and "jlayers" in ms else None)})
  return {"device": device.device_kind, "platform": device.platform,
          "peak_tflops": peak(device.device_kind), "B": b, "N": n, "H": h, "rows": rows}


def print_attention_kernels_table(result, out=sys.stdout):
  names = sorted({name for r in result["rows"] for name in r["ms"]})
  print(f"Attention forward+backward, bfloat16, B = {result['B']}, N = {result['N']}, "
        f"H = {result['H']}, on {result['device']} (bfloat16 peak "
        f"{result['peak_tflops'] or 'unknown'} TFLOP/s); target: jlayers ≤ "
        f"{TARGET['cudnn']}× cuDNN's time at T ≥ {TARGET['min_t']}:\n", file=out)
  print("| T | K | causal | " + " | ".join(f"{n} ms" for n in names) + " | " +
        " | ".join(f"{n} TFLOP/s (of peak)" for n in names) + " | jlayers ÷ cuDNN |", file=out)
  print("|---:|---:|---|" + "---:|" * (2 * len(names) + 1), file=out)
  for r in result["rows"]:
    ms = [f"{r['ms'][n]:.2f}" if n in r["ms"] else "n/a" for n in names]
    tf = [(f"{r['tflops'][n]:.3g}" + (f" ({r['peak_fraction'][n]:.0%})"
                                      if r["peak_fraction"].get(n) else ""))
          if n in r["tflops"] else "n/a" for n in names]
    ratio = f"{r['vs_cudnn']:.2f}×" if r["vs_cudnn"] else "n/a"
    print(f"| {r['T']} | {r['K']} | {'yes' if r['causal'] else 'no'} | " + " | ".join(ms) +
          " | " + " | ".join(tf) + f" | {ratio} |", file=out)
  print(file=out)
