"""Sharding facts read while tracing, so that rules stay local on a device mesh.

Under ``jax.set_mesh`` with **explicit** axes every array's type carries its sharding
(``jax.typeof(x).sharding``), and an operation whose output sharding is ambiguous (a contraction
over a sharded batch: every weight gradient) must be told it. With **auto** axes the types say
nothing and GSPMD propagates shardings from the inputs; a rule can still name the axes it wants
split with a sharding constraint. Outside any mesh (one device) every helper here is a no-op.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _mesh_of(x):
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  return sharding, mesh


def explicit(x) -> bool:
  """Whether ``x``'s type carries a sharding over explicit mesh axes (read it with typeof)."""
  _, mesh = _mesh_of(x)
  return mesh is not None and not mesh.empty and bool(mesh.explicit_axes)


def _full_spec(x) -> tuple:
  """``x``'s partition spec with one entry per axis (``None`` for the unnamed trailing ones)."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def entry(x, axis: int):
  """The partition-spec entry of ``x``'s ``axis`` (``None``: unsplit), where the types carry
  shardings; else ``None``."""
  return _full_spec(x)[axis] if explicit(x) else None


def axis_names(entry) -> tuple[str, ...]:
  """The mesh axis names of one partition-spec entry."""
  return _names(entry)


def reshard_apart(w, x):
  """``w`` (a weight) with the mesh axes that split ``x``'s batch (axis 0) removed from its
  layout, where the types carry shardings: FSDP splits weights over the batch's axis, and a
  product of the two needs the weight whole (an all-gather of the weight, not of the batch).
  Elsewhere ``w`` as it is."""
  if not explicit(w):
    return w
  batch = _full_spec(x)[:1] if x.ndim else ()
  spec = _full_spec(w)
  kept = tuple(free(e, batch) for e in spec)
  return w if kept == spec else jax.sharding.reshard(w, P(*kept))


def mesh_size(names) -> int:
  """The devices along the mesh axes ``names`` of the current mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[n] for n in names)


def like(x):
  """``x``'s sharding, to pass as ``out_sharding=`` for a result laid out as ``x`` (a weight
  gradient laid out as the weight), or ``None`` where types carry no sharding."""
  return jax.typeof(x).sharding if explicit(x) else None


def spec_like(x, shape, axes=None):
  """The partition spec of an array of ``shape`` laid out as ``x``, where the types carry
  shardings; else ``None``.

  Axis ``i`` of the array takes the partitioning of ``x``'s axis ``axes[i]`` (default: axis
  ``i`` itself; ``None``: unsplit) when the two sizes agree, and stays unsplit otherwise (a
  size-1 axis that broadcasts against ``x``).
  """
  if not explicit(x):
    return None
  spec = _full_spec(x)
  axes = tuple(range(len(shape))) if axes is None else tuple(axes)
  axes += (None,) * (len(shape) - len(axes))
  return P(*(spec[a] if a is not None and shape[i] == x.shape[a] else None
             for i, a in enumerate(axes)))


def reshard_like(w, x, axes=None):
  """``w`` (a mask, a per-example flag) laid out as ``x`` as :func:`spec_like` says, where the
  types carry shardings: a replicated mask next to batch-split logits or scores makes every
  select between them ambiguous, and splitting a replicated array is a local slice. Elsewhere
  ``w`` as it is."""
  target = spec_like(x, w.shape, axes)
  if target is None or jax.typeof(w).sharding.spec == target:
    return w
  return jax.sharding.reshard(w, target)


def reshard_as(a, b):
  """``a`` laid out as ``b`` (same shape) where the types carry shardings; else ``a``."""
  if not explicit(a) or jax.typeof(a).sharding.spec == jax.typeof(b).sharding.spec:
    return a
  return jax.sharding.reshard(a, jax.typeof(b).sharding.spec)


def reshard_to(a, sharding):
  """``a`` laid out by ``sharding`` (a ``NamedSharding`` read at trace time); ``a`` as it is
  for ``None`` or where the types carry no sharding."""
  if sharding is None or not explicit(a) or jax.typeof(a).sharding.spec == sharding.spec:
    return a
  return jax.sharding.reshard(a, sharding.spec)


def free(entry, taken):
  """The partition-spec ``entry`` for a new axis of an array whose other axes have the entries
  ``taken``: ``None`` (unsplit) where one of its mesh axes is taken already (an FSDP weight's
  axis split over the batch's mesh axis), else ``entry``."""
  used = {n for e in taken for n in _names(e)}
  return None if used.intersection(_names(entry)) else entry


def entries(sharding) -> tuple:
  """The entries of a ``PartitionSpec`` or of a ``NamedSharding``'s spec."""
  return tuple(getattr(sharding, "spec", sharding))


