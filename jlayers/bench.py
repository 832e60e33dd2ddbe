"""``python -m jlayers.bench``: manual rules against autodiff (and peers), as same-run ratios.

Three sections, each measured in one run on one machine (jit, warm-up, median of several runs):

* **ops** — forward+backward of every registered op at a realistic size (the registry's bench
  case): milliseconds and compiled temporary memory for the manual rule and the autodiff twin,
  and their ratios (manual / autodiff: below 1 is better).
* **linear throughput** — ``linear`` forward+backward (three matmuls) against one plain matmul
  of the same size, as a fraction of the matmul's FLOP rate.
* **train step** — a whole CNN training step (28×28×1, batch 128, SGD with momentum) with
  jlayers manual, jlayers autodiff and, when installed (``pip install "jlayers[bench]"``), the
  same architecture in Flax linen and PyTorch eager.

Prints a Markdown table; ``--json`` prints the same figures for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jlayers import _verify
from jlayers.registry import OPS


def time_ms(fn, steps: int = 10, warmup: int = 3) -> tuple[float, list[float]]:
  """Median and all wall times in ms of ``fn()`` (its result blocked on), after ``warmup`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(1e3 * (time.perf_counter() - start))
  return statistics.median(times), times


def temp_bytes(jitted, *args) -> int | None:
  """Compiled temporary memory of ``jitted(*args)`` in bytes (None if the backend says nothing)."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def fwd_bwd(fn, case, args):
  """A jitted ``(primals, cotangent) -> (outputs, gradients)`` for one op case."""

  def run(primals, cot):
    out, pullback = jax.vjp(_verify.restrict(fn, case, args), *primals)
    return out, pullback(cot)

  return jax.jit(run)


def bench_op(spec, steps: int, warmup: int, seed: int = 0) -> dict:
  """Manual versus autodiff forward+backward of ``spec.bench`` (float32)."""
  case = spec.bench
  rng = np.random.default_rng(seed)
  args = case.make(rng, jnp.float32)
  primals = tuple(args[i] for i in case.diff)
  cot = _verify.random_like(rng, jax.eval_shape(_verify.restrict(spec.reference, case, args),
                                                *primals))
  row = {"op": spec.name, "size": case.id}
  for impl, fn in (("manual", spec.manual), ("autodiff", spec.reference)):
    f = fwd_bwd(fn, case, args)
    row[f"{impl}_ms"] = time_ms(lambda: f(primals, cot), steps, warmup)[0]  # noqa: B023
    row[f"{impl}_temp"] = temp_bytes(f, primals, cot)
    row[f"{impl}_saved"] = saved_bytes(_verify.restrict(fn, case, args), primals)
  row["time_ratio"] = row["manual_ms"] / row["autodiff_ms"]
  row["temp_ratio"] = (row["manual_temp"] / row["autodiff_temp"]
                       if row["autodiff_temp"] else None)
  row["saved_ratio"] = (row["manual_saved"] / row["autodiff_saved"]
                        if row["autodiff_saved"] else None)
  return row


def saved_bytes(fn, primals) -> int:
  """Bytes ``fn`` keeps for its backward pass that are not its own inputs (residuals)."""
  from jax._src.ad_checkpoint import saved_residuals  # noqa: PLC0415 (no public equivalent)

  return sum(aval.size * aval.dtype.itemsize for aval, why in saved_residuals(fn, *primals)
             if not why.startswith("from the argument"))


def bench_linear_throughput(steps: int, warmup: int, n: int = 1024) -> dict:
  """``linear`` fwd+bwd (3 matmuls of n³ MACs) against one plain ``x @ w`` of the same size."""
  spec = OPS["linear"]
  rng = np.random.default_rng(0)
  x, w, g = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(3))
  matmul = jax.jit(jnp.matmul)
  matmul_ms = time_ms(lambda: matmul(x, w), steps, warmup)[0]
  lin = jax.jit(lambda x, w, g: jax.vjp(spec.manual, x, w)[1](g))
  linear_ms = time_ms(lambda: lin(x, w, g), steps, warmup)[0]
  gflops = 2 * n**3 / matmul_ms / 1e6
  return {"n": n, "matmul_ms": matmul_ms, "linear_fwd_bwd_ms": linear_ms,
          "matmul_gflops": gflops, "linear_gflops": 3 * 2 * n**3 / linear_ms / 1e6,
          "fraction_of_matmul": 3 * matmul_ms / linear_ms}


def _fmt_bytes(b):
  return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt_ratio(r):
  return "n/a" if r is None else f"{r:.2f}×"


def print_tables(report, out=sys.stdout):
  m = report["machine"]
  print(f"Machine: {m['cpu']} ({m['cores']} cores), {m['platform']}, jax {m['jax']}, "
        f"backend {m['backend']}; median of {report['steps']} runs after {report['warmup']} "
        "warm-up.\n", file=out)
  if report.get("ops"):
    print("| op | size | manual ms | autodiff ms | time ratio | manual temp | autodiff temp "
          "| temp ratio | saved for bwd, manual / autodiff |", file=out)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", file=out)
    for r in report["ops"]:
      print(f"| {r['op']} | {r['size']} | {r['manual_ms']:.2f} | {r['autodiff_ms']:.2f} | "
            f"{_fmt_ratio(r['time_ratio'])} | {_fmt_bytes(r['manual_temp'])} | "
            f"{_fmt_bytes(r['autodiff_temp'])} | {_fmt_ratio(r['temp_ratio'])} | "
            f"{_fmt_bytes(r['manual_saved'])} / {_fmt_bytes(r['autodiff_saved'])} |", file=out)
    print(file=out)
  if report.get("linear"):
    r = report["linear"]
    print(f"linear {r['n']}×{r['n']} fwd+bwd: {r['linear_fwd_bwd_ms']:.2f} ms "
          f"({r['linear_gflops']:.0f} GFLOP/s) vs one matmul {r['matmul_ms']:.2f} ms "
          f"({r['matmul_gflops']:.0f} GFLOP/s): {100 * r['fraction_of_matmul']:.0f} % of the "
          "matmul throughput.\n", file=out)


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(terse=True),
          "jax": jax.__version__, "backend": jax.default_backend()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jlayers.bench", description=__doc__.split(
      "\n\n")[0])
  parser.add_argument("--op", action="append", metavar="NAME", help="only this op (repeatable)")
  parser.add_argument("--sections", default="ops,linear,train",
                      help="comma-separated subset of ops,linear,train")
  parser.add_argument("--steps", type=int, default=10, help="timed runs per measurement")
  parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
  parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
  args = parser.parse_args(argv)
  sections = set(args.sections.split(","))
  report = {"machine": machine(), "steps": args.steps, "warmup": args.warmup}
  if "ops" in sections:
    report["ops"] = [bench_op(spec, args.steps, args.warmup) for name, spec in OPS.items()
                     if spec.bench is not None and (not args.op or name in args.op)]
  if "linear" in sections:
    report["linear"] = bench_linear_throughput(args.steps, args.warmup)
  if args.json:
    json.dump(report, sys.stdout, indent=1)
    print()
  else:
    print_tables(report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
