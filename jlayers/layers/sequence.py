"""Sequence layers: token :class:`Embedding` and :class:`MultiHeadAttention`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jlayers import _checks, _kv_cache
from jlayers.attention import dot_product_attention_op
from jlayers.embedding import embedding_op
from jlayers.layers import base
from jlayers.layers.base import Initializer, Layer
from jlayers.linear import linear_op
from jlayers.normalization import rms_norm_op
from jlayers.rotary import rotary_embedding_op

default_embed_init = initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
"""Flax's embedding initialiser: unit-variance rows."""


@dataclasses.dataclass(frozen=True)
class Embedding(Layer):
  """A table of ``num_embeddings`` vectors of ``features``: ``apply`` looks ids up
  (:func:`jlayers.embedding`), :meth:`attend` scores vectors against every row (tied output
  logits).

  Params: ``{"embedding": float[num_embeddings, features]}`` in ``param_dtype``; no state.
  ``apply(params, state, ids)`` takes integer ids of any shape (``init``'s ``input_shape`` is
  theirs; pass ``input_dtype=jnp.int32`` when the layer starts a :class:`jlayers.Sequential`) and
  returns ``float[*ids.shape, features]``; ids outside ``[0, num_embeddings)`` give NaN rows.
  With ``dtype`` set, the looked-up rows are cast to it (the table stays in ``param_dtype``).
  """

  kind: ClassVar[str] = "embedding"
  num_embeddings: int
  features: int
  _: dataclasses.KW_ONLY
  dtype: Any = None
  param_dtype: Any = jnp.float32
  embedding_init: Initializer = default_embed_init

  def __post_init__(self):
    _checks.positive_int("Embedding", "num_embeddings", self.num_embeddings)
    _checks.positive_int("Embedding", "features", self.features)
    base.check_dtypes(self)
    _checks.initializer("Embedding", "embedding_init", self.embedding_init)

  def init(self, key, input_shape, *, input_dtype=jnp.int32):
    _checks.shape_of("Embedding", input_shape)
    return {"embedding": self.embedding_init(key, (self.num_embeddings, self.features),
                                             self.param_dtype)}, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("Embedding", train, impl)
    (table,) = base.entries(self, params, "params", ("embedding",))
    y = embedding_op.select(impl)(x, table)
    return (y if self.dtype is None else y.astype(self.dtype)), state

  def attend(self, params, x, *, impl: str = "manual") -> jax.Array:
    """Scores ``x: float[..., features]`` against every row: ``x @ embeddingᵀ``, through
    :func:`jlayers.linear` (in ``dtype``, or ``x``'s); returns ``float[..., num_embeddings]``
    (the output logits of a model whose input and output embeddings are tied)."""
    _checks.impl("Embedding.attend", impl)
    (table,) = base.entries(self, params, "params", ("embedding",))
    x = base.compute_dtype(self, x)
    if x.ndim < 1 or x.shape[-1] != self.features:
      raise ValueError(f"Embedding.attend: x must have shape (..., {self.features}), got "
                       f"{tuple(x.shape)}")
    # The barrier keeps XLA from folding the transpose into the weight gradient's product:
    # XLA:CPU (jaxlib 0.10.2) cannot run a bfloat16 product with both operands transposed and
    # a float32 result ("Unsupported element type for DotThunk"), which that fold creates.
    return linear_op.select(impl)(x, jax.lax.optimization_barrier(table.T))


