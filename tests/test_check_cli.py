"""``python -m jlayers.check``: a fast subset over every op, and that a wrong rule fails it."""

import dataclasses
import io
import json

import jax
import jax.numpy as jnp

import jlayers
from jlayers import check
from jlayers.grids import GRIDS


def test_fast_subset_passes_for_every_op():
  out = io.StringIO()
  assert check.run(max_cases=1, out=out) == 0
  text = out.getvalue()
  for name in GRIDS:
    assert f"| {name} |" in text
  assert f"{len(GRIDS)} cases, {len(GRIDS)} passed, 0 failed" in text


@jax.custom_vjp
def _relu_wrong_rule(x):
  return jnp.maximum(x, 0)


_relu_wrong_rule.defvjp(lambda x: (jnp.maximum(x, 0), x),
                        lambda x, g: (jnp.where(x > 0, 1.001 * g, 0),))


def test_a_wrong_backward_fails_and_sets_the_exit_status(monkeypatch):
  grid = dataclasses.replace(GRIDS["relu"],
                             op=jlayers.Op("relu", _relu_wrong_rule, jlayers.reference.relu))
  monkeypatch.setitem(GRIDS, "relu", grid)
  out = io.StringIO()
  assert check.run(["relu"], max_cases=2, out=out, as_json=True) == 2
  report = json.loads(out.getvalue())
  assert [r["passed"] for r in report["rows"]] == [False, False]
  assert 5e-4 < report["summary"]["worst_float64_rel"]["relu"] < 2e-3
  monkeypatch.setattr("sys.argv", ["check", "--op", "relu", "--max-cases", "1", "--no-x64"])
  assert check.main() == 1
