"""The multi-device checks, run by ``tests/test_mesh.py`` in one subprocess on 8 CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``: the device count is fixed when JAX
starts). Writes one JSON object to the path it is given (stdout without one), whole or not at
all; importing this module runs nothing.

* ``ops``: every registry op's mesh cases, manual rule and twin, forward and backward under
  ``jit`` with the batch split over an 8-device mesh, for explicit and auto axes (and both
  formulations of the platform-dependent rules): compiles or not, the relative error against
  the same function on one device, and the collectives of the compiled program.
* ``layouts``: every op's cases with sharded parameters (FSDP, column- and row-parallel,
  heads, vocabulary) on a 2 × 4 ``data`` × ``model`` mesh, against one device.
* ``loss_layouts``: every loss with its labels and ``where`` split as the logits, replicated
  or closed over as constants, explicit and auto axes, against one device.
* ``train_step``: one training step of the digits CNN on 8 devices against 1 device.
* ``charlm_step``: the same for the character transformer of ``examples/train_charlm.py``.
* ``model_parallel_step``: the transformer's step on a 2 × 4 mesh with FSDP and with tensor
  parallelism, against one device.
* ``generation``: :func:`jlayers.generate` (greedy and sampled, a window model) with the
  batch split over 8 devices, explicit and auto axes, against one device.
* ``sync_batch_norm``: batch norm with ``axis_name`` under shard_map, pmap and vmap.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback

DEVICES = 8
COLLECTIVE = re.compile(r"= (\([^=]*?\)|\S+) (all-gather|all-to-all|all-reduce|reduce-scatter|"
                        r"collective-permute)(?:-start)?\(")


def collectives(hlo: str, batch: int) -> dict:
  """Counts of the compiled program's collectives; ``batch_sized`` counts the all-gathers and
  all-to-alls one of whose results has a dimension of the global ``batch`` size."""
  counts = {"all_gather": 0, "all_to_all": 0, "all_reduce": 0, "batch_sized": 0, "shapes": []}
  for shapes, kind in COLLECTIVE.findall(hlo):
    counts[kind.replace("-", "_")] = counts.get(kind.replace("-", "_"), 0) + 1
    counts["shapes"].append(f"{kind} {shapes}")
    dims = [int(d) for s in re.findall(r"\[([\d,]*)\]", shapes) for d in s.split(",") if d]
    if kind in ("all-gather", "all-to-all") and batch in dims:
      counts["batch_sized"] += 1
  return counts


def rel_err(got, want) -> float:
  """The worst relative error over the leaves (``jlayers.testing.error``: entries equal on
  both sides, infinities included, agree); NaN if any leaf's is NaN."""
  import math  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from jlayers.testing import error  # noqa: PLC0415

  errors = [error(a, b).relative for a, b in zip(jax.tree_util.tree_leaves(got),
                                                jax.tree_util.tree_leaves(want))]
  return math.nan if any(map(math.isnan, errors)) else max(errors, default=0.0)


