"""``python -m jlayers.check``: every op's manual gradients against autodiff, from the shell.

For each op of :data:`jlayers.grids.GRIDS` (or of a user's module's ``GRIDS``) and each case
of its grid, runs the checker of :mod:`jlayers.testing` (``jax.vjp`` of the manual rule and of
the autodiff twin on the same inputs and random cotangents) in float32 and (unless
``--no-x64``) float64, and prints one row per case with the largest absolute and relative
errors over the outputs and every gradient, and PASS or FAIL against the platform's
tolerances (:data:`jlayers.testing.PLATFORM_TOLERANCES`). Exits with status 1 if any case
fails.

Examples::

  python -m jlayers.check                       # everything, float32 and float64
  python -m jlayers.check --op conv2d --no-x64  # one op, float32 only
  python -m jlayers.check --max-cases 2         # a quick subset
  python -m jlayers.check --formulation native  # on a CPU, the rules GPUs and TPUs run
  python -m jlayers.check --module mypkg.ops    # your own rules: mypkg.ops.GRIDS

The float32 tolerance depends on the platform (TF32 products on GPU, bfloat16 passes on TPU);
float64 is held to 1e-10 everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import jax

from jlayers import _platform, testing


def load_grids(module_name: str | None) -> dict:
  """jlayers' own grids (:data:`jlayers.grids.GRIDS`), or the ``GRIDS`` (a list of
  :class:`jlayers.testing.Grid`) of a user's module."""
  if module_name is None:
    from jlayers.grids import GRIDS  # noqa: PLC0415
    return GRIDS
  module = importlib.import_module(module_name)
  grids = getattr(module, "GRIDS", None)
  if not isinstance(grids, (list, tuple)) or not all(
      isinstance(g, testing.Grid) for g in grids):
    raise SystemExit(f"{module_name}: expected a list GRIDS of jlayers.testing.Grid, got "
                     f"{type(grids).__name__}")
  return {g.name: g for g in grids}


def run(op_names=None, x64=True, max_cases=None, out=None, as_json=False,
        formulation="auto", module=None):
  """Checks the selected ops of jlayers' grids, or of ``module``'s ``GRIDS`` (the rules
  traced in ``formulation``, see :func:`jlayers.formulation`); returns the number of failing
  cases."""
  out = sys.stdout if out is None else out
  grids = load_grids(module)
  unknown = sorted(set(op_names or ()) - set(grids))
  if unknown:
    raise SystemExit(f"unknown op(s) {unknown}; known: {sorted(grids)}")
  dtypes = ("float32", "float64") if x64 else ("float32",)
  rows, failures, start = [], 0, time.perf_counter()
  if not as_json:
    head = ["op", "case"] + [f"{d} {k}" for d in dtypes for k in ("abs", "rel")] + ["result"]
    print("| " + " | ".join(head) + " |", file=out)
    print("|" + "---|" * len(head), file=out)
  limits = testing.tolerances()
  for name, grid in grids.items():
    if op_names and name not in op_names:
      continue
    for case in grid.cases[:max_cases]:
      errors = {}
      for d in dtypes:
        report = testing.check_case(grid, case, dtype=d, rtol=limits[d], vmap=False,
                                    dtypes=False, raises=False, formulations=(formulation,))
        errors[d] = (report.worst_absolute, report.worst, report.passed)
      passed = all(p for _, _, p in errors.values())
      failures += not passed
      rows.append({"op": name, "case": case.id, "passed": passed,
                   **{f"{d}_{k}": errors[d][i] for d in dtypes
                      for i, k in enumerate(("abs", "rel"))}})
      if not as_json:
        cells = [name, case.id] + [f"{errors[d][i]:.2e}" for d in dtypes for i in (0, 1)]
        print("| " + " | ".join(cells + ["PASS" if passed else "FAIL"]) + " |", file=out,
              flush=True)
  summary = {"cases": len(rows), "failed": failures, "seconds": time.perf_counter() - start,
             "platform": jax.default_backend(), "formulation": formulation,
             "tolerances": {d: limits[d] for d in dtypes}}
  for d in dtypes:
    worst = {}
    for r in rows:
      worst[r["op"]] = max(worst.get(r["op"], 0.0), r[f"{d}_rel"])
    summary[f"worst_{d}_rel"] = worst
  if as_json:
    json.dump({"rows": rows, "summary": summary}, out, indent=1)
    print(file=out)
  else:
    print(f"\n{len(rows)} cases, {len(rows) - failures} passed, {failures} failed "
          f"in {summary['seconds']:.0f} s on {jax.default_backend()} ({formulation} "
          "formulation); tolerances (max relative error): "
          + ", ".join(f"{d} {limits[d]:g}" for d in dtypes), file=out)
    for d in dtypes:
      worst = summary[f"worst_{d}_rel"]
      print(f"worst {d} relative error per op: "
            + ", ".join(f"{op} {v:.1e}" for op, v in worst.items()), file=out)
  return failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jlayers.check", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--op", action="append", metavar="NAME",
                      help="only this op (repeatable)")
  parser.add_argument("--module", metavar="MODULE",
                      help="check the GRIDS of this importable module (e.g. mypkg.ops: a list "
                           "of jlayers.testing.Grid) instead of jlayers' own ops")
  parser.add_argument("--x64", action=argparse.BooleanOptionalAction, default=True,
                      help="also check in float64 (default: on)")
  parser.add_argument("--max-cases", type=int, default=None, metavar="N",
                      help="only the first N cases of each op's grid")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--formulation", choices=_platform.FORMULATIONS, default="auto",
                      help="trace the platform-dependent rules in this formulation (default: "
                           "the one of the platform; 'native' is what GPUs and TPUs run)")
  args = parser.parse_args(argv)
  failures = run(args.op, args.x64, args.max_cases, as_json=args.json,
                 formulation=args.formulation, module=args.module)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
