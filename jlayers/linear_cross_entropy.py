"""A language model's output layer and its loss in one op: softmax cross-entropy against
integer labels of the logits ``x @ w``, in memory that does not grow with tokens × vocabulary.

The logits of ``N`` tokens over a vocabulary of ``V`` are ``N · V`` floats (4 GiB for 8 192
tokens and 131 072 words in float32), and autodiff of ``linear`` followed by the loss keeps
them and their gradient. This op walks over blocks of tokens, forms each block's logits,
reduces them and lets them go; it saves one log-sum-exp per token and recomputes the blocks in
the backward pass, or, when the loss is reduced to one number, forms the whole gradient in the
forward pass. Block sizes come from a byte budget per platform, picked when lowering
(:mod:`jlayers._token_blocks`: 32 MiB on a CPU, 128 MiB on GPUs and TPUs). On accelerators the
op stays in XLA, without a Pallas kernel: a block lowers to its product (``dot_general``: the
vendor's matrix kernels), one fusion of the softmax and loss, and the two gradient products; a
fused kernel would save one round trip of a block's logits through memory, bounded by the
budget, not the ``T · V`` that the blocks already save.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _logits, _ops, _sharding, _token_blocks
from jlayers.loss import softmax_cross_entropy_with_integer_labels_reference

_OP = "linear_cross_entropy"
_REDUCTIONS = ("none", "mean", "sum")

class _Config(NamedTuple):
  """Static configuration (hashable; goes in ``nondiff_argnums``)."""

  alpha: float  # label smoothing
  z: float  # z-loss coefficient
  cap: float | None  # logits soft cap
  reduction: str


def _validate(x, w, labels, where, label_smoothing, z_loss, logits_soft_cap, reduction):
  x = _checks.floating(_OP, "x", x)
  w = _checks.floating(_OP, "w", w)
  _checks.min_rank(_OP, "x", x, 1, "(..., H)")
  _checks.rank(_OP, "w", w, 2, "(H, V)")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"{_OP}: x's last dimension (H) must equal w's first, got x "
                     f"{tuple(x.shape)} and w {tuple(w.shape)}")
  if w.shape[1] == 0:
    raise ValueError(f"{_OP}: w must have at least one column (V >= 1), got {tuple(w.shape)}")
  labels = _checks.as_array(_OP, "labels", labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"{_OP}: labels must have an integer dtype, got {labels.dtype}")
  _checks.shape(_OP, "labels", labels, x.shape[:-1], "(x.shape[:-1])")
  if where is not None:
    where = _checks.as_array(_OP, "where", where)
    if where.dtype != jnp.bool_:
      raise TypeError(f"{_OP}: where must have dtype bool, got {where.dtype}")
    _checks.shape(_OP, "where", where, x.shape[:-1], "(x.shape[:-1], one flag per token)")
    where = _sharding.reshard_like(where, x)
  if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
    raise ValueError(f"{_OP}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
  cap = logits_soft_cap
  config = _Config(
      _checks.real(_OP, "label_smoothing", label_smoothing, 0, 1),
      _checks.real(_OP, "z_loss", z_loss, 0),
      None if cap is None else _checks.positive_float(_OP, "logits_soft_cap", cap), reduction)
  return x, w, _sharding.reshard_like(labels, x), where, config


def linear_cross_entropy(
    x: jax.Array, w: jax.Array, labels: jax.Array, *, where: jax.Array | None = None,
    label_smoothing: float = 0.0, z_loss: float = 0.0, logits_soft_cap: float | None = None,
    reduction: str = "none") -> jax.Array:
  r"""Softmax cross-entropy of the logits ``x @ w`` against integer labels, blocked over tokens,
  with a manual VJP.

  Per token, with logits :math:`s = x W` (soft-capped to :math:`c = κ \tanh(s / κ)` with a cap
  :math:`κ`, as Gemma 2; else :math:`c = s`), :math:`λ = \mathrm{logsumexp}(c)`, label
  :math:`y`, smoothing :math:`α` and z-loss coefficient :math:`ζ` (PaLM):

  .. math::
    \ell = (1 - α)(λ - c_y) + \frac{α}{V} \sum_j (λ - c_j) + ζ λ^2

  For ``z_loss=0`` and no cap this is
  ``softmax_cross_entropy_with_integer_labels(linear(x, w), labels, where=where,
  label_smoothing=α)`` (exactly for float32 and float64 ``x``; ``linear`` rounds logits to a
  half-precision ``x``'s dtype, this op keeps them in float32), with its conventions: a token
  whose ``where`` is False has loss 0 and a zero row of ``dlogits`` whatever its label (padding
  labels such as -1 are fine); a counted token whose label is outside ``[0, V)`` has a NaN
  loss and NaN gradients (its row of ``dx`` and, through ``xᵀ dlogits``, all of ``dw``), so a
  bad label never passes silently. ``reduction="mean"`` divides the sum over the counted
  tokens by their number (all tokens without ``where``); the mean of no token is 0, with zero
  gradients, as the sum is.

  The forward runs over blocks of tokens (a ``lax.fori_loop``; one byte budget,
  ``jlayers._token_blocks.BLOCK_BYTES``, sizes them) and never holds more than one block of
  logits. With ``reduction="none"`` it saves ``x``, ``w``, the labels, ``where`` and one
  log-sum-exp per token, and the backward recomputes each block's logits: four matrix
  products in all, against autodiff's three. With ``"mean"`` or ``"sum"`` the output is one
  number whose cotangent only scales the gradient, so the forward forms ``dx`` and ``dw``
  from the logits it holds, saves them and the backward scales them: three products, as
  autodiff, which is what keeps this reduction as fast as the unfused twin. Under
  ``jax.jit`` without differentiation only the loss is computed. On a mesh whose first axis of
  ``x`` is split (data parallel), every device runs its own tokens and the ``[H, V]`` partial
  weight gradients are added up: one all-reduce, nothing of the batch's size moves; labels and
  ``where`` may be split as ``x``, replicated or constants. With ``w``'s columns split over
  other mesh axes (vocabulary parallel, explicit axes) each device keeps its columns: a
  token's maximum, sum of exponentials, label logit and logit sum are combined across them
  (a few numbers per token), and so is its row of ``dx``; nothing of ``w``'s size or of
  tokens × vocabulary moves.

  Logits, log-sum-exps, probabilities and accumulations are in float32 (float64 for float64
  ``x``). As :func:`jlayers.linear`, ``w`` is cast to ``x``'s dtype for the products, which
  accumulate in at least float32; the loss is returned in ``x``'s dtype and each gradient in
  its input's dtype.

  Args:
    x: float[..., H], one row of features per token.
    w: float[H, V], any float dtype; for tied embeddings pass ``table.T``.
    labels: int[...] of ``x.shape[:-1]``, any integer dtype. Not differentiable.
    where: optional bool[...] of ``x.shape[:-1]``: the tokens that count.
    label_smoothing: :math:`α`, a float in ``[0, 1]``.
    z_loss: :math:`ζ`, a float ``>= 0``.
    logits_soft_cap: ``None`` or :math:`κ > 0`.
    reduction: ``"none"`` (one loss per token, as optax), ``"mean"`` or ``"sum"``.

  Returns:
    float[...] of ``x.shape[:-1]`` for ``"none"``, else float[] (a scalar); in ``x``'s dtype.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> w = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # logits [1, 0, 0] and [0, 2, 0]
    >>> loss = jlayers.linear_cross_entropy(x, w, jnp.array([0, 1]))
    >>> [round(v, 4) for v in loss.tolist()]  # log(e + 2) - 1, log(e^2 + 2) - 2
    [0.5514, 0.2395]
    >>> round(float(jlayers.linear_cross_entropy(x, w, jnp.array([0, 1]), reduction="mean")), 4)
    0.3955
  """
  x, w, labels, where, config = _validate(x, w, labels, where, label_smoothing, z_loss,
                                          logits_soft_cap, reduction)
  return _lce(config, x, w, labels, where)


def _sweep(config, x, w, labels, keep, g=None, lse=None, vocab=None):
  """The loop over blocks of tokens of ``x: float[n, H]``, with per-token ``labels``, ``keep``
  (or None), ``g`` (the losses' cotangents) and ``lse``. Returns a dict: ``loss`` and ``lse``
  without ``g``; with ``g``, ``loss``, ``dx`` and ``dw``, the probabilities taken from each
  block's own log-sum-exp, or, given ``lse`` (the backward), ``dx`` and ``dw`` only.

  ``vocab = (mesh axes, V, offset)``: under ``shard_map``, ``w`` is this device's columns
  ``offset …`` of ``V`` (vocabulary parallel). A token's maximum, sum of exponentials, label
  logit and logit sum are then added (or maxed) over those axes — one number per token — and
  so is its row of ``dx``; ``dw`` stays this device's columns."""
  n, h = x.shape
  v = w.shape[1]
  names, vt, offset = vocab if vocab else ((), v, 0)
  psum = (lambda a: lax.psum(a, names)) if names else (lambda a: a)
  acc = _checks.at_least_float32(x.dtype)
  wc = w.astype(x.dtype)
  alpha, z, cap = config.alpha, config.z, config.cap
  shapes = {"loss": ((n,), acc)} if lse is None else {}
  shapes.update({"lse": ((n,), acc)} if g is None else {"dx": ((n, h), x.dtype),
                                                         "dw": ((h, v), acc)})
  carry = {k: _token_blocks.zeros(*shape, x, names if k == "dw" else ())
           for k, shape in shapes.items()}

  def step(b, cols, i, carry):
    start, fresh = _token_blocks.clamped(i, b, n)
    cut = functools.partial(lax.dynamic_slice_in_dim, start_index=start, slice_size=b)
    put = functools.partial(lax.dynamic_update_slice_in_dim, start_index=start, axis=0)
    xb = cut(x)
    s = lax.dot_general(xb, wc, (((1,), (0,)), ((), ())), preferred_element_type=acc)
    t = None if cap is None else jnp.tanh(s / cap)
    c = s if cap is None else cap * t
    idx, in_range = (a[:, None] for a in _logits.label_index(cut(labels), vt))
    idx = idx - offset  # this device's column of the label (outside [0, v): another's)
    here = (idx >= 0) & (idx < v)
    kb = None if keep is None else cut(keep)[:, None]
    carry = dict(carry)
    if lse is None:
      m = jnp.max(c, axis=1, keepdims=True)
      m = lax.pmax(m, names) if names else m
      log_s = jnp.log(psum(jnp.sum(jnp.exp(c - m), axis=1, keepdims=True)))
      lse_b = jnp.where(in_range, m + log_s, jnp.full_like(m, jnp.nan))
      label = jnp.take_along_axis(c, jnp.clip(idx, 0, v - 1), axis=1)
      loss = log_s - (psum(jnp.where(here, label, jnp.zeros_like(label))) - m)
      if alpha:
        mean = psum(jnp.sum(c, axis=1, keepdims=True)) / vt
        loss = (1 - alpha) * loss + alpha * (log_s - (mean - m))
      loss = _logits.masked(kb, jnp.where(in_range, loss + z * lse_b * lse_b, lse_b))
      carry["loss"] = put(carry["loss"], loss[:, 0])
      p = jnp.exp((c - m) - log_s)
    else:
      lse_b = cut(lse)[:, None]
      p = jnp.exp(c - lse_b)
    if g is None:
      carry["lse"] = put(carry["lse"], lse_b[:, 0])
      return carry
    gb = cut(g)[:, None].astype(acc)
    ds = (gb * (1 + 2 * z * lse_b)) * p - gb * (alpha / vt)
    ds = ds - jnp.where(lax.broadcasted_iota(jnp.int32, ds.shape, 1) == idx, gb * (1 - alpha),
                        jnp.zeros_like(gb))
    if cap is not None:
      ds = ds * (1 - t * t)
    ds = _logits.masked(kb, ds).astype(x.dtype)
    dxb = psum(lax.dot_general(ds, wc, (((1,), (1,)), ((), ())), preferred_element_type=acc))
    carry["dx"] = put(carry["dx"], dxb.astype(x.dtype))
    fresh_x = jnp.where(fresh[:, None], xb, jnp.zeros_like(xb))  # rows the last block repeats
    carry["dw"] = _token_blocks.add_outer(carry["dw"], fresh_x, ds, cols)
    return carry

  def sweep(sizes, carry=carry):
    blocks = -(-n // sizes[0]) if n else 0
    if blocks == 1:  # no loop: XLA then fuses the block with what surrounds it
      return step(*sizes, 0, carry)
    return lax.fori_loop(0, blocks, functools.partial(step, *sizes), carry) if blocks else carry

  carry = _token_blocks.per_platform(sweep, n, h, v, acc.itemsize)
  if "dw" in carry:
    carry["dw"] = carry["dw"].astype(w.dtype)
  return carry


def _tokens(config, x, w, labels, keep, g=None, lse=None):
  """:func:`_sweep` on ``x: float[..., H]`` and per-token arrays of ``x.shape[:-1]``, results
  shaped likewise; on a mesh each device sweeps its own tokens and ``dw`` is added up
  (:func:`jlayers._token_blocks.per_device`)."""
  split = {"x": x, "labels": labels, "keep": keep, "g": g, "lse": lse}
  split = {k: a for k, a in split.items() if a is not None}

  def local(split, w, vocab=None):
    lead = split["x"].shape[:-1]
    flat = {k: a.reshape(math.prod(lead), *a.shape[len(lead):]) for k, a in split.items()}
    out = _sweep(config, flat["x"], w, flat["labels"], flat.get("keep"), flat.get("g"),
                 flat.get("lse"), vocab)
    return {k: a if k == "dw" else a.reshape(*lead, *a.shape[1:]) for k, a in out.items()}

  keys = (("loss",) if lse is None else ()) + (("lse",) if g is None else ("dx", "dw"))
  return _token_blocks.per_device(local, x, split, w, keys, summed=("dw",))


def _reduce(config, loss, keep):
  """The per-token losses reduced as ``config.reduction`` says."""
  if config.reduction == "none":
    return loss
  total = jnp.sum(loss)
  return total if config.reduction == "sum" else total * _mean_scale(loss.shape, keep, loss.dtype)


def _mean_scale(lead, keep, dtype):
  """``1 / count`` of the kept tokens, 1 when none is kept (the mean of no token is 0)."""
  count = math.prod(lead) if keep is None else jnp.sum(keep, dtype=jnp.int32)
  return 1 / jnp.maximum(jnp.asarray(count, dtype), 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lce(config, x, w, labels, keep):
  loss = _tokens(config, x, w, labels, keep)["loss"]
  return _reduce(config, loss, keep).astype(x.dtype)


def _lce_fwd(config, x, w, labels, keep):
  r"""With ``reduction="none"``: saves ``x``, ``w``, the labels, ``where`` (inputs all) and one
  log-sum-exp :math:`λ` per token (float32 or wider; NaN for a counted label out of range):
  the backward needs the probabilities of every token over the whole vocabulary, and
  :math:`λ` is what turns a recomputed block of logits into them, :math:`p = e^{c - λ}`.
  Saving ``p`` or the logits would be a ``[tokens, V]`` buffer, the memory this op avoids.

  With ``"mean"`` or ``"sum"``: the output is one number, so its cotangent :math:`g` is one
  number too and the gradients are :math:`g` times those of cotangent 1, which the forward
  forms from the blocks of logits it holds anyway (the probabilities from each block's own
  log-sum-exp, each token's loss weighted by its share of the reduction). It saves ``dx`` and
  ``dw`` (in ``x``'s and ``w``'s dtypes, the sizes of the inputs they replace) and no logits:
  a backward that recomputed them would cost a fourth matrix product. The residuals are
  computed from the inputs by differentiable operations, so the rule can be differentiated
  again.
  """
  if config.reduction == "none":
    out = _tokens(config, x, w, labels, keep)
    return out["loss"].astype(x.dtype), (x, w, labels, keep, out["lse"])
  acc = _checks.at_least_float32(x.dtype)
  weights = jnp.ones(x.shape[:-1], acc) if keep is None else keep.astype(acc)
  if config.reduction == "mean":
    weights = weights * _mean_scale(x.shape[:-1], keep, acc)
  out = _tokens(config, x, w, labels, keep, g=weights)
  grads = (_sharding.reshard_as(out["dx"], x), _sharding.reshard_as(out["dw"], w))
  return _reduce(config, out["loss"], keep).astype(x.dtype), grads


def _lce_bwd(config, res, g):
  r"""Backward for the cotangent :math:`g_t = ∂J/∂\ell_t` of each token's loss (with a
  reduction, :math:`g` times the token's weight: 1 for ``"sum"``, :math:`1/n_\text{kept}` for
  ``"mean"``, 0 for a dropped token).

  1. One token's loss as a function of its logits :math:`c`, with
     :math:`p = \mathrm{softmax}(c)` and :math:`∂λ/∂c_j = p_j`:

     .. math::
       \frac{∂ \ell}{∂ c_j} = (1-α)(p_j - [j = y]) + α \left(p_j - \frac{1}{V}\right)
         + 2 ζ λ p_j = (1 + 2ζλ)\, p_j - (1 - α)[j = y] - \frac{α}{V}

  2. The soft cap, :math:`c = κ \tanh(s / κ)`: :math:`∂c_j/∂s_j = 1 - \tanh^2(s_j/κ)`, so
     :math:`∂\ell/∂s_j = ∂\ell/∂c_j · (1 - \tanh^2(s_j/κ))`.
  3. With :math:`D_{tj} = g_t\, ∂\ell_t/∂s_{tj}` (0 for a dropped token) and
     :math:`s_{tj} = \sum_i x_{ti} W_{ij}`, as for ``linear``:

     .. math::
       \frac{∂J}{∂x_{ti}} = \sum_j D_{tj} W_{ij} \;\Rightarrow\; dx = D W^T, \qquad
       \frac{∂J}{∂W_{ij}} = \sum_t x_{ti} D_{tj} \;\Rightarrow\; dW = x^T D

  Each block of tokens forms its rows of :math:`D` from recomputed logits and the saved
  :math:`λ`, writes its rows of ``dx`` and adds its share of ``dW`` (a slice of columns at a
  time). With a reduction, the forward did exactly this for :math:`g = 1`; here the saved
  gradients are scaled by :math:`g`. Labels and ``where`` get ``None``.
  """
  if config.reduction != "none":
    dx, dw = res
    scaled = lambda d: (g.astype(_checks.at_least_float32(d.dtype))
                        * d.astype(_checks.at_least_float32(d.dtype))).astype(d.dtype)
    return scaled(dx), scaled(dw), None, None
  x, w, labels, keep, lse = res
  out = _tokens(config, x, w, labels, keep, g=g, lse=lse)
  return (_sharding.reshard_as(out["dx"], x), _sharding.reshard_as(out["dw"], w), None, None)


_lce.defvjp(_lce_fwd, _lce_bwd)


def linear_cross_entropy_reference(
    x: jax.Array, w: jax.Array, labels: jax.Array, *, where: jax.Array | None = None,
    label_smoothing: float = 0.0, z_loss: float = 0.0, logits_soft_cap: float | None = None,
    reduction: str = "none") -> jax.Array:
  """Autodiff twin of :func:`linear_cross_entropy`: same signature and checks; the whole
  ``[..., V]`` logits ``x @ w`` (products in ``x``'s dtype, accumulated in at least float32),
  soft-capped, then the twin of ``softmax_cross_entropy_with_integer_labels``, plus
  ``ζ · logsumexp²`` on the counted tokens, then the reduction."""
  x, w, labels, where, config = _validate(x, w, labels, where, label_smoothing, z_loss,
                                          logits_soft_cap, reduction)
  acc = _checks.at_least_float32(x.dtype)
  s = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                      preferred_element_type=acc)
  if config.cap is not None:
    s = config.cap * jnp.tanh(s / config.cap)
  loss = softmax_cross_entropy_with_integer_labels_reference(
      s, labels, where=where, label_smoothing=config.alpha)
  if config.z:
    lse = jax.nn.logsumexp(s, axis=-1)
    loss = loss + _logits.masked(where, config.z * lse * lse)
  return _reduce(config, loss, where).astype(x.dtype)


linear_cross_entropy_op = _ops.declare(_OP, linear_cross_entropy, linear_cross_entropy_reference)
