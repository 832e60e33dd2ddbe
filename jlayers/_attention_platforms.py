"""Which evaluation of attention's rule a platform runs: the Pallas kernels on GPUs
(:mod:`jlayers._attention_pallas`) and TPUs (:mod:`jlayers._attention_mosaic`), the XLA
blockwise form (:mod:`jlayers.attention`) on CPUs and wherever a kernel cannot take the call
(:func:`jlayers._attention_kernels.fallback`).

On a mesh each device runs the kernels on its own rows of the batch and its own heads
(``jax.shard_map`` over the mesh, the operands split over the axes that split their batch and
heads and replicated over the others; a bias or sinks shared by devices get their gradient
added over them). A sequence or feature axis that explicit axes split is gathered first
(:func:`whole_sequences`); ``q``'s heads split unlike ``k``'s run the XLA form, which the
partitioner splits.

Both are staged out with :func:`jax.lax.platform_dependent`, so the platform being lowered for
picks (``jax.jit(..., device=...)`` and lowering for a named platform pick right), and
:func:`jlayers.formulation` forces the XLA form (``"cpu"``) or the kernels (``"native"``,
which a CPU runs in Pallas's interpret mode: the Triton kernels, or the Mosaic ones inside
:func:`interpreting`). ``jax.export`` refuses Triton's custom calls (no compatibility
guarantee), and a lowering for several platforms at once refuses any branch holding a Pallas
call: a function to export is traced under ``formulation("cpu")``, the XLA form everywhere.
Forward and backward choose alike, and both evaluations keep the same residuals (the output
and log-sum-exp ``[B, K, G, T]`` in at least float32, ``+inf`` for a row that sees nothing),
so a forward and backward always pair.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jlayers import _attention_kernels as _k
from jlayers import _attention_mosaic, _attention_pallas, _platform, _sharding

_interpreted: contextvars.ContextVar[str] = contextvars.ContextVar(
    "jlayers_attention_interpreted", default="triton")
_MODULES = {"triton": _attention_pallas, "mosaic": _attention_mosaic}


@contextlib.contextmanager
def interpreting(backend: str) -> Iterator[None]:
  """Under ``formulation("native")`` on a CPU, interpret ``backend``'s kernels (``"triton"``,
  the default, or ``"mosaic"``) while tracing inside the block."""
  with _platform.setting(_interpreted, "interpreting: backend", backend, tuple(_MODULES)):
    yield


def whole_sequences(q, k, v):
  """``q``, ``k``, ``v`` with their sequence and feature axes unsplit where explicit mesh axes
  split them (a gather: each row needs every key and every feature; attention split along the
  sequence, as ring attention, is not implemented). Batch and heads keep their layout."""
  def whole(a):
    if not _sharding.explicit(a):
      return a
    entries = _sharding.entries(jax.typeof(a).sharding) + (None,) * 4
    if entries[1] is None and entries[3] is None:
      return a
    return jax.sharding.reshard(a, P(entries[0], None, entries[2], None))
  return whole(q), whole(k), whole(v)


def _layout(q, k, extras):
  """``(batch axes, head axes)``: the mesh axes that split the batch and the heads of
  ``q``, ``k``, ``v`` (``((), ())`` without a mesh), or ``None`` where a kernel per device
  cannot take the layout (heads or batch split unlike ``k``'s; sequence and feature axes are
  whole, :func:`whole_sequences`). The batch's axes are read as
  :func:`jlayers._sharding.split_axis` reads them (with auto axes: all of them, where they
  divide the batch); heads are split only by explicit axes."""
  _, batch, _ = _sharding.split_axis(q, 0)
  heads = _sharding.axis_names(_sharding.entry(q, 2))
  if _sharding.axis_names(_sharding.entry(k, 2)) != heads or (
      heads and k.shape[2] % _sharding.mesh_size(heads)):
    return None
  if _sharding.split_axis(k, 0)[1] != batch:
    return None
  return batch, heads


def _per_device(fn, layout, q, extras, args_kinds, out_kinds):
  """``fn`` run by each device on its batch rows and heads (``jax.shard_map`` over the
  ``layout``'s axes), or as it is without a mesh. ``args_kinds`` names each argument's layout
  (``"q"``, ``"kv"``, ``"rows"`` for ``[B, K, G, T]``, ``"extras"``); ``out_kinds`` the
  outputs' (``"bias"``: the bias's gradient, added over the devices that share the bias)."""
  batch, heads = layout
  if not batch and not heads:
    return fn
  bn, hn = (batch or None), (heads or None)
  b, n = q.shape[0], q.shape[2]

  def pair(a):  # a mask or bias [Bx, Nx, Tx, Sx]: split where it is whole
    return P(bn if a.shape[0] == b else None, hn if a.shape[1] == n else None)

  ex = extras._replace(
      mask=None if extras.mask is None else pair(extras.mask),
      bias=None if extras.bias is None else pair(extras.bias),
      sinks=None if extras.sinks is None else P(hn),
      **{name: None if getattr(extras, name) is None else P(bn)
         for name in ("q_segment_ids", "kv_segment_ids", "query_seq_lengths",
                      "key_value_seq_lengths")})
  specs = {"q": P(bn, None, hn), "kv": P(bn, None, hn), "rows": P(bn, hn), "extras": ex,
           "bias": None if extras.bias is None else pair(extras.bias)}
  shared = ()  # the axes along which devices share the bias: its gradient adds over them
  if extras.bias is not None:
    shared = (batch if extras.bias.shape[0] != b else ()) + (
        heads if extras.bias.shape[1] != n else ())
  in_specs = tuple(specs[kind] for kind in args_kinds)

  def body(*args):  # (a kernel's outputs carry no record of varying over the axes)
    out = fn(*args)
    if "bias" in out_kinds and shared and out[out_kinds.index("bias")] is not None:
      i = out_kinds.index("bias")
      out = (*out[:i], lax.psum(out[i], shared), *out[i + 1:])
    return out

  mesh = jax.sharding.get_abstract_mesh()
  explicit = not mesh.empty and bool(mesh.explicit_axes)

  def placed(spec, a):  # explicit axes: each operand laid out as its spec first
    if a is None or not explicit:
      return a
    full = tuple(spec) + (None,) * (a.ndim - len(spec))
    have = tuple(jax.typeof(a).sharding.spec) if _sharding.explicit(a) else ()
    if have + (None,) * (a.ndim - len(have)) == full:
      return a
    return jax.sharding.reshard(a, P(*full))

  mapped = jax.shard_map(body, in_specs=in_specs,
                         out_specs=tuple(specs[kind] for kind in out_kinds),
                         axis_names=set(mesh.axis_names), check_vma=False)
  leaf = lambda x: x is None or isinstance(x, P)  # noqa: E731
  return lambda *args: mapped(*jax.tree.map(placed, in_specs, args, is_leaf=leaf))


def _choose(q, k, extras, xla, kernel, kinds):
  """A function of the same arguments as ``xla``: ``xla`` where the XLA form runs, else
  ``platform_dependent`` over ``kernel(backend, interpret)`` per platform, run per device on
  a mesh (``kinds``: the arguments' and outputs' layouts, see :func:`_per_device`)."""
  forced = _platform.forced()
  if forced == "cpu":
    return xla
  layout = _layout(q, k, extras)
  branches = {}
  for platforms, backend in ((("cuda", "rocm"), "triton"), (("tpu",), "mosaic")):
    fn = xla
    if layout is not None and not _k.fallback(q):
      fn = _per_device(kernel(backend, False), layout, q, extras, *kinds)
    branches.update(dict.fromkeys(platforms, fn))
  cpu = xla
  if forced == "native":
    backend = _interpreted.get()
    if layout is not None and not _k.fallback(q, interpret=True):
      cpu = _per_device(kernel(backend, True), layout, q, extras, *kinds)
  if all(fn is xla for fn in (cpu, *branches.values())):
    return xla

  def run(*args):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
      return lax.platform_dependent(*args, cpu=cpu, default=xla, **branches)
    # Explicit axes: every branch returns the types the XLA form's does (a kernel run per
    # device returns its outputs split as its specs say; the XLA form may differ where an
    # axis is of size 1), so that the platforms' branches agree.
    want = jax.eval_shape(xla, *args)

    def conform(fn):
      def conformed(*args):
        return jax.tree.map(lambda a, w: a if a is None else _sharding.reshard_as(a, w),
                            fn(*args), want, is_leaf=lambda x: x is None)
      return xla if fn is xla else conformed

    return lax.platform_dependent(*args, cpu=conform(cpu), default=xla,
                                  **{p: conform(fn) for p, fn in branches.items()})

  return run


def _spec(config, q, k, extras, backend):
  t, s = q.shape[1], k.shape[1]
  bq, bk = _k.block_sizes(backend, t, s)
  return _k.prepare(extras, q, k, bq, bk, causal=config.causal, window=config.window,
                    soft_cap=config.soft_cap, scale=config.scale)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _forward_kernels(config, backend, interpret, q, k, v, extras):
  """``backend``'s forward kernel, its results as the XLA form's. Jitted with the static
  configuration, so that a call of the same configuration and shapes (the next layer of a
  model) reuses its trace instead of tracing the kernel again."""
  spec, ops = _spec(config, q, k, extras, backend)
  out, lse = _MODULES[backend].forward(q, k, v, spec, ops, interpret=interpret)
  b, t, n, _ = q.shape
  return out, jnp.where(lse == -jnp.inf, jnp.inf, lse).reshape(b, k.shape[2], -1, t)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _backward_kernels(config, backend, interpret, q, k, v, extras, g, lse, delta):
  """``backend``'s backward kernels (see :func:`_forward_kernels`)."""
  spec, ops = _spec(config, q, k, extras, backend)
  b, t, n, _ = q.shape
  lse = jnp.where(lse == jnp.inf, -jnp.inf, lse).reshape(b, n, t)
  return _MODULES[backend].backward(q, k, v, g, lse, delta.reshape(b, n, t), spec, ops,
                                    interpret=interpret)


