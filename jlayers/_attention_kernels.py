"""What the attention kernels share: the options of one call as static facts and padded
operands, the block math both backends run on a loaded block, the block sizes per backend,
and when a call takes a kernel at all.

The kernels (:mod:`jlayers._attention_pallas` for GPUs, :mod:`jlayers._attention_mosaic` for
TPUs) evaluate the rule of :mod:`jlayers.attention` on blocks of ``block_q`` query rows ×
``block_k`` keys of one (batch, query head): the scores ``z = scale · q kᵀ + β``, the soft cap,
the visibility of each entry (:func:`visible`: the same conditions as the XLA form's
:func:`jlayers._attention_blocks.visible`) and, in the backward, ``P = exp(z − L)`` and
``dz = P ∘ (dP − δ) ∘ (1 − tanh²)``. A kernel visits only the blocks :func:`key_range` and
:func:`query_range` leave (the causal mask, the window and the lengths bound them).

**When a call takes a kernel** (:func:`fallback` says why not, and the op then runs its XLA
blockwise form on that platform, never an error):

* on a mesh, heads of ``q`` split unlike those of ``k`` and ``v`` (a kernel per device needs
  each query head's key/value head on its device): the XLA form, which the partitioner splits.
  Otherwise :mod:`jlayers._attention_platforms` runs the kernels per device, sequence and
  feature axes gathered first where explicit axes split them;
* a head size above :data:`MAX_HEAD`: a block of ``q``, ``k``, ``v`` and the accumulator no
  longer fits a GPU's registers or a TPU's vector memory at the block sizes below;
* float64 inputs on a GPU or TPU (neither has a float64 matrix unit: the XLA form keeps the
  float64 proof); on a CPU, forced with :func:`jlayers.formulation` ``("native")``, the
  kernels run in float64 in interpret mode.

Head sizes that are not a power of two (or under 16) are padded with zero features on GPUs
(Triton's blocks are powers of two): the scores and the output are unchanged, and the scale
stays ``1/√H`` of the true ``H``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

MAX_HEAD = 256
"""The largest head size a kernel takes."""

BLOCKS = {"triton": (64, 64), "mosaic": (128, 128)}
"""``(block_q, block_k)`` per backend, the one place they are chosen. Triton: 64 × 64 keeps
a block of ``q``, one of ``k`` and ``v`` and the ``[64, H]`` accumulator in registers up to
``H = 256`` with 4 warps (FlashAttention-2's choice for Ampere and Hopper). Mosaic: 128 × 128
fills the TPU's 128-wide matrix unit and lanes; fewer (a multiple of 8) for short sequences."""


class Spec(NamedTuple):
  """The static facts of one kernel call (hashable)."""

  causal: bool
  window: tuple[int, int] | None
  soft_cap: float | None
  scale: float
  block_q: int
  block_k: int
  t: int  # true query rows
  s: int  # true keys
  group: int  # query heads per key/value head
  segments: bool
  mask: tuple[bool, bool, bool, bool] | None  # which of (B, N, T, S) the mask has in full
  bias: tuple[bool, bool, bool, bool] | None
  sinks: bool


class Operands(NamedTuple):
  """The arrays besides ``q``, ``k``, ``v``: lengths always (defaults ``T``, ``S``), the
  others ``None`` where absent; sequence dimensions padded to whole blocks."""

  q_len: jax.Array  # int32[B]
  kv_len: jax.Array  # int32[B]
  q_seg: jax.Array | None  # int32[B, Tp]
  kv_seg: jax.Array | None  # int32[B, Sp]
  mask: jax.Array | None  # int8[Bm, Nm, Tm, Sm]
  bias: jax.Array | None  # float[Bb, Nb, Tb, Sb]
  sinks: jax.Array | None  # float32[N] (float64 for float64 inputs)


ORDER = ("q_seg", "kv_seg", "mask", "bias", "sinks")
"""The order in which a kernel takes the optional :class:`Operands` that a call has."""


def unpack(refs, ops):
  """``({name: ref}, rest)``: a kernel's refs of the optional operands ``ops`` has, in
  :data:`ORDER`, and the refs after them (its outputs and scratch)."""
  names = [name for name in ORDER if getattr(ops, name) is not None]
  return dict(zip(names, refs[:len(names)])), refs[len(names):]


def div(a, b):
  """``a // b`` for non-negative integers, as a truncating division: a kernel's index
  arithmetic (Mosaic lowers ``//`` through ``sign``, which needs a TPU to query)."""
  a = jnp.asarray(a)
  return lax.div(a, jnp.asarray(b, a.dtype))


def rem(a, b):
  """``a % b`` for non-negative integers (see :func:`div`)."""
  a = jnp.asarray(a)
  return lax.rem(a, jnp.asarray(b, a.dtype))


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def block_sizes(backend: str, t: int, s: int) -> tuple[int, int]:
  """``(block_q, block_k)`` for ``t`` rows and ``s`` keys on ``backend``: :data:`BLOCKS`,
  fewer for a short sequence (Triton: a power of two ≥ 16; Mosaic: a multiple of 8)."""
  bq, bk = BLOCKS[backend]
  if backend == "triton":
    fit = lambda n, b: min(b, max(16, 1 << max(0, n - 1).bit_length()))  # noqa: E731
  else:
    fit = lambda n, b: min(b, round_up(max(n, 1), 8))  # noqa: E731
  return fit(t, bq), fit(s, bk)


def head_major(block: int, *arrays, features: int | None = None):
  """``[B, T, N, H]`` arrays (one ``T``) head-major and padded: ``[B, N, Tp, Hp]`` with ``Tp``
  a whole number of ``block`` rows and ``Hp = features`` (zero features; default ``H``)."""
  size = round_up(arrays[0].shape[1], block)
  return [jnp.pad(a, ((0, 0), (0, size - a.shape[1]), (0, 0),
                      (0, (features or a.shape[3]) - a.shape[3]))).transpose(0, 2, 1, 3)
          for a in arrays]


def from_head_major(a, length: int, features: int):
  """The first ``length`` rows and ``features`` features of a kernel's ``[B, N, Tp, Hp]``
  result, as ``[B, T, N, H]``."""
  return a[:, :, :length, :features].transpose(0, 2, 1, 3)


def bias_gradient(db, spec: Spec):
  """A kernel's bias gradient, ``[B, N, Tp, Sx]`` or, where the bias broadcasts along
  queries, per query block (``[B, N, blocks, Sx]``, or ``[B, N, blocks, 1, Sx]`` on Mosaic),
  summed over those blocks and the batch and heads the bias broadcasts along, and unpadded to
  the bias's own ``[Bb, Nb, Tb, Sb]``."""
  b, n = db.shape[:2]
  if not spec.bias[2]:
    db = jnp.sum(db, axis=2).reshape(b, n, 1, db.shape[-1])
  axes = tuple(a for a in (0, 1) if not spec.bias[a])
  db = jnp.sum(db, axis=axes, keepdims=True) if axes else db
  return db[:, :, :spec.t if spec.bias[2] else 1, :spec.s if spec.bias[3] else 1]


def fallback(q, *, interpret: bool = False) -> str | None:
  """Why a call with queries ``q`` runs the XLA form instead of a kernel (interpreted on a CPU
  with ``interpret``), or ``None`` when it takes the kernel (the conditions of this module's
  docstring; the mesh's are :mod:`jlayers._attention_platforms`')."""
  if q.shape[-1] > MAX_HEAD:
    return f"head size {q.shape[-1]} > {MAX_HEAD}"
  if not interpret and q.dtype == jnp.float64:
    return "float64 inputs on an accelerator"
  return None


def prepare(extras, q, k, block_q: int, block_k: int, *, causal, window, soft_cap, scale,
            mask_dtype=jnp.int8) -> tuple[Spec, Operands]:
  """The static :class:`Spec` and padded :class:`Operands` of one call."""
  b, t, n, _ = q.shape
  s, heads = k.shape[1], k.shape[2]
  tp, sp = round_up(t, block_q), round_up(s, block_k)
  acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32

  def lengths(a, full):
    return (jnp.full((b,), full, jnp.int32) if a is None
            else jnp.clip(a.astype(jnp.int32), 0, full))

  def pad_to(a, axis, size, value=0):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths, constant_values=value)

  def pair(a, dtype):  # [Bx, Nx, Tx, Sx], sequence dimensions padded where full
    if a is None:
      return None, None
    full = tuple(m != 1 or f == 1 for m, f in zip(a.shape, (b, n, t, s)))
    a = a.astype(dtype)
    if a.shape[2] != 1:
      a = pad_to(a, 2, tp)
    if a.shape[3] != 1:
      a = pad_to(a, 3, sp)
    return a, full

  mask, mask_full = pair(extras.mask, mask_dtype)
  bias, bias_full = pair(extras.bias, extras.bias.dtype if extras.bias is not None else None)
  segments = extras.q_segment_ids is not None
  ops = Operands(
      lengths(extras.query_seq_lengths, t), lengths(extras.key_value_seq_lengths, s),
      pad_to(extras.q_segment_ids.astype(jnp.int32), 1, tp) if segments else None,
      pad_to(extras.kv_segment_ids.astype(jnp.int32), 1, sp) if segments else None,
      mask, bias, None if extras.sinks is None else extras.sinks.astype(acc))
  spec = Spec(causal, window, soft_cap, scale, block_q, block_k, t, s, n // heads, segments,
              mask_full, bias_full, extras.sinks is not None)
  return spec, ops