@dataclasses.dataclass(frozen=True)
class MultiHeadAttention(Layer):
  r"""Multi-head (grouped-query) attention with rotary positions, QK-norm, windows, soft caps
  and sinks: projections, attention, output projection.

  For ``x: float[B, T, F]`` (and ``inputs_kv: float[B, S, F_kv]``, default ``x``):

  .. math::
    q = \mathrm{rope}(\mathrm{norm}(x W_q + b_q)), \quad
    k = \mathrm{rope}(\mathrm{norm}(x_{kv} W_k + b_k)), \quad v = x_{kv} W_v + b_v, \quad
    y = \mathrm{attention}(q, k, v)\, W_o + b_o

  with ``num_heads`` query heads and ``num_kv_heads`` key/value heads (default
  ``num_heads``; a divisor of it: grouped-query, ``1``: multi-query) of size
  ``qkv_features // num_heads``. ``norm`` (``qk_norm=True``, Qwen3 and Gemma 3) is an RMS norm
  of each head's query and key over its features with a learned scale per feature (applied as
  ``qk_norm_scale_offset + w``); ``rope`` (``rotary_base`` set) is
  :func:`jlayers.rotary_embedding` at ``positions`` with ``rotary_base``, ``rotary_dim``,
  ``rotary_interleaved`` and ``rotary_frequencies``. The attention is
  :func:`jlayers.dot_product_attention` with ``causal``, ``local_window_size``,
  ``logits_soft_cap``, ``scale`` (default ``1/√H``), ``sinks`` (a learned logit per query
  head, initialised to 0) and, from ``apply``, ``mask`` and ``segment_ids``. Every op runs
  its manual rule under ``impl="manual"``.

  Params: ``{"query", "key", "value", "out"}``, each ``{"kernel": float[in, out], "bias":
  float[out]}``: query ``[F, N·H]``, key and value ``[F_kv, K·H]``, out
  ``[N·H, out_features]``; biases where ``use_bias`` (all four), or ``qkv_bias`` and
  ``out_bias`` when given (Qwen2: ``qkv_bias=True, out_bias=False``); with ``qk_norm``,
  ``"query_norm"`` and ``"key_norm"`` ``{"scale": float[H]}``; with ``sinks``,
  ``"sinks": float[N]``. No state. ``qkv_features`` defaults to ``F``, ``out_features`` to
  ``F``, ``kv_features`` (the features of ``inputs_kv``) to ``F``. ``dtype``,
  ``param_dtype`` and ``precision`` work as for :class:`jlayers.Linear`.

  ``apply(params, state, x, *, inputs_kv=None, mask=None, positions=None, segment_ids=None,
  ...)``: ``mask`` is a bool of rank 4 broadcastable to ``[B, num_heads, T, S]`` (True: may
  attend); ``positions: int[T]`` or ``int[B, T]`` (default ``0..T−1``; keys take the same,
  so self-attention) rotate queries and keys; ``segment_ids: int[B, T]`` keep each query to
  the keys of its own segment (packed rows; self-attention). There is no dropout on the
  attention weights.

  Decoding (causal self-attention only): ``state`` is the layer's key/value cache
  (:meth:`init_cache`), and ``apply(params, cache, x, positions=..., cache_index=...,
  lengths=...)`` attends the ``T`` new tokens of each row to the ``cache_index[b]`` tokens
  the cache holds and to each other (causally, within the window), and returns the cache with
  their keys and values written (:mod:`jlayers._kv_cache` has the layout: one slot per token,
  or a ring of ``W`` slots for a window of ``W`` keys). ``cache_index: int[B]`` is the index
  of each row's first new token, ``lengths: int[B]`` how many of the ``T`` are real (default
  all); ``positions`` should be the tokens' positions (the model passes
  ``cache_index[:, None] + arange(T)``).
  """

  kind: ClassVar[str] = "multi_head_attention"
  num_heads: int
  _: dataclasses.KW_ONLY
  num_kv_heads: int | None = None
  causal: bool = False
  use_bias: bool = True
  qkv_bias: bool | None = None
  out_bias: bool | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  kv_features: int | None = None
  rotary_base: float | None = None
  rotary_dim: int | None = None
  rotary_interleaved: bool = False
  rotary_frequencies: tuple[float, ...] | None = None
  local_window_size: int | tuple[int, int] | None = None
  logits_soft_cap: float | None = None
  scale: float | None = None
  qk_norm: bool = False
  qk_norm_eps: float = 1e-6
  qk_norm_scale_offset: float = 0.0
  sinks: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = initializers.lecun_normal()
  bias_init: Initializer = initializers.zeros

  def __post_init__(self):
    where = "MultiHeadAttention"
    _checks.positive_int(where, "num_heads", self.num_heads)
    for name in ("num_kv_heads", "qkv_features", "out_features", "kv_features", "rotary_dim"):
      if getattr(self, name) is not None:
        _checks.positive_int(where, name, getattr(self, name))
    if self.num_heads % self.kv_heads:
      raise ValueError(f"{where}: num_kv_heads={self.kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    for name in ("causal", "use_bias", "rotary_interleaved", "qk_norm", "sinks"):
      _checks.flag(where, name, getattr(self, name))
    for name in ("qkv_bias", "out_bias"):
      if getattr(self, name) is not None:
        _checks.flag(where, name, getattr(self, name))
    if self.rotary_base is not None:
      base.set_field(self, "rotary_base",
                     _checks.positive_float(where, "rotary_base", self.rotary_base))
    elif self.rotary_dim is not None or self.rotary_frequencies is not None:
      raise ValueError(f"{where}: rotary_dim and rotary_frequencies need rotary_base (the "
                       "rotary embedding is off without it)")
    if self.rotary_frequencies is not None:
      base.set_field(self, "rotary_frequencies",
                     tuple(_checks.real(where, "rotary_frequencies[i]", f)
                           for f in self.rotary_frequencies))
    if self.logits_soft_cap is not None:
      _checks.positive_float(where, "logits_soft_cap", self.logits_soft_cap)
    _checks.optional_finite(where, "scale", self.scale)
    _checks.positive_float(where, "qk_norm_eps", self.qk_norm_eps)
    _checks.real(where, "qk_norm_scale_offset", self.qk_norm_scale_offset)
    base.check_dtypes(self)
    base.set_field(self, "precision", _checks.precision(where, self.precision))
    _checks.initializer(where, "kernel_init", self.kernel_init)
    _checks.initializer(where, "bias_init", self.bias_init)

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  def _has_bias(self, name: str) -> bool:
    given = self.out_bias if name == "out" else self.qkv_bias
    return self.use_bias if given is None else given

  def _sizes(self, features: int) -> dict[str, tuple[int, int]]:
    qkv = self.qkv_features or features
    if qkv % self.num_heads:
      raise ValueError(f"MultiHeadAttention: num_heads={self.num_heads} must divide "
                       f"qkv_features={qkv}")
    head = qkv // self.num_heads
    kv_in = self.kv_features or features
    return {"query": (features, self.num_heads * head), "key": (kv_in, self.kv_heads * head),
            "value": (kv_in, self.kv_heads * head),
            "out": (self.num_heads * head, self.out_features or features)}

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    shape = _checks.shape_of("MultiHeadAttention", input_shape, rank=3)
    params = {}
    sizes = self._sizes(shape[-1])
    for k, (name, (n_in, n_out)) in zip(jax.random.split(key, 4), sizes.items()):
      k_key, b_key = jax.random.split(k)
      params[name] = {"kernel": self.kernel_init(k_key, (n_in, n_out), self.param_dtype)}
      if self._has_bias(name):
        params[name]["bias"] = self.bias_init(b_key, (n_out,), self.param_dtype)
    head = sizes["query"][1] // self.num_heads
    if self.qk_norm:
      for name in ("query_norm", "key_norm"):
        params[name] = {"scale": jnp.full((head,), 1 - self.qk_norm_scale_offset,
                                          self.param_dtype)}
    if self.sinks:
      params["sinks"] = jnp.zeros((self.num_heads,), self.param_dtype)
    return params, {}

  @property
  def cache_window(self) -> int | None:
    """The keys a query sees in decoding (itself included), ``None`` for all: ``left + 1`` of
    a causal ``local_window_size``."""
    if self.local_window_size is None:
      return None
    left = (self.local_window_size if isinstance(self.local_window_size, int)
            else self.local_window_size[0])
    return left + 1

  def _check_cacheable(self, where: str) -> None:
    window = self.local_window_size
    right = (None if window is None else window if isinstance(window, int) else window[1])
    if not self.causal or right not in (None, 0):
      raise ValueError(f"{where}: a key/value cache is for causal self-attention (causal=True, "
                       f"no window to the right), got causal={self.causal}, "
                       f"local_window_size={window}")

  def init_cache(self, batch_size: int, max_length: int, *, features: int,
                 dtype=jnp.float32) -> dict:
    """An empty key/value cache for ``batch_size`` rows of up to ``max_length`` tokens of
    ``features`` (the input's width): ``{"key", "value"}``, each
    ``dtype[batch_size, num_kv_heads, slots, head_features]`` of zeros, with ``slots =
    max_length``, or ``min(W, max_length)`` for a window of ``W`` keys (a ring). Pass it as
    ``apply``'s state."""
    where = "MultiHeadAttention.init_cache"
    self._check_cacheable(where)
    _checks.positive_int(where, "batch_size", batch_size)
    _checks.positive_int(where, "max_length", max_length)
    shape = self._cache_shape(batch_size, max_length, features)
    dtype = _checks.float_dtype(where, "dtype", dtype, optional=False)
    return {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}

  def _cache_shape(self, batch_size, max_length, features):
    head = self._sizes(features)["query"][1] // self.num_heads
    return (batch_size, self.kv_heads, _kv_cache.slots(self.cache_window, max_length), head)

  def _names(self) -> tuple[str, ...]:
    return (("query", "key", "value", "out") + (("query_norm", "key_norm") if self.qk_norm
                                                 else ()) + (("sinks",) if self.sinks else ()))

  def _project(self, params, name, x, impl):
    names = ("kernel", "bias") if self._has_bias(name) else ("kernel",)
    weights = base.entries(self, params[name], f"params[{name!r}]", names)
    return linear_op.select(impl)(x, *weights, precision=self.precision)

  def _norm(self, params, name, x, impl):
    (w,) = base.entries(self, params[name], f"params[{name!r}]", ("scale",))
    w = w.astype(_checks.at_least_float32(w.dtype)) + self.qk_norm_scale_offset
    return rms_norm_op.select(impl)(x, w.astype(x.dtype), eps=self.qk_norm_eps)

  def _rope(self, x, positions, impl):
    frequencies = (None if self.rotary_frequencies is None
                   else jnp.asarray(self.rotary_frequencies, jnp.float32))
    return rotary_embedding_op.select(impl)(
        x, positions, base=self.rotary_base, rotary_dim=self.rotary_dim,
        interleaved=self.rotary_interleaved, frequencies=frequencies)

  def apply(self, params, state, x, *, inputs_kv=None, mask=None, positions=None,
            segment_ids=None, cache_index=None, lengths=None, key=None, train=False,
            impl="manual"):
    where = "MultiHeadAttention"
    _checks.static_call(where, train, impl)
    if state or cache_index is not None:
      self._check_decoding(where, state, x, inputs_kv, mask, segment_ids, cache_index)
    base.entries(self, params, "params", self._names())
    x = base.compute_dtype(self, x)
    kv = x if inputs_kv is None else base.compute_dtype(self, inputs_kv)
    for name, a in (("x", x), ("inputs_kv", kv)):
      if a.ndim != 3:
        raise ValueError(f"{where}: {name} must have rank 3 (B, T, features), got shape "
                         f"{tuple(a.shape)}")
    sizes = self._sizes(x.shape[-1])
    for name, a, want in (("x", x, sizes["query"][0]), ("inputs_kv", kv, sizes["key"][0])):
      if a.shape[-1] != want:
        raise ValueError(f"{where}: {name} must have {want} features (as at init), got shape "
                         f"{tuple(a.shape)}")
    if (positions is not None or segment_ids is not None) and inputs_kv is not None:
      raise ValueError(f"{where}: positions and segment_ids are for self-attention (no "
                       "inputs_kv)")
    b, t = x.shape[:2]
    head = sizes["query"][1] // self.num_heads
    q = self._project(params, "query", x, impl).reshape(b, t, self.num_heads, head)
    k, v = (self._project(params, name, kv, impl).reshape(b, kv.shape[1], self.kv_heads, head)
            for name in ("key", "value"))
    if self.qk_norm:
      q, k = self._norm(params, "query_norm", q, impl), self._norm(params, "key_norm", k, impl)
    if positions is not None and self.rotary_base is None:
      raise ValueError(f"{where}: positions were given, but the layer has no rotary embedding "
                       "(rotary_base=None)")
    if self.rotary_base is not None:
      if positions is None and state:  # decoding: the new tokens follow the cached ones
        positions = cache_index[:, None] + jnp.arange(t, dtype=cache_index.dtype)[None, :]
      elif positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
      q, k = self._rope(q, positions, impl), self._rope(k, positions, impl)
    sinks = params["sinks"] if self.sinks else None
    if state:
      count = jnp.full((b,), t, jnp.int32) if lengths is None else lengths

      def attention(q, k, v, **visibility):  # in the cache's dtype
        return dot_product_attention_op.select(impl)(
            q.astype(k.dtype), k, v, scale=self.scale, logits_soft_cap=self.logits_soft_cap,
            sinks=sinks, **visibility).astype(q.dtype)

      o, state, overflow = _kv_cache.attend(attention, q, k, v, state, cache_index, count,
                                            window=self.cache_window)
      o = _kv_cache.poison(o, overflow)
    else:
      o = dot_product_attention_op.select(impl)(
          q, k, v, mask=mask, causal=self.causal, scale=self.scale,
          local_window_size=self.local_window_size, logits_soft_cap=self.logits_soft_cap,
          q_segment_ids=segment_ids, sinks=sinks)
    return self._project(params, "out", o.reshape(b, t, self.num_heads * head), impl), state

  def _check_decoding(self, where, cache, x, inputs_kv, mask, segment_ids, cache_index):
    self._check_cacheable(where)
    if not cache or cache_index is None:
      raise ValueError(f"{where}: decoding needs both the cache (as state) and cache_index")
    if inputs_kv is not None or mask is not None or segment_ids is not None:
      raise ValueError(f"{where}: with a cache, inputs_kv, mask and segment_ids must be None")
    want = self._cache_shape(x.shape[0], 1, x.shape[-1])
    for name in ("key", "value"):
      got = jnp.shape(cache.get(name)) if isinstance(cache, dict) else ()
      window = self.cache_window
      ok = (len(got) == 4 and got[:2] == want[:2] and got[3] == want[3]
            and (window is None or got[2] <= window)
            and jnp.issubdtype(jnp.result_type(cache[name]), jnp.floating))
      if not ok:
        raise ValueError(f"{where}: the cache's {name!r} must have shape (B, K, slots, H) = "
                         f"({want[0]}, {want[1]}, slots{'' if window is None else f' <= {window}'}"
                         f", {want[3]}) and a float dtype, got {got}: a cache built for "
                         "another model or batch")