def op_rows() -> list[dict]:
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jlayers  # noqa: PLC0415
  from jlayers import conv, testing  # noqa: PLC0415
  from jlayers.grids import GRIDS
  from jlayers.testing import MESH_BATCH  # noqa: PLC0415

  # Two images' patches per step: each device's 3 images run as 2 chunks of 2 (one padding).
  conv._PATCH_BYTES = 11_000
  rows = []
  for grid in GRIDS.values():
    for case in grid.mesh:
      args = case.make(np.random.default_rng(0), jnp.float32)
      primals = tuple(args[i] for i in case.diff)
      out_shape = jax.eval_shape(testing.restrict(grid.reference, case, args), *primals)
      cot = testing.random_like(np.random.default_rng(1), out_shape)
      forms = ("cpu", "native") if grid.platform_dependent else ("auto",)
      for form in forms:
        for impl, fn in (("manual", grid.manual), ("twin", grid.reference)):
          if impl == "twin" and form != forms[0]:  # the twin has one formulation: its rows again
            rows += [{**row, "formulation": form} for row in rows
                     if row["op"] == grid.name and row["case"] == case.id
                     and row["impl"] == "twin" and row["formulation"] == forms[0]]
            continue

          def run(args, cot, fn=fn, case=case):
            out, pullback = jax.vjp(testing.restrict(fn, case, args),
                                    *(args[i] for i in case.diff))
            return out, pullback(cot)

          with jlayers.formulation(form):
            want = jax.jit(run)(args, cot)
          for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
            row = {"op": grid.name, "case": case.id, "formulation": form, "impl": impl,
                   "mode": mode}
            mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(axis_type,))

            def place(a, batched, mesh=mesh):
              spec_ = P("batch") if batched else P()
              return jax.device_put(a, NamedSharding(mesh, spec_))

            try:
              with jax.set_mesh(mesh), jlayers.formulation(form):
                s_args = tuple(place(a, i in case.batched) for i, a in enumerate(args))
                s_cot = jax.tree_util.tree_map(
                    lambda c: place(c, c.ndim > 0 and c.shape[0] == MESH_BATCH), cot)
                compiled = jax.jit(run).lower(s_args, s_cot).compile()
                got = compiled(s_args, s_cot)
              row.update(compiles=True, rel_err=rel_err(got, want),
                         **collectives(compiled.as_text(), MESH_BATCH))
            except Exception as e:  # noqa: BLE001  (reported, and the test fails on it)
              row.update(compiles=False, error=f"{type(e).__name__}: {e}"[:500])
            rows.append(row)
  return rows


def _whole_gathers(hlo: str, shapes) -> list[str]:
  """The all-gathers of the compiled program whose result has one of ``shapes`` (whole
  arguments) or a dimension of the global batch."""
  from jlayers.testing import MESH_BATCH  # noqa: PLC0415

  found = []
  for result, kind in COLLECTIVE.findall(hlo):
    if kind != "all-gather":
      continue
    for dims in re.findall(r"\[([\d,]*)\]", result):
      dims = tuple(int(d) for d in dims.split(",") if d)
      if dims in shapes or MESH_BATCH in dims:
        found.append(f"{kind} {result}")
  return found