def visible(spec: Spec, rows, cols, q_len, kv_len, q_seg=None, kv_seg=None, mask=None):
  """Which entries of a block a query may see (bool, the block's shape): a real key before
  the row's key length, a row before its query length, and the causal mask, the window, the
  segment ids (``q_seg [bq, 1]`` against ``kv_seg [1, bk]``) and the mask allowing it."""
  seen = (cols < kv_len) & (rows < q_len)
  if spec.causal:
    seen &= cols <= rows
  if spec.window is not None:
    left, right = spec.window
    seen &= (cols >= rows - left) & (cols <= rows + right)
  if q_seg is not None:
    seen &= q_seg == kv_seg
  if mask is not None:
    seen &= mask != 0
  return seen


def logits(spec: Spec, q, k, bias, acc):
  """``(z, tanh or None)`` of a block: ``z = scale · q kᵀ + β``, soft-capped to
  ``c · tanh(z / c)`` with a cap (``tanh`` kept for the backward's chain factor)."""
  z = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=acc) * spec.scale
  if bias is not None:
    z = z + bias.astype(acc)
  if spec.soft_cap is None:
    return z, None
  tanh = jnp.tanh(z / spec.soft_cap)
  return spec.soft_cap * tanh, tanh


def probabilities(z, seen, lse):
  """``P = exp(z − L)`` where the entry is seen and the row saw a key (``L`` finite), else 0."""
  finite = jnp.isfinite(lse)
  safe = jnp.where(finite, lse, jnp.zeros_like(lse))
  return jnp.where(seen & finite, jnp.exp(z - safe), jnp.zeros_like(z))


