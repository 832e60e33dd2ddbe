"""Every rule on an 8-device mesh, data-parallel training, and synchronised batch norm.

All of it runs in ONE subprocess (``tests/mesh_worker.py``): the device count is fixed when JAX
starts, and one process compiles everything once. ``tests/conftest.py`` starts it in the
background when these tests are collected (one pytest-xdist worker does) and puts them last;
they read its report.
"""

import math

import pytest
from helpers import mesh_report

from jlayers.grids import GRIDS

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def report():
  return mesh_report()


def _section(report, name):
  section = report[name]
  assert "traceback" not in section, section.get("traceback")
  return section


def _row(report, name, **match):
  """The one row of section ``name`` whose entries equal ``match``."""
  rows = [r for r in _section(report, name) if all(r[k] == v for k, v in match.items())]
  assert len(rows) == 1, (name, match, len(rows))
  return rows[0]


ROWS = [pytest.param(grid.name, case.id, form, impl, mode,
                     id=f"{grid.name}-{case.id}-{form}-{impl}-{mode}")
        for grid in GRIDS.values() for case in grid.mesh
        for form in (("cpu", "native") if grid.platform_dependent else ("auto",))
        for impl in ("manual", "twin") for mode in ("explicit", "auto")]


def test_every_op_has_mesh_cases():
  assert all(grid.mesh for grid in GRIDS.values())


@pytest.mark.parametrize("op, case, form, impl, mode", ROWS)
def test_rule_on_a_batch_split_over_eight_devices(report, op, case, form, impl, mode):
  """Forward and backward under jit with the batch split over 8 devices (explicit or auto
  axes) compile and equal the one-device result; no manual rule gathers a batch-sized array
  (an all-gather or all-to-all with a dimension of the global batch in the compiled HLO).

  The twin's grouped convolution is XLA's partitioning, not a rule: it gathers the batch
  (``feature_group_count > 1``), which is why the manual rule runs grouped convolutions per
  device. Its count is reported, not asserted."""
  row = _row(report, "ops", op=op, case=case, formulation=form, impl=impl, mode=mode)
  assert row["compiles"], row.get("error")
  assert row["rel_err"] <= REL_TOL, row
  if impl == "manual":
    assert row["batch_sized"] == 0, row["shapes"]


LAYOUT_ROWS = [pytest.param(grid.name, layout.id, impl, form, mode,
                             id=f"{grid.name}-{layout.id}-{impl}-{form}-{mode}")
               for grid in GRIDS.values() for layout in grid.layouts
               for impl, form in (
                   [("manual", f) for f in (("cpu", "native") if grid.platform_dependent
                                            else ("auto",))]
                   + [("twin", "cpu" if grid.platform_dependent else "auto")])
               for mode in ("explicit", "auto")]


@pytest.mark.parametrize("op, layout, impl, form, mode", LAYOUT_ROWS)
def test_rule_with_sharded_parameters_on_a_data_by_model_mesh(report, op, layout, impl, form,
                                                              mode):
  """Parameters sharded as FSDP (over ``data``) or tensor parallelism (over ``model``) shard
  them, the batch split over ``data``, on a 2 × 4 mesh: value and gradient under jit compile
  for the rule (in each formulation: attention's kernels per device, heads split over
  ``model``) and its twin, with explicit and auto axes, equal one device, and each gradient
  comes back laid out as its argument. The manual rule gathers nothing the layout does not
  need: no whole argument but those the layout gathers (FSDP's weights), nothing with the
  global batch (for a vocabulary-parallel cross-entropy, under explicit axes only: auto axes
  hide ``w``'s layout from the rule, which then gathers ``w``)."""
  row = _row(report, "layouts", op=op, layout=layout, impl=impl, formulation=form, mode=mode)
  assert row["compiles"], row.get("error")
  assert row["rel_err"] <= REL_TOL, row
  assert row["laid_out"], row
  if impl == "manual" and (mode == "explicit" or not row["explicit_only"]):
    assert not row["unexpected"], row["shapes"]
  if impl == "manual" and layout.endswith("-fsdp"):  # the weight gathered before its use
    assert row["all_gather"] > 0, row["shapes"]


LOSS_ROWS = [pytest.param(loss, impl, mode, layout, id=f"{loss}-{impl}-{mode}-{layout}")
             for loss in ("softmax_cross_entropy_with_integer_labels", "softmax_cross_entropy",
                          "linear_cross_entropy", "linear_cross_entropy-mean")
             for impl in ("manual", "twin") for mode in ("explicit", "auto")
             for layout in ("split", "replicated", "constant")]


