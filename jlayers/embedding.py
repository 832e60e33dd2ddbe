"""Embedding lookup, ``table[ids]``, with a hand-derived backward pass.

On GPUs and TPUs the rule stays in XLA, with no Pallas kernel: the forward is one gather
and the backward one scatter-add into the table's gradient, XLA's own kernels for exactly
these (a hand kernel would need the same atomic or sorted accumulation of repeated ids).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _ops, _sharding

_OP = "embedding"


class _Config(NamedTuple):
  """Static (hashable, in ``nondiff_argnums``): all that the backward needs of the table."""

  num: int  # V, the number of rows
  features: int  # F
  dtype: Any  # the table's dtype
  sharding: Any  # the table's sharding where the types carry shardings, else None


def _validate(ids, table):
  ids = _checks.as_array(_OP, "ids", ids)
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise TypeError(f"{_OP}: ids must have an integer dtype, got {ids.dtype}")
  table = _checks.floating(_OP, "table", table)
  _checks.rank(_OP, "table", table, 2, "(num_embeddings, features)")
  if table.shape[0] == 0:
    raise ValueError(f"{_OP}: table must have at least one row (num_embeddings >= 1), "
                     f"got shape {tuple(table.shape)}")
  num, features = table.shape
  return ids, table, _Config(num, features, table.dtype, _sharding.like(table))


def embedding(ids: jax.Array, table: jax.Array) -> jax.Array:
  r"""Embedding lookup: row ``ids[m]`` of ``table`` for every multi-index ``m``, manual VJP.

  .. math::
    \mathrm{out}[m, f] = \mathrm{table}[\mathrm{ids}[m], f]

  An id outside ``[0, V)``, negative ones included (there is no wrap-around from the end),
  gives a row of NaN and contributes no gradient: values cannot be checked at trace time, and
  a NaN row is never a silent wrong answer. Ids are compared with ``V`` in their own dtype, so
  a ``uint8`` id is never compared with a ``V`` it cannot represent and an ``int64`` id is
  never wrapped into range by a cast. The gradient of the table adds the cotangent rows of
  repeated ids, in at least float32, rounded once to the table's dtype.

  Args:
    ids: int[...] of any shape (a scalar included), any integer dtype. Not differentiable.
    table: float[V, F], any float dtype, ``V >= 1``.

  Returns:
    float[..., F] of shape ``ids.shape + (F,)``, in the dtype of ``table``.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> table = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    >>> jlayers.embedding(jnp.array([2, 0, 2]), table).tolist()
    [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]
    >>> jlayers.embedding(jnp.array([-1, 3]), table).tolist()
    [[nan, nan], [nan, nan]]
    >>> jax.grad(lambda t: jlayers.embedding(jnp.array([2, 0, 2]), t).sum())(table).tolist()
    [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]
  """
  ids, table, config = _validate(ids, table)
  return _embedding(config, ids, table)


def _rows(ids, num: int):
  """``ids`` as int32 row numbers, with ``num`` (one past the last row: out of bounds, so the
  lookup fills it with NaN and the scatter drops it) for ids outside ``[0, num)``. The
  comparisons run in the ids' own dtype."""
  top = jnp.iinfo(ids.dtype).max
  in_range = ids >= 0
  if num <= top:
    in_range = in_range & (ids < num)
  rows = jnp.clip(ids, 0, min(num - 1, top)).astype(jnp.int32)
  return jnp.where(in_range, rows, num)


def _forward(config, ids, table):
  # A table split over the ids' batch axis (FSDP) is gathered whole first, as FSDP gathers a
  # weight before its use: looked up split, the rows would gather the batch instead.
  table = _sharding.reshard_apart(table, ids)
  return table.at[_rows(ids, config.num)].get(
      mode="fill", fill_value=jnp.nan, wrap_negative_indices=False,
      out_sharding=_sharding.lookup(ids, config.sharding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _embedding(config, ids, table):
  return _forward(config, ids, table)


def _embedding_fwd(config, ids, table):
  """Saves ``ids`` only (an input: no memory of the rule's own). The backward is linear in
  the cotangent and does not depend on the table's values at all: it needs only where each
  row goes, and the table's shape, dtype and sharding, which are static (``config``)."""
  return _forward(config, ids, table), ids


def _embedding_bwd(config, ids, g):
  r"""Backward of ``out[m, f] = table[ids[m], f]`` for the cotangent ``g = ∂L/∂out``.

  Each output entry is one entry of the table, so

  .. math::
    \frac{∂\,\mathrm{out}[m, f]}{∂\,\mathrm{table}[v, f']} = [\mathrm{ids}[m] = v]\, δ_{ff'}

  and by the chain rule

  .. math::
    \frac{∂L}{∂\,\mathrm{table}[v, f]} = \sum_m g[m, f]\, [\mathrm{ids}[m] = v]
      = \sum_{m:\, \mathrm{ids}[m] = v} g[m, f]

  a table of zeros with each cotangent row scatter-ADDED at its id (repeated ids accumulate,
  untouched rows stay 0). An id outside ``[0, V)`` reads no entry of the table (its output
  row is a constant NaN) and its cotangent row is dropped. The sums run in at least float32
  and are rounded once to the table's dtype.

  The scatter adds ``M`` windows ``[1, F]`` (``M`` ids), with the rows and ``g`` reshaped to
  ``[M, 1]`` and ``[M, 1, F]`` for free; autodiff's transpose of the lookup leaves XLA:CPU to
  form those windows by copying the whole cotangent (a temporary the size of the output).
  With the ids split over a mesh, each device adds its own rows into a table-sized partial
  sum and one table-sized all-reduce adds those up (laid out as the table): no batch-sized
  array moves. The scatter-add is linear in ``g`` (JAX transposes it to a gather), so the
  rule can be differentiated again. ``ids`` are not differentiable and get ``None``.
  """
  acc = _checks.at_least_float32(config.dtype)
  sharding = config.sharding
  if sharding is None:  # a table whose type carries no sharding: replicated
    sharding = _sharding.replicated_like(g)
  zeros = jnp.zeros((config.num, config.features), acc, out_sharding=sharding)
  rows, count = _rows(ids, config.num), math.prod(ids.shape)
  dnums = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(),
                                      scatter_dims_to_operand_dims=(0,))

  def scatter(zeros, rows, g):
    return lax.scatter_add(zeros, rows.reshape(count, 1), g.reshape(count, 1, config.features),
                           dnums, mode=lax.GatherScatterMode.FILL_OR_DROP)

  if sharding is not None:  # batch-split rows into a replicated table: say where the sum goes
    scatter = jax.sharding.auto_axes(scatter, out_sharding=sharding,
                                     axes=sharding.mesh.explicit_axes)
  return None, scatter(zeros, rows, g.astype(acc)).astype(config.dtype)


_embedding.defvjp(_embedding_fwd, _embedding_bwd)


def embedding_reference(ids: jax.Array, table: jax.Array) -> jax.Array:
  """Autodiff twin of :func:`embedding`: same signature, checks and conventions. The same
  lookup (a gather that fills ids outside ``[0, V)`` with NaN), differentiated by JAX: its
  transpose scatter-adds the cotangent rows and drops those of ids out of range."""
  ids, table, config = _validate(ids, table)
  return _forward(config, ids, table)


embedding_op = _ops.declare(_OP, embedding, embedding_reference)