def score_gradient(p, dp, delta, tanh):
  """``dz = P ∘ (dP − δ)``, times ``1 − tanh²`` under a soft cap (the derivation is
  :func:`jlayers.attention._attention_bwd`'s, steps 2 and 3)."""
  dz = p * (dp - delta)
  return dz if tanh is None else dz * (1 - tanh * tanh)


def key_range(spec: Spec, i, q_len, kv_len):
  """``(first, end)`` key blocks that rows ``i·bq … i·bq + bq − 1`` can see: from the window's
  left edge, to the diagonal (causal), the window's right edge and the key length; none for a
  block of rows past the query length."""
  bq, bk = spec.block_q, spec.block_k
  r0, r1 = i * bq, i * bq + bq - 1
  lo = 0
  end = jnp.minimum(kv_len, spec.s)
  if spec.causal:
    end = jnp.minimum(end, r1 + 1)
  if spec.window is not None:
    left, right = spec.window
    lo = div(jnp.maximum(r0 - left, 0), bk)
    end = jnp.minimum(end, r1 + right + 1)
  end = jnp.where(r0 < q_len, div(jnp.maximum(end, 0) + bk - 1, bk), 0)
  return lo, jnp.maximum(end, lo)


def query_range(spec: Spec, j, q_len, kv_len):
  """``(first, end)`` query blocks whose rows can see keys ``j·bk … j·bk + bk − 1``."""
  bq, bk = spec.block_q, spec.block_k
  c0, c1 = j * bk, j * bk + bk - 1
  lo = 0
  end = jnp.minimum(q_len, spec.t)
  if spec.causal:
    lo = div(c0, bq)
  if spec.window is not None:
    left, right = spec.window
    lo = jnp.maximum(lo, div(jnp.maximum(c0 - right, 0), bq))
    end = jnp.minimum(end, c1 + left + 1)
  end = jnp.where(c0 < kv_len, div(jnp.maximum(end, 0) + bq - 1, bq), 0)
  return lo, jnp.maximum(end, lo)
