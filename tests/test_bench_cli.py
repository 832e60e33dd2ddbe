"""``python -m jlayers.bench``: a tiny run of the op and linear sections (no timing asserted)."""

import contextlib
import io
import json

from jlayers import bench


def test_bench_reports_ratios_for_an_op_and_linear_throughput():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert bench.main(["--sections", "ops,linear", "--op", "relu", "--op", "max_pool2d",
                       "--steps", "1", "--rounds", "1", "--warmup", "1", "--json"]) == 0
  report = json.loads(out.getvalue())
  assert [(r["op"], r["size"]) for r in report["ops"]] == [
      ("relu", "128x28x28x32"), ("relu", "128x14x14x64"),
      ("max_pool2d", "128x28x28x32-w2"), ("max_pool2d", "128x14x14x64-w2"),
      ("max_pool2d", "128x28x28x32-global")]
  for row in report["ops"]:
    assert row["manual_ms"] > 0 and row["autodiff_ms"] > 0
    assert row["time_ratio"] == row["manual_ms"] / row["autodiff_ms"]
  relu, _, pool, _, global_pool = report["ops"]
  # relu saves a 1-byte mask where autodiff keeps more; max-pool's program differs from autodiff's.
  assert relu["manual_saved"] == 128 * 28 * 28 * 32
  assert relu["manual_saved"] < relu["autodiff_saved"]
  assert pool["same_program"] is False
  assert pool["manual_saved"] == 128 * 14 * 14 * 32  # one int8 index per output
  assert global_pool["manual_saved"] == 0  # reduce_window natively: x itself is the residual
  assert report["linear"]["fraction_of_matmul"] > 0


def test_canonical_hlo_ignores_names_only():
  a = "%fused.3 = f32[2] add(%x.1, %y.2), metadata={op_name=\"a\"}\nROOT %t = (f32[2]) tuple(%fused.3)"
  b = "%fusion = f32[2] add(%p, %q), metadata={op_name=\"b\"}\nROOT %r = (f32[2]) tuple(%fusion)"
  c = "%fusion = f32[2] multiply(%p, %q)\nROOT %r = (f32[2]) tuple(%fusion)"
  assert bench.canonical_hlo(a) == bench.canonical_hlo(b) != bench.canonical_hlo(c)
