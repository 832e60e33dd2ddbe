"""Where a causal attention layer keeps the keys and values of the tokens it has seen, and
which of them a new query sees.

A layer's cache is ``{"key", "value"}``, each ``[B, K, slots, H]`` (head-major: a head's
slots are contiguous, as attention reads them); the model keeps one
``index: int[B]`` for all layers, the tokens each row holds so far. A token's *index* in its
row (0, 1, 2, …) decides its slot:

* a global layer has one slot per index (``slots`` = the cache's maximum length): the token of
  index ``p`` is in slot ``p``;
* a layer with a sliding window of ``W`` keys (a query sees itself and the ``W − 1`` tokens
  before it) keeps a ring of ``W`` slots: the token of index ``p`` is in slot ``p mod W``,
  where it replaces the token ``p − W``, which no later query sees. A window layer whose cache
  is shorter than its window (``slots < W``) never wraps and is laid out as a global one.

Keys are cached after the rotary embedding and the QK-norm, so a slot never needs its
position again. For one new token per row (decoding) the layer writes it and attends over the
first ``min(index + 1, slots)`` slots: every one of them holds a token the query sees, so the
valid length alone (``key_value_seq_lengths``) is the mask. For several new tokens per row
(a prompt, or a chunk of one), a global layer writes them and attends with a mask of the
causal (and window) condition between indices; a ring layer attends over its slots before the
write followed by the new tokens (a new token may replace a slot an earlier new token still
sees), then writes the last ``W`` of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slots(window: int | None, max_length: int) -> int:
  """The slots of a layer whose queries see ``window`` keys (``None``: all) in a cache of
  ``max_length`` tokens per row."""
  return max_length if window is None else min(window, max_length)


def is_ring(window: int | None, num_slots: int) -> bool:
  return window is not None and num_slots == window


def _write(buffer, new, slot):
  """``buffer [B, K, S, H]`` with ``new [B, T, K, H]`` written at ``slot [B, T]``; slots out of
  range (``S``) are dropped."""
  # Per row (a scatter with the batch as a batching dimension): on a mesh each device writes
  # its own rows, with no collective.
  def row(buffer, new, slot):
    return buffer.at[:, slot].set(new.transpose(1, 0, 2), mode="drop")

  return jax.vmap(row)(buffer, new.astype(buffer.dtype), slot)


def _write_one(buffer, new, slot):
  """``buffer [B, K, S, H]`` with ``new [B, 1, K, H]`` written at ``slot [B]`` (in range)."""
  def row(buffer, new, slot):
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.transpose(1, 0, 2), slot, axis=1)

  return jax.vmap(row)(buffer, new.astype(buffer.dtype), slot)


def _new_slots(start, count, t: int, num_slots: int, ring: bool):
  """The slot of each new token ``[B, T]``, ``num_slots`` (dropped) for padding tokens and, in
  a ring, for the tokens that a later new token of the same row replaces."""
  u = jnp.arange(t, dtype=start.dtype)[None, :]
  keep = u < count[:, None]
  where = start[:, None] + u
  if ring:
    keep &= u >= count[:, None] - num_slots
    where = where % num_slots
  return jnp.where(keep, where, num_slots)


def attend(attention, q, k, v, cache, start, count, *, window: int | None):
  """Attention of new queries against a layer's cache and the new keys; writes the new keys.

  Args:
    attention: ``attention(q, k, v, **visibility)``, the layer's attention op with its other
      options bound.
    q: float[B, T, N, H], the new tokens' queries; ``k``, ``v``: float[B, T, K, H].
    cache: ``{"key", "value"}``, float[B, K, slots, H].
    start: int[B], the index of each row's first new token (the tokens the cache holds).
    count: int[B], how many of the ``T`` new tokens of each row are real (the rest padding).
    window: the keys a query sees (itself included), or ``None``.

  Returns:
    ``(out float[B, T, N, H], new cache, overflow bool[B])``: ``overflow`` marks rows whose
    tokens do not fit a global layer's slots (their output is not valid).
  """
  t = q.shape[1]
  num_slots = cache["key"].shape[2]
  ring = is_ring(window, num_slots)
  end = start + count
  overflow = jnp.zeros_like(start, bool) if ring else end > num_slots
  if t == 1:
    # One token per row, always written: a padding token (count 0) lands in the slot its row's
    # next token takes, which no query sees before that (the oldest of a full ring is out of
    # the next query's window), and an overflowing row's outputs are NaN from then on.
    slot = start % num_slots if ring else jnp.minimum(start, num_slots - 1)
    new = {name: _write_one(cache[name], a, slot) for name, a in (("key", k), ("value", v))}
  else:
    slot = _new_slots(start, count, t, num_slots, ring)
    new = {name: _write(cache[name], a, slot) for name, a in (("key", k), ("value", v))}
  # The op takes [B, S, K, H] and reads heads major: the two transposes cancel.
  keys, values = (new[name].transpose(0, 2, 1, 3) for name in ("key", "value"))
  if t == 1:  # decoding: the valid slots are exactly the keys the query sees
    valid = jnp.minimum(end, num_slots)
    out = attention(q, keys, values, key_value_seq_lengths=valid)
    return out, new, overflow
  query = start[:, None] + jnp.arange(t, dtype=start.dtype)[None, :]  # [B, T] indices
  if ring:  # the ring before the write, then the new tokens
    j = jnp.arange(num_slots, dtype=start.dtype)[None, :]
    held = start[:, None] - 1 - (start[:, None] - 1 - j) % num_slots  # [B, slots]; < 0: empty
    fresh = jnp.where(jnp.arange(t, dtype=start.dtype)[None, :] < count[:, None], query, -1)
    key_index = jnp.concatenate([held, fresh], axis=1)
    keys, values = (jnp.concatenate([cache[name].transpose(0, 2, 1, 3),
                                     a.astype(cache[name].dtype)], axis=1)
                    for name, a in (("key", k), ("value", v)))
  else:
    key_index = jnp.broadcast_to(jnp.arange(num_slots, dtype=start.dtype)[None, :],
                                 (start.shape[0], num_slots))
  qi, kj = query[:, :, None], key_index[:, None, :]
  sees = (kj >= 0) & (kj <= qi)
  if window is not None:
    sees &= kj > qi - window
  out = attention(q, keys, values, mask=sees[:, None], query_seq_lengths=count)
  return out, new, overflow


def poison(x, rows):
  """``x [B, ...]`` with the rows where ``rows [B]`` is True set to NaN."""
  shape = (-1,) + (1,) * (x.ndim - 1)
  return jnp.where(rows.reshape(shape), jnp.asarray(jnp.nan, x.dtype), x)


def check_index(where: str, cache, batch: int):
  """``cache["index"]`` as int32[B], or a ``ValueError`` naming what came."""
  index = cache.get("index") if isinstance(cache, dict) else None
  if index is None:
    raise ValueError(f"{where}: the cache has no 'index' (make it with init_cache)")
  index = jnp.asarray(index)
  if index.shape != (batch,) or not jnp.issubdtype(index.dtype, jnp.integer):
    raise ValueError(f"{where}: the cache's 'index' must be int[{batch}] (one entry per row of "
                     f"ids), got {index.dtype}{list(index.shape)}: a cache built for another "
                     "batch")
  return index.astype(jnp.int32)


def nbytes(cache) -> int:
  """The bytes of a cache's arrays."""
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