def forward(config, q, k, v, extras, *, xla):
  """``(output [B, T, N, H], log-sum-exp [B, K, G, T])`` in at least float32 (``+inf`` where a
  row sees nothing and has no sink), by the platform's evaluation; ``xla(config, q, k, v,
  extras)`` is the XLA form."""
  kernel = functools.partial(functools.partial, _forward_kernels, config)
  kinds = (("q", "kv", "kv", "extras"), ("q", "rows"))
  return _choose(q, k, extras, functools.partial(xla, config), kernel, kinds)(q, k, v, extras)


def backward(config, q, k, v, extras, g, lse, delta, *, xla):
  """``(dQ, dK, dV, dbias or None)`` in at least float32 from the output cotangent ``g`` and
  the residual log-sum-exp ``lse`` and ``δ = dO · O − \bar L`` (both ``[B, K, G, T]``), by the
  platform's evaluation; ``xla(config, q, k, v, extras, g, lse, delta)`` is the XLA form."""
  kernel = functools.partial(functools.partial, _backward_kernels, config)
  kinds = (("q", "kv", "kv", "extras", "q", "rows", "rows"), ("q", "kv", "kv", "bias"))
  return _choose(q, k, extras, functools.partial(xla, config), kernel, kinds)(
      q, k, v, extras, g, lse, delta)