def layout_rows() -> list[dict]:
  """Every registry op's :class:`jlayers.testing.Layout` cases (parameters sharded as FSDP
  or tensor parallelism shard them) on a ``data`` × ``model`` mesh, manual rule and twin,
  value and gradient under ``jit``, explicit and auto axes: compiles or not, the relative
  error against one device, whether each gradient comes back laid out as its argument, and
  the all-gathers the layout does not need (of a whole argument it does not gather, or with
  a dimension of the global batch)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jlayers  # noqa: PLC0415
  from jlayers import testing  # noqa: PLC0415
  from jlayers.grids import GRIDS  # noqa: PLC0415

  names, sizes = tuple(testing.LAYOUT_MESH), tuple(testing.LAYOUT_MESH.values())
  rows = []
  for grid in GRIDS.values():
    for layout in grid.layouts:
      case = layout.case
      args = case.make(np.random.default_rng(0), jnp.float32)
      out_shape = jax.eval_shape(testing.restrict(grid.reference, case, args),
                                 *(args[i] for i in case.diff))
      cot = testing.random_like(np.random.default_rng(1), out_shape)

      def run(primals, args, cot, fn):
        full = list(args)
        for i, a in zip(case.diff, primals):
          full[i] = a
        out, pullback = jax.vjp(lambda *p: case.call(fn, tuple(
            p[case.diff.index(i)] if i in case.diff else a for i, a in enumerate(full))),
                                *primals)
        return out, pullback(cot)

      # The manual rule in each formulation of a platform-dependent rule (attention's kernels
      # run per device, interpreted); the twin has one.
      forms = ("cpu", "native") if grid.platform_dependent else ("auto",)
      for impl, fn, form in [("manual", grid.manual, f) for f in forms] + [
          ("twin", grid.reference, forms[0])]:
        want = jax.jit(run, static_argnums=3)(tuple(args[i] for i in case.diff), args, cot, fn)
        for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
          row = {"op": grid.name, "layout": layout.id, "impl": impl, "mode": mode,
                 "formulation": form, "explicit_only": layout.explicit_only}
          mesh = jax.make_mesh(sizes, names, axis_types=(axis_type,) * len(names))
          try:
            with jax.set_mesh(mesh), jlayers.formulation(form):
              s_args = tuple(jax.device_put(a, NamedSharding(mesh, P(*spec)))
                             for a, spec in zip(args, layout.specs))
              # The cotangent laid out as the next layer would read the output (its per-example
              # parts; statistics such as batch norm's are replicated).
              def place_cot(c, mesh=mesh):
                batched = c.ndim and c.shape[0] == testing.MESH_BATCH
                return jax.device_put(c, NamedSharding(mesh, P(*(layout.out or ()))
                                                       if batched else P()))

              s_cot = jax.tree_util.tree_map(place_cot, cot)
              primals = tuple(s_args[i] for i in case.diff)
              # Auto axes: the types carry no layout, so the gradients' is asked of jit (as a
              # training step asks it of its updated params).
              outs = None if mode == "explicit" else (None, tuple(p.sharding for p in primals))
              compiled = jax.jit(run, static_argnums=3, out_shardings=outs).lower(
                  primals, s_args, s_cot, fn).compile()
              got = compiled(primals, s_args, s_cot)
            laid_out = all(g.sharding.is_equivalent_to(p.sharding, g.ndim)
                           for g, p in zip(got[1], primals))
            hlo = compiled.as_text()
            whole = tuple(tuple(a.shape) for i, a in enumerate(args)
                          if i not in layout.gathered and a.ndim >= 2)
            row.update(compiles=True, rel_err=rel_err(got, want), laid_out=laid_out,
                       unexpected=_whole_gathers(hlo, whole),
                       **collectives(hlo, testing.MESH_BATCH))
          except Exception as e:  # noqa: BLE001  (reported, and the test fails on it)
            row.update(compiles=False, error=f"{type(e).__name__}: {e}"[:500])
          rows.append(row)
  return rows


def loss_layouts() -> list[dict]:
  """Every loss (both cross-entropies and ``linear_cross_entropy``, manual and twin) with the
  logits (or ``x``) split over the batch and the labels and ``where`` split likewise,
  replicated, or NumPy constants the jitted function closes over; value and gradient under
  ``jit``, explicit and auto axes, against the same function on one device."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jlayers  # noqa: PLC0415
  from jlayers.testing import MESH_BATCH  # noqa: PLC0415

  rng = np.random.default_rng(3)
  n = MESH_BATCH
  logits, x = rng.standard_normal((n, 5), np.float32), rng.standard_normal((n, 4), np.float32)
  w = rng.standard_normal((4, 7), np.float32)
  soft = np.exp(rng.standard_normal((n, 5))).astype(np.float32)
  soft /= soft.sum(-1, keepdims=True)
  where = np.arange(n) % 3 != 1
  cases = {  # (function of (diff args, labels, where), diff args, labels)
      "softmax_cross_entropy_with_integer_labels": (
          lambda f, d, y, m: f(d[0], y, where=m, label_smoothing=0.1), (logits,),
          rng.integers(0, 5, n).astype(np.int32)),
      "softmax_cross_entropy": (lambda f, d, y, m: f(d[0], y, where=m), (logits,), soft),
      "linear_cross_entropy": (lambda f, d, y, m: f(d[0], d[1], y, where=m, z_loss=0.01),
                               (x, w), rng.integers(0, 7, n).astype(np.int32)),
      "linear_cross_entropy-mean": (
          lambda f, d, y, m: f(d[0], d[1], y, where=m, reduction="mean"), (x, w),
          rng.integers(0, 7, n).astype(np.int32)),
  }
  rows = []
  for name, (call, diff, labels) in cases.items():
    op = name.split("-")[0]
    for impl, fn in (("manual", getattr(jlayers, op)), ("twin", getattr(jlayers.reference, op))):
      floats = labels.dtype == np.float32

      def run(diff, labels, where, fn=fn, call=call, floats=floats):
        def loss(diff, labels):
          return jnp.sum(call(fn, diff, labels, where))
        argnums = (0, 1) if floats else 0
        return jax.value_and_grad(loss, argnums=argnums)(diff, labels)

      want = jax.jit(run)(diff, labels, where)
      for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
        mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(axis_type,))
        for layout in ("split", "replicated", "constant"):
          row = {"loss": name, "impl": impl, "mode": mode, "layout": layout}
          try:
            with jax.set_mesh(mesh):
              put = lambda a, s, mesh=mesh: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
              s_diff = (put(diff[0], P("batch")), *(put(a, P()) for a in diff[1:]))
              if layout == "constant":
                f = jax.jit(lambda d, run=run, labels=labels: run(d, labels, where))
                args = (s_diff,)
              else:
                spec = P("batch") if layout == "split" else P()
                f, args = jax.jit(run), (s_diff, put(labels, spec), put(where, spec))
              compiled = f.lower(*args).compile()
              got = compiled(*args)
            row.update(compiles=True, rel_err=rel_err(got, want),
                       **collectives(compiled.as_text(), MESH_BATCH))
          except Exception as e:  # noqa: BLE001  (reported, and the test fails on it)
            row.update(compiles=False, error=f"{type(e).__name__}: {e}"[:500])
          rows.append(row)
  return rows