@pytest.mark.parametrize("loss, impl, mode, layout", LOSS_ROWS)
def test_losses_take_labels_and_masks_in_any_sharding(report, loss, impl, mode, layout):
  """Logits (or x) split over 8 devices, labels and ``where`` split likewise, replicated, or
  constants closed over: value and gradient compile and equal the one-device result, and the
  manual rules gather nothing of the batch's size, except the gradient of replicated
  probability labels, which is replicated as they are."""
  row = _row(report, "loss_layouts", loss=loss, impl=impl, mode=mode, layout=layout)
  assert row["compiles"], row.get("error")
  assert row["rel_err"] <= REL_TOL, row
  if impl == "manual" and (loss, layout) != ("softmax_cross_entropy", "replicated"):
    assert row["batch_sized"] == 0, row["shapes"]


@pytest.mark.parametrize("impl", ["manual", "autodiff"])
def test_eight_device_training_step_equals_one_device_step(report, impl):
  """The digits example's step, data-parallel on 8 devices (params and state replicated, the
  batch of 48 split), against the same step on one device: params, batch-norm state and loss
  within 1e-5 relative, and no batch-sized all-gather in the compiled step."""
  result = _section(report, "train_step")[impl]
  assert result["params"] <= REL_TOL and result["state"] <= REL_TOL, result
  assert result["loss"] <= REL_TOL, result
  assert result["batch_sized"] == 0 and result["all_gather"] == 0, result["shapes"]


@pytest.mark.parametrize("impl", ["manual", "autodiff"])
def test_eight_device_transformer_step_equals_one_device_step(report, impl):
  """The character transformer's step (embedding lookups, layer norms, causal attention, tied
  logits, AdamW with clipping), data-parallel on 8 devices against one device: params and
  loss within 1e-5 relative, and no batch-sized all-gather in the compiled step."""
  result = _section(report, "charlm_step")[impl]
  assert result["params"] <= REL_TOL and result["loss"] <= REL_TOL, result
  assert result["batch_sized"] == 0, result["shapes"]


@pytest.mark.parametrize("parallel", ["fsdp", "tensor"])
def test_data_by_model_mesh_training_step_equals_one_device_step(report, parallel):
  """The character transformer's step (Llama architecture) on a 2 × 4 ``data`` × ``model``
  mesh, params laid out by ``jlayers.partitioning``'s FSDP or tensor-parallel rules
  (``jlayers.ModelParallel``), against one device: params, optimizer state and loss within
  1e-5 relative, every param still laid out as placed, and no batch-sized all-gather."""
  result = _section(report, "model_parallel_step")[parallel]
  assert result["split_params"] > 0, result
  for name in ("params", "opt_state", "loss"):
    assert result[name] <= REL_TOL, (name, result)
  assert result["kept"], result
  assert result["batch_sized"] == 0, result["shapes"]
  if parallel == "tensor":  # Megatron's pattern: activation sums only, no gather of a weight
    assert result["all_gather"] == 0, result["shapes"]


def test_init_sharded_makes_the_params_of_init_laid_out_by_the_rules(report):
  """The same draws as ``init`` on one device (the partitioned program rounds its scalings in
  its own order: float32 rounding apart), each param laid out as ``param_specs`` says."""
  result = _section(report, "model_parallel_step")["init_sharded"]
  assert result["rel_err"] <= 1e-6 and result["laid_out"], result


def test_the_transformer_example_trains_on_a_data_by_model_mesh(report):
  result = _section(report, "model_parallel_step")["train"]
  assert result["sample"].startswith("def ") and len(result["sample"]) == 9, result
  assert math.isfinite(result["val_loss"]), result


def test_the_transformer_example_trains_and_samples_on_eight_devices(report):
  result = _section(report, "charlm_step")["train"]
  assert result["sample"].startswith("def ") and len(result["sample"]) == 9, result
  assert math.isfinite(result["val_loss"]), result


@pytest.mark.parametrize("options", ["greedy", "sampled"])
@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_generation_with_the_batch_split_equals_one_device(report, options, mode):
  """``jlayers.generate`` (prefill, the decode loop, the cache's ring buffer, top-k/top-p
  sampling with an end-of-sequence id) with the prompts split over 8 devices: the same tokens
  and lengths as one device, logits within 1e-5, and no gather of any kind (each device writes
  and reads its own rows of the cache)."""
  row = _row(report, "generation", options=options, mode=mode)
  assert row["compiles"], row.get("error")
  assert row["tokens_equal"], row
  assert row["rel_err"] <= REL_TOL, row
  assert row["all_gather"] == 0 and row["all_to_all"] == 0, row["shapes"]


def test_synchronised_batch_norm_over_eight_devices(report):
  """With ``axis_name``, under shard_map, pmap and vmap and with the gradient taken inside or
  outside the mapping, the manual rule and its twin both equal the single-device batch norm of
  the whole batch (float64)."""
  results = _section(report, "sync_batch_norm")
  assert sorted(results) == ["grad(pmap)", "grad(vmap)", "pmap(grad)", "shard_map", "vmap(grad)"]
  for mode, worst in results.items():
    assert worst < 1e-12, mode
