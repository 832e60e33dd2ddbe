"""Attention's Pallas kernels (Triton for GPUs, Mosaic for TPUs) proven on a CPU: run through
the op in Pallas's interpret mode (``jlayers.formulation("native")``) over every case of the
attention grid (every option, odd lengths, rows that see nothing) against autodiff of the twin
in float64; in bfloat16 against the XLA form's own error; and lowered for ``cuda``, ``rocm``
and ``tpu``, with the fallbacks taking the XLA form. Interpret mode runs a kernel's grid one
program at a time: the grid's shapes are small, and its cases run a few per compiled program.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jlayers
from jlayers import _attention_kernels, _attention_platforms, reference, testing
from jlayers.grids import GRIDS

GRID = GRIDS["dot_product_attention"]
BACKENDS = ("triton", "mosaic")
MOSAIC_CASES = (  # one or two cases per option, several blocks, rows that see nothing
    ("gqa-b2t4n4s5k2h3-maskfull-emptyrow", "mqa-b1t150n2s140k1h2-causal-blocks",
     "mha-b1t130n2s200k2h2-blocks-mask", "gqa-b2t9n4s9k2h3-window2",
     "mqa-b1t140n2s150k1h2-window-blocks2", "gqa-b2t7n4s6k2h3-causal-softcap"),
    ("mha-b2t9n2s11k2h3-segments-tneqs", "gqa-b2t7n4s8k2h3-lengths",
     "gqa-b2t6n4s7k2h3-causal-bias1nt1-sinks", "mha-b2t6n2s7k2h3-biasfull",
     "mqa-b2t5n4s5k1h3-causal-residual", "gqa-b2t9n4s9k2h3-causal-everything"))


@pytest.fixture
def x64():
  """float64 switched on for the whole process while the test runs: the Mosaic interpreter
  runs the kernel in callbacks, on threads that do not see ``jax.enable_x64``'s context."""
  before = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("ids", MOSAIC_CASES)
def test_mosaic_kernels_equal_autodiff_of_the_twin_over_the_grid_in_float64(ids, x64):
  """Output, log-sum-exp where returned, and every gradient (``q``, ``k``, ``v``, bias and
  sinks) within 1e-10 relative of ``jax.vjp`` of the twin, in float64, over the grid's cases
  of every option (the Mosaic interpreter is slow: the plain cases are left to the Triton
  kernels, which ``formulation("native")`` runs on a CPU over every case in
  ``test_ops_generic``, as every platform-dependent rule)."""
  cases = [c for c in GRID.cases if c.id in ids]
  assert len(cases) == len(ids)
  with _attention_platforms.interpreting("mosaic"):
    reports = testing._check_cases(GRID, cases, rtol=1e-10, vmap=False, dtypes=False,
                                   formulations=("native",))
  for report in reports:
    assert report.passed, str(report)


def _kernels(fn, *args, platform=None):
  """How many Pallas kernels ``fn``'s value and gradient run: on this CPU (interpreted: the
  jaxpr holds every platform's branch, and only the CPU's interprets), or in the lowering
  for ``platform``."""
  def value_and_grad(*args):
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(out)

  traced = jax.jit(value_and_grad).trace(*args)
  if platform is None:
    return len(re.findall(r"interpret=(True|InterpretParams)", str(traced.jaxpr)))
  text = traced.lower(lowering_platforms=(platform,)).as_text()
  return text.count("xla.gpu.triton") + text.count("tpu_custom_call")


def _qkv(shape, dtype, seed=0):
  b, t, n, s, k, h = shape
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(sh), dtype) for sh in
               ((b, t, n, h), (b, s, k, h), (b, s, k, h)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_native_formulation_runs_three_kernels_and_the_cpu_one_none(backend):
  q, k, v = _qkv((1, 8, 2, 8, 1, 4), jnp.float32)
  fn = lambda q, k, v: jlayers.dot_product_attention(q, k, v, causal=True)  # noqa: E731
  with _attention_platforms.interpreting(backend), jlayers.formulation("native"):
    assert _kernels(fn, q, k, v) == 3  # forward, dK/dV, dQ
  assert _kernels(fn, q, k, v) == 0  # a CPU runs the XLA form by default
  with jlayers.formulation("cpu"):
    assert _kernels(fn, q, k, v, platform="cuda") == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_in_bfloat16_are_as_close_to_the_float64_twin_as_the_xla_form(backend):
  """Causal grouped-query heads over several blocks, soft cap, a bias and sinks: each of the
  output and the five gradients within twice the XLA form's error (both against the twin in
  float64) plus 1e-3 of its largest entry."""
  t = {"triton": 80, "mosaic": 140}[backend]  # two blocks of queries and of keys
  q, k, v = _qkv((1, t, 4, t, 2, 16), jnp.bfloat16)
  rng = np.random.default_rng(1)
  bias = jnp.asarray(rng.standard_normal((1, 4, t, t)), jnp.bfloat16)
  sinks = jnp.asarray(rng.standard_normal(4), jnp.bfloat16)
  d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)

  def run(fn, *args):
    out, pullback = jax.vjp(lambda q, k, v, bias, sinks: fn(
        q, k, v, bias=bias, sinks=sinks, causal=True, logits_soft_cap=5.0), *args)
    return (out,) + pullback(d_out.astype(out.dtype))

  with jax.enable_x64(True):
    want = run(reference.dot_product_attention,
               *(a.astype(jnp.float64) for a in (q, k, v, bias, sinks)))
    with jlayers.formulation("cpu"):
      xla = run(jlayers.dot_product_attention, q, k, v, bias, sinks)
    with _attention_platforms.interpreting(backend), jlayers.formulation("native"):
      got = run(jlayers.dot_product_attention, q, k, v, bias, sinks)
    for name, g, x, w in zip(("out", "dq", "dk", "dv", "dbias", "dsinks"), got, xla, want):
      assert g.dtype == jnp.bfloat16, name
      err = float(jnp.max(jnp.abs(g.astype(jnp.float64) - w)))
      ref = float(jnp.max(jnp.abs(x.astype(jnp.float64) - w)))
      assert err <= 2 * ref + 1e-3 * float(jnp.max(jnp.abs(w))), (name, err, ref)