def _example(name="train_digits"):
  from helpers import load_example  # noqa: PLC0415 (tests/ is this script's directory)

  return load_example(name)


def train_step(batch: int = 48) -> dict:
  """One step of the digits example's training loop on one device and on ``DEVICES``, from
  the same params, state, batch and key: the largest relative difference of params, state and
  loss per implementation, and the collectives of the 8-device step."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415

  ex = _example()
  x_train, y_train, _, _ = ex.load_data(0)
  x, y = x_train[:batch], y_train[:batch]
  model = ex.build_model()
  params, state = model.init(jax.random.key(0), x.shape)
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(params)
  key = jax.random.key(1)
  out = {}
  for impl in ("manual", "autodiff"):
    one = ex.make_train_step(model, optimizer, impl)(params, state, opt_state, (x, y), key)
    placement = ex.DataParallel(DEVICES)
    p, s, o = placement.replicate((params, state, opt_state))
    data = placement.split((x, y))
    with placement.context():
      step = ex.make_train_step(model, optimizer, impl)
      compiled = step.lower(p, s, o, data, key).compile()
      many = compiled(p, s, o, data, key)
    out[impl] = {"params": rel_err(many[0], one[0]), "state": rel_err(many[1], one[1]),
                 "loss": rel_err(many[3], one[3]), "loss_value": float(one[3]),
                 **collectives(compiled.as_text(), batch)}
  return out


def charlm_step(batch: int = 24) -> dict:
  """One step of the character transformer's training loop (a small model: one block, context
  8) on one device and on ``DEVICES``, from the same params, optimizer state and batch: the
  largest relative difference of params and loss per implementation, and the collectives of
  the 8-device step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import jlayers  # noqa: PLC0415

  ex = _example("train_charlm")
  vocab, train_ids, _ = ex.load_data()
  model = ex.build_model(len(vocab), context=8, features=16, layers=1, heads=2)
  params, _ = model.init(jax.random.key(0), (batch, 8), input_dtype=jnp.int32)
  optimizer, _ = ex.make_optimizer(10)
  opt_state = optimizer.init(params)
  ids = ex.random_windows(np.random.default_rng(0), train_ids, batch, 8)
  out = {}
  with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 and float
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731 (steps donate)
    for impl in ("manual", "autodiff"):
      one = ex.make_train_step(model, optimizer, impl)(copy(params), copy(opt_state), ids)
      placement = jlayers.DataParallel(DEVICES)
      p, o = placement.replicate(copy((params, opt_state)))
      with placement.context():
        compiled = ex.make_train_step(model, optimizer, impl).lower(
            p, o, placement.split(ids)).compile()
        many = compiled(p, o, placement.split(ids))
      out[impl] = {"params": rel_err(many[0], one[0]), "loss": rel_err(many[2], one[2]),
                   **collectives(compiled.as_text(), batch)}
    # The example's whole loop with --devices: training, validation, then sampling on one
    # device from the mesh-trained params.
    run = ex.train(steps=2, batch_size=16, context=8, features=16, layers=1, heads=2,
                   devices=DEVICES, eval_every=2, check_grads=False, sample_length=5,
                   prompt="def ", log=lambda *_: None, progress=False)
    out["train"] = {"sample": run["sample"], "val_loss": run["val_loss"]}
  return out