def product_layout(x, w):
  """The layout of ``x @ w`` (``x [..., in]``, ``w [in, out]``) that a layer means, where the
  types carry shardings: ``x``'s leading axes as ``x`` has them and ``out`` as ``w`` has it,
  unless a leading axis already uses that mesh axis (then ``out`` is unsplit). A contraction
  over an ``in`` split alike on both sides is summed across its mesh axis (row-parallel)."""
  lead = _full_spec(x)[:-1]
  return P(*lead, free(_full_spec(w)[1], lead))


def replicated_like(x):
  """A replicated sharding on ``x``'s mesh where the types carry shardings; else ``None``."""
  return NamedSharding(jax.typeof(x).sharding.mesh, P()) if explicit(x) else None


def lookup(ids, table_sharding):
  """The sharding of ``table[ids]``: laid out as ``ids``, with the table's feature split on the
  last axis, where the types carry shardings (a lookup with batch-split ids is otherwise
  ambiguous); else ``None``."""
  if not explicit(ids):
    return None
  lead = _full_spec(ids)
  features = None if table_sharding is None else (tuple(table_sharding.spec)[1:2] or (None,))[0]
  return NamedSharding(jax.typeof(ids).sharding.mesh, P(*lead, free(features, lead)))


def merged_spec(x, merges: tuple[int, ...]):
  """The partition spec of ``x`` reshaped with consecutive axes merged, ``merges[i]`` of them
  into axis ``i`` of the result: a single axis keeps its partitioning, a merged one is unsplit
  (for the reshape's ``out_sharding``), where the types carry shardings; else ``None``."""
  if not explicit(x):
    return None
  spec = _full_spec(x)
  entries, i = [], 0
  for n in merges:
    entries.append(spec[i] if n == 1 else None)
    i += n
  return P(*entries)


def varying(v, axis_name):
  """``v`` marked as varying over the ``shard_map`` axes among ``axis_name``.

  A parameter replicated across a ``shard_map`` (``pmap`` is built on it) must enter a custom
  rule as a per-device value: the rule then returns this device's share of its gradient and
  JAX's transpose of the cast sums the shares, as autodiff of the twin does. Under ``vmap`` the
  parameter is a per-example value already and is left as it is.
  """
  if axis_name is None:
    return v
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  manual = set(jax.sharding.get_abstract_mesh().manual_axes)
  state = getattr(getattr(jax.typeof(v), "mat", None), "varying", frozenset())
  missing = tuple(n for n in names if n in manual and n not in state)
  return jax.lax.pcast(v, missing, to="varying") if missing else v


def _names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def split_axis(x, axis: int) -> tuple[int, tuple[str, ...], bool]:
  """How ``x``'s ``axis`` (its batch) is split over devices: ``(parts, mesh axes, explicit)``.

  With explicit axes, the parts and mesh axes are read from the type. With auto axes the type
  says nothing: the batch is taken to be split over all auto axes of the current mesh when
  their product divides it (the data-parallel layout; a rule then constrains it so), else not
  split. Inside ``shard_map`` (manual axes) and without a mesh: ``(1, (), False)``.
  """
  sharding, mesh = _mesh_of(x)
  if mesh is not None and not mesh.empty and mesh.explicit_axes:
    names = _names(sharding.spec[axis]) if axis < len(sharding.spec) else ()
    return math.prod(mesh.shape[n] for n in names), names, True
  context = jax.sharding.get_abstract_mesh()
  if context.empty or not context.auto_axes:
    return 1, (), False
  names = tuple(context.auto_axes)
  parts = math.prod(context.shape[n] for n in names)
  if parts <= 1 or x.shape[axis] % parts:
    return 1, (), False
  return parts, names, False


def constrain(x, spec_entries):
  """``x`` constrained to ``PartitionSpec(*spec_entries)`` under auto axes (a hint to GSPMD);
  unchanged where the types carry shardings or no mesh is set."""
  context = jax.sharding.get_abstract_mesh()
  if context.empty or not context.auto_axes or explicit(x):
    return x
  return jax.lax.with_sharding_constraint(x, P(*spec_entries))


def batch_local(fn, batched, replicated=(), *, summed: bool = False):
  """``fn(*batched, *replicated)`` computed by each device on its own slice of the batch.

  Where the batch (axis 0 of ``batched[0]``) is split over mesh axes (see :func:`split_axis`),
  ``fn`` runs under ``jax.shard_map`` over those axes: its result is split likewise, or, with
  ``summed``, added over the devices (a weight-sized sum). Used for operations whose XLA
  partitioning would gather the batch (grouped convolutions). Elsewhere: ``fn`` as it is.
  """
  parts, names, _ = split_axis(batched[0], 0)
  if parts == 1:
    return fn(*batched, *replicated)
  body = (lambda *a: jax.lax.psum(fn(*a), names)) if summed else fn
  return jax.shard_map(body, in_specs=(P(names),) * len(batched) + (P(),) * len(replicated),
                       out_specs=P() if summed else P(names), axis_names=set(names))(
                           *batched, *replicated)
