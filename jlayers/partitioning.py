"""Parameter layouts stated once, by logical axis names.

Every axis of a parameter gets a *logical* name that says what it indexes — ``"embed"`` (the
model's features), ``"mlp"`` (the MLP's hidden features), ``"heads"`` and ``"kv_heads"``
(query and key/value heads times their features), ``"vocab"``, ``"positions"``,
``"head_features"`` — and a user's *rules* map those names to mesh axes, as Flax's logical
partitioning and MaxText's ``logical_axis_rules`` do::

    FSDP = (("embed", "data"),)
    TENSOR = (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"))

A logical name takes the first mesh axis of its rules that no earlier axis of the same
parameter has taken (so ``(("embed", "data"), ("mlp", "data"))`` splits an ``[embed, mlp]``
kernel over ``data`` once, on ``embed``); a name without a rule is not split.

:func:`param_axes` names the axes of a model's params from their paths (the names the layers
give them: ``attention/query/kernel`` is ``("embed", "heads")``), :func:`param_specs` turns
them into ``PartitionSpec`` s, and :func:`init_sharded` initialises the params already laid out
on a mesh. The ops take whatever layout comes (see the README's section on meshes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

FSDP: Rules = (("embed", "data"),)
"""FSDP on a ``data`` axis: every matrix and vector split along its model features."""

TENSOR: Rules = (("heads", "model"), ("kv_heads", "model"), ("mlp", "model"),
                 ("vocab", "model"))
"""Megatron-style tensor parallelism on a ``model`` axis: attention heads, the MLP's hidden
features and the vocabulary split (column-parallel in, row-parallel out)."""

# (path suffix, axes): the first suffix that ends a parameter's path names its axes.
_BY_PATH: tuple[tuple[tuple[str, ...], tuple], ...] = (
    (("attention", "query", "kernel"), ("embed", "heads")),
    (("attention", "query", "bias"), ("heads",)),
    (("attention", "key", "kernel"), ("embed", "kv_heads")),
    (("attention", "key", "bias"), ("kv_heads",)),
    (("attention", "value", "kernel"), ("embed", "kv_heads")),
    (("attention", "value", "bias"), ("kv_heads",)),
    (("attention", "out", "kernel"), ("heads", "embed")),
    (("attention", "out", "bias"), ("embed",)),
    (("attention", "query_norm", "scale"), ("head_features",)),
    (("attention", "key_norm", "scale"), ("head_features",)),
    (("attention", "sinks"), ("heads",)),
    (("mlp", "fc1", "kernel"), ("embed", "mlp")),
    (("mlp", "fc1", "bias"), ("mlp",)),
    (("mlp", "gate", "kernel"), ("embed", "mlp")),
    (("mlp", "up", "kernel"), ("embed", "mlp")),
    (("mlp", "fc2", "kernel"), ("mlp", "embed")),
    (("mlp", "down", "kernel"), ("mlp", "embed")),
    (("mlp", "fc2", "bias"), ("embed",)),
    (("mlp", "down", "bias"), ("embed",)),
    (("embed", "embedding"), ("vocab", "embed")),
    (("position", "embedding"), ("positions", "embed")),
    (("head", "kernel"), ("embed", "vocab")),
    (("scale",), ("embed",)),
    (("offset",), ("embed",)),
)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_axes(params, *, overrides: Mapping[str, tuple] | None = None):
  """The logical axis names of each of ``params``' arrays (or shapes: ``model.init_shapes()``),
  a pytree of tuples laid out as ``params``, read from each array's path.

  Args:
    params: a params pytree (arrays or ``jax.ShapeDtypeStruct`` s) of jlayers' layers.
    overrides: ``{"a/b/kernel": axes}`` for paths of the user's own (a whole path, ``/``-joined,
      or a suffix of one), tried before the built-in names.

  Returns:
    A pytree of tuples of names (``None`` for an unnamed axis); an array no rule names gets
    ``(None,) * ndim`` (replicated).

  Raises:
    ValueError: an override's axes do not match its array's rank.
  """
  overrides = dict(overrides or {})

  def name(path, leaf):
    keys = _keys(path)
    for pattern, axes in overrides.items():
      suffix = tuple(pattern.split("/"))
      if keys[-len(suffix):] == suffix:
        if len(axes) != len(leaf.shape):
          raise ValueError(f"param_axes: the override for {pattern!r} names {len(axes)} axes, "
                           f"but {'/'.join(keys)} has shape {tuple(leaf.shape)}")
        return tuple(axes)
    for suffix, axes in _BY_PATH:
      if keys[-len(suffix):] == suffix and len(axes) == len(leaf.shape):
        return axes
    return (None,) * len(leaf.shape)

  return jax.tree_util.tree_map_with_path(name, params)


def logical_spec(axes: Sequence[str | None], rules: Rules) -> P:
  """The ``PartitionSpec`` of an array whose axes have the logical names ``axes`` under
  ``rules`` (``(logical name, mesh axis or axes or None)`` pairs, first match wins among the
  mesh axes not yet taken by an earlier axis of the same array)."""
  taken: set[str] = set()
  entries = []
  for logical in axes:
    entry = None
    for rule_name, mesh_axes in rules:
      if rule_name != logical or mesh_axes is None:
        continue
      names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      if not taken.intersection(names):
        entry = mesh_axes
        taken.update(names)
        break
    entries.append(entry)
  return P(*entries)


def param_specs(params, rules: Rules, *, overrides: Mapping[str, tuple] | None = None,
                mesh=None):
  """The ``PartitionSpec`` of each of ``params``' arrays (a pytree laid out as ``params``)
  from :func:`param_axes` and ``rules``. With ``mesh``, an axis whose size the mesh axes do
  not divide is left unsplit (a vocabulary of 103 on 4 devices), and ``NamedSharding`` s on
  ``mesh`` come back instead."""
  axes = param_axes(params, overrides=overrides)

  def spec(leaf, names):
    s = logical_spec(names, rules)
    if mesh is None:
      return s
    fitted = []
    for size, entry in zip(leaf.shape, tuple(s) + (None,) * (len(leaf.shape) - len(s))):
      parts = 1
      for n in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
        parts *= mesh.shape[n]
      fitted.append(entry if size % parts == 0 else None)
    return NamedSharding(mesh, P(*fitted))

  return jax.tree.map(spec, params, axes)


def init_sharded(model, key, input_shape, *, rules: Rules, mesh=None,
                 input_dtype=jnp.float32, overrides: Mapping[str, tuple] | None = None):
  """``model.init(key, input_shape, input_dtype=...)`` with the params created already laid
  out on ``mesh`` (default: the mesh of ``jax.set_mesh``) as :func:`param_specs` says: each
  device computes only its own slices (``jax.jit`` with ``out_shardings``). The state, if any,
  is replicated.

  Returns:
    ``(params, state)`` as ``init`` returns them.
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    raise ValueError("init_sharded: no mesh (pass mesh= or call it under jax.set_mesh)")
  if isinstance(mesh, jax.sharding.AbstractMesh):
    raise ValueError("init_sharded: pass the concrete mesh as mesh= (jax.make_mesh)")

  def init(key):
    return model.init(key, input_shape, input_dtype=input_dtype)

  shapes = jax.eval_shape(init, key)
  params_sh = param_specs(shapes[0], rules, overrides=overrides, mesh=mesh)
  state_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), shapes[1])
  run: Callable = jax.jit(init, out_shardings=(params_sh, state_sh))
  return run(key)