def model_parallel_step(batch: int = 8) -> dict:
  """One step of the character transformer's training loop (the Llama architecture: 8 query
  and 4 key/value heads, SwiGLU, tied logits; no bias, whose exact gradient 0 would leave
  AdamW normalising rounding noise) on one device and on a 2 × 4 ``data`` × ``model`` mesh
  with the params laid out for FSDP and for tensor parallelism (``jlayers.ModelParallel``):
  the largest relative difference of params, optimizer state and loss, whether each param
  stays laid out as placed, and the collectives of the mesh step."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  ex = _example("train_charlm")
  vocab, train_ids, _ = ex.load_data()
  model = ex.build_model(len(vocab), arch="llama", context=8, features=32, layers=1, heads=8)
  params, _ = model.init(jax.random.key(0), (batch, 8), input_dtype=jnp.int32)
  optimizer, _ = ex.make_optimizer(10, warmup=0)  # a full-size first update
  opt_state = optimizer.init(params)
  ids = ex.random_windows(np.random.default_rng(0), train_ids, batch, 8)
  out = {}
  with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 and float
    copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # noqa: E731 (steps donate)
    one = ex.make_train_step(model, optimizer, "manual")(copy(params), copy(opt_state), ids)
    for parallel in ("fsdp", "tensor"):
      placement = ex.placement_for(mesh=(2, 4), parallel=parallel)
      p = placement.place(copy(params))
      with placement.context():
        o = jax.jit(optimizer.init)(p)
        o = jax.tree_util.tree_map(lambda a, b: a + b, o, placement.replicate(opt_state))
        compiled = ex.make_train_step(model, optimizer, "manual").lower(
            p, o, placement.split(ids)).compile()
        placed = [a.sharding for a in jax.tree_util.tree_leaves(p)]
        many = compiled(p, o, placement.split(ids))
      kept = all(a.sharding.is_equivalent_to(s, a.ndim)
                 for a, s in zip(jax.tree_util.tree_leaves(many[0]), placed))
      split = sum(any(e is not None for e in s.spec) for s in placed)
      out[parallel] = {"params": rel_err(many[0], one[0]), "opt_state": rel_err(many[1], one[1]),
                       "loss": rel_err(many[2], one[2]), "kept": kept, "split_params": split,
                       **collectives(compiled.as_text(), batch)}
    # Params made already laid out: the values of init, each on its slices only.
    from jlayers import partitioning  # noqa: PLC0415

    mesh = ex.placement_for(mesh=(2, 4), parallel="both").mesh
    rules = partitioning.FSDP + partitioning.TENSOR
    made, _ = partitioning.init_sharded(model, jax.random.key(0), (batch, 8), rules=rules,
                                        mesh=mesh, input_dtype=jnp.int32)
    want = partitioning.param_specs(params, rules, mesh=mesh)
    out["init_sharded"] = {
        "rel_err": rel_err(made, params),
        "laid_out": all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
            jax.tree_util.tree_leaves(made), jax.tree_util.tree_leaves(want)))}
    # The example's loop with --mesh 2x4 --parallel both: training, validation, sampling.
    run = ex.train(steps=2, batch_size=8, context=8, features=16, layers=1, heads=4,
                   mesh=(2, 4), parallel="both", eval_every=2, check_grads=False,
                   sample_length=5, prompt="def ", log=lambda *_: None, progress=False)
    out["train"] = {"sample": run["sample"], "val_loss": run["val_loss"]}
  return out


def generation() -> list[dict]:
  """Greedy (with its logits) and sampled generation from a Mistral-style model (grouped-query
  heads, rotary positions, a window shorter than the sequence) with prompts of several lengths,
  the prompt's batch split over ``DEVICES`` (explicit and auto axes), params replicated:
  whether the tokens equal one device's, the logits' relative difference, and the compiled
  program's collectives."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.sharding import AxisType, NamedSharding  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jlayers  # noqa: PLC0415

  model = jlayers.TransformerLM.mistral(13, 16, features=16, layers=2, heads=4, num_kv_heads=2,
                                        mlp_features=32, sliding_window=3)
  params, _ = model.init(jax.random.key(0), (1, 16), input_dtype=jnp.int32)
  rng = np.random.default_rng(5)
  prompt = rng.integers(0, 13, (DEVICES, 6)).astype(np.int32)
  lengths = rng.integers(1, 7, DEVICES).astype(np.int32)
  options = {"greedy": {"temperature": 0.0, "return_logits": True},
             "sampled": {"key": jax.random.key(7), "top_k": 5, "top_p": 0.9, "eos_id": 2}}
  rows = []
  for name, kw in options.items():
    def run(params, prompt, lengths, kw=kw):
      return jlayers.generate(model, params, prompt, lengths=lengths, max_new_tokens=6, **kw)
    want = jax.jit(run)(params, prompt, lengths)
    for mode, axis_type in (("explicit", AxisType.Explicit), ("auto", AxisType.Auto)):
      row = {"options": name, "mode": mode}
      try:
        mesh = jax.make_mesh((DEVICES,), ("batch",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
          put = lambda a, s, mesh=mesh: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
          args = (jax.tree.map(lambda a: put(a, P()), params), put(prompt, P("batch")),
                  put(lengths, P("batch")))
          compiled = jax.jit(run).lower(*args).compile()
          got = compiled(*args)
        row.update(compiles=True,
                   tokens_equal=bool(np.array_equal(got.tokens, want.tokens)
                                     and np.array_equal(got.lengths, want.lengths)),
                   rel_err=0.0 if got.logits is None else rel_err(got.logits, want.logits),
                   **collectives(compiled.as_text(), DEVICES))
      except Exception as e:  # noqa: BLE001  (reported, and the test fails on it)
        row.update(compiles=False, error=f"{type(e).__name__}: {e}"[:800])
      rows.append(row)
  return rows


def sync_batch_norm() -> dict:
  """Batch norm with ``axis_name`` under shard_map, pmap(grad), grad(pmap), vmap(grad) and
  grad(vmap), manual and twin, against the single-device batch norm of the whole batch, in
  float64: the worst relative error per mode."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415

  import jlayers  # noqa: PLC0415

  d = DEVICES
  with jax.enable_x64(True):
    mesh = jax.make_mesh((d,), ("d",))
    x = jax.random.normal(jax.random.key(0), (d * 2, 3), jnp.float64) * 2 + 1
    w = jax.random.normal(jax.random.key(1), (d * 2, 3), jnp.float64)
    s, o = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 1.0, 2.0])

    def stats_loss(y, m, v, w, s):  # every device holds the same m, v: count them once
      return jnp.sum(w * y) + (jnp.sum(m**2) + jnp.sum(v * s)) / d

    def truth(x, s, o):  # single-device batch norm of the whole batch
      y, m, v = jlayers.reference.batch_norm(x, s, o)
      return jnp.sum(w * y) + jnp.sum(m**2) + jnp.sum(v * s)

    def modes(fn):
      def local(x, w, s, o):
        return stats_loss(*fn(x, s, o, axis_name="d"), w, s)

      xs, ws = x.reshape(d, 2, 3), w.reshape(d, 2, 3)

      def per_device(g):
        return g[0].reshape(-1, 3), g[1].sum(0), g[2].sum(0)

      def sharded(x, s, o):
        return jax.shard_map(lambda x, w, s, o: jax.lax.psum(local(x, w, s, o), "d"), mesh=mesh,
                             in_specs=(P("d"), P("d"), P(), P()), out_specs=P())(
                                 jax.reshard(x, P("d")), jax.reshard(w, P("d")), s, o)

      with jax.set_mesh(mesh):
        yield "shard_map", jax.jit(jax.grad(sharded, argnums=(0, 1, 2)))(x, s, o)
      rep = lambda a: jnp.stack([a] * d)  # noqa: E731
      yield "pmap(grad)", per_device(jax.pmap(jax.grad(local, argnums=(0, 2, 3)), axis_name="d")(
          xs, ws, rep(s), rep(o)))
      g = jax.grad(lambda x, s, o: jax.pmap(local, axis_name="d", in_axes=(0, 0, None, None))(
          x, ws, s, o).sum(), argnums=(0, 1, 2))(xs, s, o)
      yield "grad(pmap)", (g[0].reshape(-1, 3), g[1], g[2])
      yield "vmap(grad)", per_device(jax.vmap(jax.grad(local, argnums=(0, 2, 3)), axis_name="d",
                                              in_axes=(0, 0, None, None))(xs, ws, s, o))
      g = jax.grad(lambda x, s, o: jax.vmap(local, axis_name="d", in_axes=(0, 0, None, None))(
          x, ws, s, o).sum(), argnums=(0, 1, 2))(xs, s, o)
      yield "grad(vmap)", (g[0].reshape(-1, 3), g[1], g[2])

    want = jax.grad(truth, argnums=(0, 1, 2))(x, s, o)
    manual = list(modes(jlayers.batch_norm))  # one generator at a time: each sets a mesh
    twin = list(modes(jlayers.reference.batch_norm))
    return {mode: max(rel_err(m, want), rel_err(t, want))
            for (mode, m), (_, t) in zip(manual, twin)}


def run() -> dict:
  import jax  # noqa: PLC0415

  if jax.device_count() < DEVICES:
    return {"error": f"needs {DEVICES} devices, got {jax.device_count()}"}
  report = {}
  for name, fn in (("ops", op_rows), ("layouts", layout_rows), ("loss_layouts", loss_layouts),
                   ("train_step", train_step),
                   ("charlm_step", charlm_step), ("model_parallel_step", model_parallel_step),
                   ("generation", generation),
                   ("sync_batch_norm", sync_batch_norm)):
    try:
      report[name] = fn()
    except Exception:  # noqa: BLE001  (the test reports the section's traceback)
      report[name] = {"traceback": traceback.format_exc()}
  return report


def main(argv) -> int:
  try:
    report = run()
  except BaseException:  # noqa: BLE001  (a report the tests can show, whatever happened)
    report = {"error": traceback.format_exc()}
  if len(argv) < 2:
    json.dump(report, sys.stdout)
  else:  # written whole, then renamed: a reader never sees half a report
    with open(f"{argv[1]}.part", "w") as f:
      json.dump(report, f)
    os.replace(f"{argv[1]}.part", argv[1])
  return 0 if "error" not in report else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