OPTIONS = {
    "causal": {"causal": True},
    "window-softcap": {"local_window_size": (64, 0), "logits_soft_cap": 30.0},
    "segments-lengths": {"q_segment_ids": jnp.zeros((2, 200), jnp.int32),
                         "query_seq_lengths": jnp.array([3, 200]),
                         "key_value_seq_lengths": jnp.array([200, 7])},
    "mask-bias-sinks": {"mask": jnp.ones((2, 1, 1, 200), bool),
                        "bias": jnp.zeros((1, 8, 200, 200), jnp.float32),
                        "sinks": jnp.zeros((8,), jnp.float32)},
    "bias-per-key": {"bias": jnp.zeros((2, 1, 1, 200), jnp.float32)},
    "bias-per-row": {"bias": jnp.zeros((1, 8, 200, 1), jnp.float32), "causal": True},
}


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_kernels_lower_for_the_accelerators_in_bfloat16(option, platform):
  """Forward and both backward kernels in the lowering for the platform (grouped heads,
  ``T = S = 200``: no multiple of either backend's block, 128 features)."""
  q, k, v = _qkv((2, 200, 8, 200, 2, 128), jnp.bfloat16)
  fn = lambda q, k, v: jlayers.dot_product_attention(q, k, v, **OPTIONS[option])  # noqa: E731
  assert _kernels(fn, q, k, v, platform=platform) == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_calls_no_kernel_takes_fall_back_to_the_xla_form_and_meshes_take_kernels(platform):
  """A head size over the kernels' limit and float64 on an accelerator: the XLA form, no error
  (a bias broadcast along keys, a batch split over a mesh's devices and, gathered first, query
  rows split over them take the kernels)."""
  fn = jlayers.dot_product_attention
  q, k, v = _qkv((1, 16, 2, 16, 2, _attention_kernels.MAX_HEAD + 8), jnp.float32)
  assert _kernels(fn, q, k, v, platform=platform) == 0
  with jax.enable_x64(True):
    q, k, v = _qkv((1, 16, 2, 16, 2, 8), jnp.float64)
    assert _kernels(fn, q, k, v, platform=platform) == 0
  q, k, v = _qkv((1, 16, 2, 16, 2, 8), jnp.float32)
  bias = jnp.zeros((1, 2, 16, 1))
  with_bias = lambda q, k, v: fn(q, k, v, bias=bias)  # noqa: E731
  assert _kernels(with_bias, q, k, v, platform=platform) == 3
  mesh = jax.make_mesh((1, 1), ("data", "seq"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    # The batch split: kernels per device; rows split too: gathered first, then the same.
    for spec in (P("data"), P("data", "seq")):
      q = jax.device_put(q, NamedSharding(mesh, spec))
      k, v = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (k, v))
      assert _kernels(fn, q, k, v, platform=platform) == 3, spec


def test_the_xla_form_exports_for_every_platform_at_once():
  """``jax.export`` for ``cpu``, ``cuda`` and ``tpu`` together, traced under
  ``formulation("cpu")``; without it the kernels' branches refuse (as the README says)."""
  from jax import export  # noqa: PLC0415

  q, k, v = _qkv((1, 8, 2, 8, 1, 16), jnp.float32)
  fn = jax.jit(lambda q, k, v: jlayers.dot_product_attention(q, k, v, causal=True))
  with jlayers.formulation("cpu"):
    exported = export.export(fn, platforms=("cpu", "cuda", "tpu"))(q, k, v)
  np.testing.assert_allclose(np.asarray(exported.call(q, k, v)), np.asarray(fn(q, k, v)),
                             rtol=1e-6)
  with pytest.raises(ValueError):
    export.export(jax.jit(lambda q, k, v: jlayers.dot_product_attention(q, k, v)),
                  platforms=("cpu", "cuda"))(q, k, v)
