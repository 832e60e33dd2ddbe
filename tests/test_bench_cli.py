"""``python -m jlayers.bench``: tiny runs of its sections (no timing asserted)."""

import contextlib
import importlib.util
import io
import json

import jax
import pytest

from jlayers import _bench_generate, bench
from jlayers.grids import GRIDS
from jlayers.testing import Case, normal


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


def _small_attention_case(causal):
  def make(rng, dtype):
    return tuple(normal(rng, (2, 64, 2, 8), dtype) for _ in range(3))
  return Case("2x64x2x8" + ("-causal" if causal else ""), make,
              {"causal": True} if causal else {}, diff=(0, 1, 2), batched=(0, 1, 2))


def test_attention_rows_carry_the_jax_nn_peer():
  grid = GRIDS["dot_product_attention"]
  rows = [bench.bench_op(grid, _small_attention_case(causal), 1, 1, 1) for causal in (False, True)]
  for row in rows:
    assert row["peer"] == "jax.nn.dot_product_attention"
    assert row["peer_ms"] > 0 and row["peer_temp"] > 0
    assert row["peer_time_ratio"] == row["manual_ms"] / row["peer_ms"]
    assert row["peer_temp_ratio"] == row["manual_temp"] / row["peer_temp"]
  relu = bench.bench_op(GRIDS["relu"], GRIDS["relu"].cases[0], 1, 1, 1)
  assert "peer" not in relu  # only ops in OP_PEERS get the extra implementation
  out = io.StringIO()
  bench.print_tables({"machine": bench.machine(), "steps": 1, "warmup": 1, "rounds": 1,
                      "ops": [relu, *rows]}, out)
  text = out.getvalue()
  assert "attention: manual vs twin vs jax.nn.dot_product_attention" in text
  assert "0.1× the twin's at T = 2048" in text
  assert text.count("| 2x64x2x8") == 4  # in the op table and in the peer table


def test_transformer_section_in_a_tiny_configuration():
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and float
    results = bench.bench_transformer(1, 1, 1, contexts=(8,), batch_size=2, features=16,
                                      layers=1, heads=2)
  (res,) = results
  assert (res["context"], res["batch"], res["features"]) == (8, 2, 16)
  rows = res["implementations"]
  expected = ["jlayers manual", "jlayers autodiff"]
  if importlib.util.find_spec("flax") is not None:
    expected.append("Flax linen")
  assert list(rows) == expected  # without Flax its row is skipped, not an error
  base = rows["jlayers manual"]
  for r in rows.values():
    assert r["ms"] > 0 and r["fastest_ms"] <= r["ms"] and r["temp_bytes"] > 0
    assert r["manual_time_ratio"] == base["ms"] / r["ms"]
    assert r["manual_temp_ratio"] == base["temp_bytes"] / r["temp_bytes"]
  assert base["manual_time_ratio"] == base["manual_temp_ratio"] == 1.0
  out = io.StringIO()
  bench.print_transformer_table(results, out)
  assert "| 8 | 2 | jlayers autodiff" in out.getvalue()
  assert "≤ 0.8× Flax linen in time and ≤ 0.5× in temporary memory at context 512" in (
      out.getvalue())


def test_bench_rejects_bad_contexts():
  with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):
    bench.main(["--sections", "transformer", "--contexts", "64,x"])


def test_lm_head_section_in_a_tiny_configuration():
  rows = bench.bench_lm_head(1, 1, 1, tokens=16, features=4, vocab=32, memory_vocabs=(64,),
                             reductions=("none",))
  assert [(r["vocab"], r["reduction"], r["timed"]) for r in rows] == [(32, "none", True),
                                                                       (64, "none", False)]
  timed, compiled = rows
  for impl in ("manual", "twin", "optax"):
    assert timed[f"{impl}_ms"] > 0 and timed[f"{impl}_temp"] >= 0 and f"{impl}_ms" not in compiled
  assert timed["time_ratio"] == timed["manual_ms"] / timed["twin_ms"]
  assert compiled["temp_ratio"] == compiled["manual_temp"] / compiled["twin_temp"]
  out = io.StringIO()
  bench.print_lm_head_table(rows, out)
  assert "| 64 | none | not run | not run | not run | n/a | n/a |" in out.getvalue()
  assert "temporary memory ≤ 0.05× the twin's and optax's" in out.getvalue()


def test_generate_section_in_a_tiny_configuration():
  assert "generate" in bench.SECTIONS and "generate" not in bench.DEFAULT_SECTIONS
  result = _bench_generate.bench_generate(1, 1, 1, context=16, prompt_len=4, batches=(2,),
                                          recompute_steps=3, features=16, layers=1, heads=2)
  assert (result["context"], result["prompt"], result["new_tokens"]) == (16, 4, 12)
  rows = result["rows"]
  assert [(r["model"], r["batch"]) for r in rows] == [("gpt", 2), ("llama", 2)]
  gpt, llama = rows
  for r in rows:
    assert r["cache_tokens_per_s"] > 0 and r["recompute_tokens_per_s"] > 0
    assert r["cache_vs_recompute"] == r["cache_tokens_per_s"] / r["recompute_tokens_per_s"]
    assert r["recompute_agrees"]  # the cache and the window's full forward pick the same tokens
    assert r["cache_bytes"] == 2 * 16 * r["cache_bytes_per_token"] + 2 * 4  # + int32 index
  assert gpt["cache_bytes_per_token"] == 2 * 16 * 4 and llama["cache_bytes_per_token"] == 2 * 8 * 4
  if importlib.util.find_spec("flax") is not None:
    assert gpt["flax_agrees"]  # the Flax peer is the same model: the same greedy tokens
    assert gpt["step_ratio"] == gpt["cache_step_ms"] / gpt["flax_step_ms"]
  assert "flax_ms" not in llama  # the Flax peer is GPT only
  out = io.StringIO()
  _bench_generate.print_generate_table(result, out)
  text = out.getvalue()
  assert "| llama | 2 |" in text and "n/a | n/a | n/a | n/a |" in text
  assert "the cache ≥ 10× recomputation's tokens/s, jlayers' decode step ≤ 1× Flax's" in text
