"""Decoder-only transformer language models built from jlayers layers: GPT-2, Llama 2/3,
Mistral, Qwen2 and Gemma 2 as configurations of one :class:`TransformerLM`.

Every op of them (embedding lookups, norms, projections, rotary embeddings, attention with its
windows and soft caps, the gated MLPs, the tied or untied output projection and the training
loss) runs its hand-derived backward pass under ``impl="manual"`` and autodiff of the twins
under ``impl="autodiff"``. Training goes through :meth:`TransformerLM.loss`, which hands the
final hidden states to :func:`jlayers.linear_cross_entropy`: the logits are never formed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlayers import _checks, _kv_cache, _sharding
from jlayers.layers import (GELU, Embedding, GatedMLP, LayerNorm, Linear, MultiHeadAttention,
                            RMSNorm, base)
from jlayers.linear_cross_entropy import linear_cross_entropy_op
from jlayers.models import Composite, Remat, Residual, Sequential


def transformer_block(features: int, heads: int, *, num_kv_heads: int | None = None,
                      mlp_features: int | None = None, causal: bool = True, dtype=None,
                      param_dtype=jnp.float32) -> Sequential:
  """One pre-norm GPT block as a :class:`jlayers.Sequential`: ``x + attention(norm(x))``,
  then ``x + mlp(norm(x))``, of two :class:`jlayers.Residual` s::

    attention: LayerNorm → MultiHeadAttention(heads, causal) → + x
    mlp:       LayerNorm → Linear(mlp_features) → GELU → Linear(features) → + x

  ``mlp_features`` defaults to ``4 · features``. Maps ``float[B, T, features]`` to the same.
  (:class:`DecoderBlock` is the block of :class:`TransformerLM`, with every option.)
  """
  kw = {"dtype": dtype, "param_dtype": param_dtype}
  mlp = mlp_features or 4 * features
  return Sequential({
      "attention": Residual(Sequential({
          "norm": LayerNorm(**kw),
          "attention": MultiHeadAttention(heads, num_kv_heads=num_kv_heads, causal=causal, **kw),
      })),
      "mlp": Residual(Sequential({
          "norm": LayerNorm(**kw), "fc1": Linear(mlp, **kw), "gelu": GELU(),
          "fc2": Linear(features, **kw),
      })),
  })


_MLPS = ("gelu", "swiglu", "geglu")
_NORMS = ("layer", "rms")


@dataclasses.dataclass(frozen=True)
class DecoderBlock(Composite):
  r"""One pre-norm causal decoder block:

  .. math::
    x ← x + \mathrm{post}_a(\mathrm{attention}(\mathrm{norm}_a(x))), \qquad
    x ← x + \mathrm{post}_m(\mathrm{mlp}(\mathrm{norm}_m(x)))

  ``norm`` is ``"layer"`` (:class:`jlayers.LayerNorm`, with an offset where ``use_bias``) or
  ``"rms"`` (:class:`jlayers.RMSNorm`, its scale applied as ``norm_scale_offset + w``); the
  ``post`` norms exist with ``post_norms`` (Gemma 2) and are the identity otherwise. ``mlp``
  is ``"gelu"`` (``Linear → GELU (tanh) → Linear``, GPT-2), ``"swiglu"`` or ``"geglu"``
  (:class:`jlayers.GatedMLP` with SiLU or tanh-GELU). The attention is a causal
  :class:`jlayers.MultiHeadAttention` with every option passed on (``attention`` holds its
  keyword arguments: rotary embedding, window, soft cap, scale, QK-norm, sinks, biases).

  Params: ``{"attention_norm", "attention", "mlp_norm", "mlp"}`` (and
  ``"attention_post_norm"``, ``"mlp_post_norm"`` with ``post_norms``). Maps
  ``float[B, T, features]`` to the same; ``apply`` takes ``positions`` and ``segment_ids`` for
  the attention.
  """

  kind: ClassVar[str] = "decoder_block"
  features: int
  heads: int
  _: dataclasses.KW_ONLY
  mlp_features: int | None = None
  mlp: str = "gelu"
  norm: str = "layer"
  norm_eps: float = 1e-5
  norm_scale_offset: float = 0.0
  post_norms: bool = False
  use_bias: bool = True
  attention: tuple = ()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    where = "DecoderBlock"
    for name in ("features", "heads"):
      _checks.positive_int(where, name, getattr(self, name))
    if self.mlp not in _MLPS:
      raise ValueError(f"{where}: mlp must be one of {_MLPS}, got {self.mlp!r}")
    if self.norm not in _NORMS:
      raise ValueError(f"{where}: norm must be one of {_NORMS}, got {self.norm!r}")
    if isinstance(self.attention, Mapping):
      base.set_field(self, "attention", tuple(sorted(self.attention.items())))
    self._attention()  # the attention's own checks, at construction

  def _kw(self):
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}

  def _norm(self):
    if self.norm == "layer":
      return LayerNorm(eps=self.norm_eps, use_offset=self.use_bias, **self._kw())
    return RMSNorm(eps=self.norm_eps, scale_offset=self.norm_scale_offset, **self._kw())

  def _attention(self):
    options = {"qkv_features": None, "use_bias": self.use_bias, **dict(self.attention)}
    return MultiHeadAttention(self.heads, causal=True, **options, **self._kw())

  def _mlp(self):
    hidden = self.mlp_features or 4 * self.features
    if self.mlp == "gelu":
      return Sequential({"fc1": Linear(hidden, use_bias=self.use_bias, **self._kw()),
                         "gelu": GELU(),
                         "fc2": Linear(self.features, use_bias=self.use_bias, **self._kw())})
    return GatedMLP(hidden, activation="silu" if self.mlp == "swiglu" else "gelu_tanh",
                    use_bias=self.use_bias, **self._kw())

  def forward(self, scope, x, *, positions=None, segment_ids=None, cache_index=None,
              lengths=None):
    h = scope("attention_norm", self._norm(), x)
    h = scope("attention", self._attention(), h, positions=positions, segment_ids=segment_ids,
              cache_index=cache_index, lengths=lengths)
    if self.post_norms:
      h = scope("attention_post_norm", self._norm(), h)
    x = x + h
    h = scope("mlp", self._mlp(), scope("mlp_norm", self._norm(), x))
    if self.post_norms:
      h = scope("mlp_post_norm", self._norm(), h)
    return x + h

  def init_cache(self, batch_size: int, max_length: int, *, dtype=jnp.float32) -> dict:
    """The block's empty key/value cache (its state for decoding): ``{"attention": ...}``
    of :meth:`jlayers.MultiHeadAttention.init_cache`."""
    return {"attention": self._attention().init_cache(batch_size, max_length,
                                                      features=self.features, dtype=dtype)}


def llama3_frequencies(base: float, rotary_dim: int, *, factor: float, low_freq_factor: float,
                       high_freq_factor: float,
                       original_max_position_embeddings: int) -> tuple[float, ...]:
  r"""The rotary frequencies of Llama 3.1's scaling (``rope_type="llama3"``), in float64.

  With ``f_i = base^{−2i/R}`` and wavelength ``λ_i = 2π / f_i``, ``L`` the original context:
  ``f_i`` is kept where ``λ_i < L / high_freq_factor`` (high frequencies), divided by
  ``factor`` where ``λ_i > L / low_freq_factor`` (low frequencies), and in between
  interpolated as ``(1 − s) f_i / factor + s f_i`` with
  ``s = (L / λ_i − low_freq_factor) / (high_freq_factor − low_freq_factor)``.

  Returns:
    ``R/2`` floats, for ``rotary_frequencies`` (:class:`jlayers.MultiHeadAttention`).
  """
  f = base ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
  wavelength = 2 * math.pi / f
  low, high = (original_max_position_embeddings / low_freq_factor,
               original_max_position_embeddings / high_freq_factor)
  smooth = ((original_max_position_embeddings / wavelength - low_freq_factor)
            / (high_freq_factor - low_freq_factor))
  scaled = np.where(wavelength > low, f / factor, f)
  medium = (wavelength >= high) & (wavelength <= low)
  scaled = np.where(medium, (1 - smooth) * f / factor + smooth * f, scaled)
  return tuple(float(v) for v in scaled)


@dataclasses.dataclass(frozen=True)
class TransformerLM(Composite):
  """A decoder-only transformer over token ids; GPT-2 by default, and through its presets
  (:meth:`gpt2`, :meth:`llama`, :meth:`mistral`, :meth:`qwen2`, :meth:`gemma2`,
  :meth:`from_hf_config`) the Llama-class architectures.

  ``ids: int[B, T]`` (``T <= context``) → token embedding (times ``embedding_scale``, Gemma)
  + learned position embedding (``positions="learned"``; none with ``"rotary"``, whose
  rotation happens in every attention layer) → ``layers`` × :class:`DecoderBlock` → final norm
  → logits ``float[B, T, vocab_size]``: the token embedding's
  :meth:`~jlayers.Embedding.attend` (tied, the default) or a bias-free ``Linear`` head
  (``tied=False``), soft-capped by ``final_soft_cap`` (Gemma 2). ``remat=True`` wraps every
  block in :class:`jlayers.Remat`. ``dtype``/``param_dtype`` go to every layer; the logits come
  out in ``dtype`` (``None``: float32).

  Block options: ``norm`` (``"layer"``/``"rms"``), ``norm_eps``, ``norm_scale_offset``,
  ``post_norms``, ``mlp`` (``"gelu"``/``"swiglu"``/``"geglu"``), ``mlp_features`` (default
  ``4 · features``), ``use_bias`` (every projection and norm offset, GPT-2), ``qkv_bias``
  (Qwen2); attention options: ``num_kv_heads``, ``head_features`` (default
  ``features // heads``), ``rotary_base``, ``rotary_dim``, ``rotary_frequencies``,
  ``rotary_interleaved``, ``sliding_window`` (as Hugging Face's ``sliding_window``: a query
  sees itself and the ``sliding_window − 1`` keys before it) on every layer
  (``sliding_window_layers="all"``) or on the even-numbered ones (``"even"``: Gemma 2's
  alternation, starting with a local layer), ``attention_soft_cap``, ``attention_scale``,
  ``qk_norm``, ``sinks``.

  ``apply(params, state, ids, *, positions=None, segment_ids=None, return_hidden=False)``:
  ``positions: int[B, T]`` or ``int[T]`` (default ``0..T−1``; packed rows restart them) and
  ``segment_ids: int[B, T]`` (a token attends only within its segment); ``return_hidden``
  gives the final normed hidden states ``float[B, T, features]`` instead of logits.
  :meth:`loss` is the training loss, without logits.

  Decoding: with a key/value cache (:meth:`init_cache`) as ``state``,
  ``apply(params, cache, ids, *, lengths=None, positions=None)`` runs ``ids: int[B, T]`` as
  the tokens that follow the ``cache["index"][b]`` tokens the cache holds (a prompt, a chunk
  of one, or one token per row): each attends causally (and within its window) to the cached
  tokens and to the new ones before it, and ``(logits, cache)`` come back, the cache holding
  the new tokens too. ``lengths: int[B]`` in ``[0, T]`` says how many of a row's ``T`` tokens
  are real (the rest is padding on the right; default ``T``); ``positions`` default to
  ``index[:, None] + arange(T)``. A row whose tokens overflow a global layer's cache gets
  NaN logits (then and at every later step); a row whose ``lengths`` lie outside ``[0, T]``
  under ``jax.jit`` (unchecked there) gets NaN logits and its cache is left as it was. :func:`jlayers.generate` drives it.

  Params: ``{"embed", "position" (learned positions), "block_0", ..., "norm"}`` (and
  ``"head"`` untied). No state. Initialise with ``init(key, (B, T), input_dtype=jnp.int32)``.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.TransformerLM(11, 8, features=16, layers=2, heads=2)
    >>> params, _ = model.init(jax.random.key(0), (2, 8), input_dtype=jnp.int32)
    >>> forward = jax.jit(lambda params, ids: model.apply(params, {}, ids)[0])
    >>> forward(params, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 11)
    >>> llama = jlayers.TransformerLM.llama(11, 8, features=16, layers=2, heads=4,
    ...                                     num_kv_heads=2, mlp_features=24)
    >>> params, _ = llama.init(jax.random.key(0), (2, 8), input_dtype=jnp.int32)
    >>> ids = jnp.zeros((2, 8), jnp.int32)
    >>> float(llama.loss(params, ids[:, :-1], ids[:, 1:])) > 0
    True
  """

  kind: ClassVar[str] = "transformer_lm"
  vocab_size: int
  context: int
  _: dataclasses.KW_ONLY
  features: int = 128
  layers: int = 4
  heads: int = 4
  num_kv_heads: int | None = None
  mlp_features: int | None = None
  tied: bool = True
  remat: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  head_features: int | None = None
  positions: str = "learned"
  rotary_base: float = 10000.0
  rotary_dim: int | None = None
  rotary_frequencies: tuple[float, ...] | None = None
  rotary_interleaved: bool = False
  mlp: str = "gelu"
  norm: str = "layer"
  norm_eps: float = 1e-5
  norm_scale_offset: float = 0.0
  post_norms: bool = False
  use_bias: bool = True
  qkv_bias: bool | None = None
  sliding_window: int | None = None
  sliding_window_layers: str = "all"
  attention_soft_cap: float | None = None
  final_soft_cap: float | None = None
  attention_scale: float | None = None
  embedding_scale: float | None = None
  qk_norm: bool = False
  sinks: bool = False

  def __post_init__(self):
    where = "TransformerLM"
    for name in ("vocab_size", "context", "features", "layers", "heads"):
      _checks.positive_int(where, name, getattr(self, name))
    for name in ("head_features", "sliding_window"):
      if getattr(self, name) is not None:
        _checks.positive_int(where, name, getattr(self, name))
    for name in ("tied", "remat"):
      _checks.flag(where, name, getattr(self, name))
    if self.positions not in ("learned", "rotary"):
      raise ValueError(f"{where}: positions must be 'learned' or 'rotary', got "
                       f"{self.positions!r}")
    if self.sliding_window_layers not in ("all", "even"):
      raise ValueError(f"{where}: sliding_window_layers must be 'all' or 'even', got "
                       f"{self.sliding_window_layers!r}")
    for name in ("final_soft_cap", "embedding_scale"):
      if getattr(self, name) is not None:
        _checks.positive_float(where, name, getattr(self, name))
    if self.rotary_frequencies is not None:
      base.set_field(self, "rotary_frequencies", tuple(self.rotary_frequencies))
    base.check_dtypes(self)
    for i in range(min(self.layers, 2)):
      self._block(i)  # the blocks' own checks, at construction

  def _kw(self):
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}

  def _block(self, i: int) -> DecoderBlock:
    head = self.head_features or self.features // self.heads
    attention = {"num_kv_heads": self.num_kv_heads, "qkv_features": self.heads * head,
                 "qkv_bias": self.qkv_bias, "logits_soft_cap": self.attention_soft_cap,
                 "scale": self.attention_scale, "qk_norm": self.qk_norm, "sinks": self.sinks}
    if self.positions == "rotary":
      attention.update(rotary_base=self.rotary_base, rotary_dim=self.rotary_dim,
                       rotary_frequencies=self.rotary_frequencies,
                       rotary_interleaved=self.rotary_interleaved)
    if self.sliding_window is not None and (self.sliding_window_layers == "all" or i % 2 == 0):
      attention["local_window_size"] = (self.sliding_window - 1, 0)
    return DecoderBlock(self.features, self.heads, mlp_features=self.mlp_features, mlp=self.mlp,
                        norm=self.norm, norm_eps=self.norm_eps,
                        norm_scale_offset=self.norm_scale_offset, post_norms=self.post_norms,
                        use_bias=self.use_bias, attention=attention, **self._kw())

  def _final_norm(self):
    if self.norm == "layer":
      return LayerNorm(eps=self.norm_eps, use_offset=self.use_bias, **self._kw())
    return RMSNorm(eps=self.norm_eps, scale_offset=self.norm_scale_offset, **self._kw())

  def apply(self, params, state, ids, *, positions=None, segment_ids=None, lengths=None,
            return_hidden=False, key=None, train=False, impl="manual"):
    """Logits (or final hidden states) for ``ids``; with a cache as ``state``, of the new
    tokens after the cached ones, and the updated cache (see the class docstring)."""
    if not state:
      if lengths is not None:
        raise ValueError("TransformerLM: lengths are for decoding, with a cache as state "
                         "(init_cache)")
      return super().apply(params, state, ids, positions=positions, segment_ids=segment_ids,
                           return_hidden=return_hidden, key=key, train=train, impl=impl)
    where = "TransformerLM"
    ids = self._check_ids(ids)
    b, t = ids.shape
    index = _kv_cache.check_index(where, state, b)
    want = {"index"} | {f"block_{i}" for i in range(self.layers)}
    if set(state) != want:
      raise ValueError(f"{where}: the cache has entries {sorted(state)}, but this model's has "
                       f"{sorted(want)}: a cache built for another model")
    if segment_ids is not None:
      raise ValueError(f"{where}: segment_ids are for packed training rows, not for decoding "
                       "with a cache (each row is one sequence)")
    count = (jnp.full((b,), t, jnp.int32) if lengths is None
             else _checks.integers_in(where, "lengths", lengths, (b,), 0, t))
    # Under jit the range is unchecked: a row with lengths outside [0, T] writes nothing,
    # keeps its index and gets NaN outputs.
    bad = (count < 0) | (count > t)
    count = jnp.where(bad, 0, count)
    blocks = {name: entry for name, entry in state.items() if name != "index"}
    y, blocks = super().apply(params, blocks, ids, positions=positions,
                              return_hidden=return_hidden, cache_index=index, lengths=count,
                              key=key, train=train, impl=impl)
    return _kv_cache.poison(y, bad), {**blocks, "index": index + count}

  def _check_ids(self, ids):
    ids = _checks.as_array("TransformerLM", "ids", ids)
    if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.context:
      raise ValueError(f"TransformerLM: ids must have shape (B, T) with 1 <= T <= context="
                       f"{self.context}, got {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"TransformerLM: ids must have an integer dtype, got {ids.dtype}")
    return ids

  def init_cache(self, batch_size: int, max_length: int, *, dtype=None) -> dict:
    """An empty key/value cache for ``batch_size`` rows of up to ``max_length`` tokens: pass
    it to ``apply`` as the state.

    A plain dict of arrays (shard it, donate it, save it): ``"index": int32[B]`` (the tokens
    each row holds, 0) and per block ``{"block_i": {"attention": {"key", "value"}}}``, each
    ``dtype[B, num_kv_heads, slots, head_features]`` of zeros, where ``slots`` is
    ``max_length`` for a global layer and ``min(sliding_window, max_length)`` for a window
    layer (a ring buffer: its memory does not grow with ``max_length``). ``dtype`` defaults to
    the model's ``dtype`` (or ``param_dtype``). :meth:`cache_bytes_per_token` gives its size.
    """
    where = "TransformerLM.init_cache"
    _checks.positive_int(where, "batch_size", batch_size)
    _checks.positive_int(where, "max_length", max_length)
    dtype = (self.dtype or self.param_dtype) if dtype is None else dtype
    cache = {f"block_{i}": self._block(i).init_cache(batch_size, max_length, dtype=dtype)
             for i in range(self.layers)}
    return {**cache, "index": jnp.zeros((batch_size,), jnp.int32)}

  def cache_bytes_per_token(self, *, dtype=None) -> int:
    """The bytes a cache holds per row and token: keys and values of every global layer
    (window layers hold a fixed ring instead)."""
    head = self.head_features or self.features // self.heads
    per_layer = 2 * (self.num_kv_heads or self.heads) * head
    dtype = jnp.dtype((self.dtype or self.param_dtype) if dtype is None else dtype)
    globals_ = sum(self._block(i)._attention().cache_window is None for i in range(self.layers))
    return globals_ * per_layer * dtype.itemsize

  def logits(self, params, hidden, *, impl: str = "manual") -> jax.Array:
    """The output logits ``float[..., vocab_size]`` of final hidden states
    ``float[..., features]`` (``apply(..., return_hidden=True)``): the tied embedding's
    :meth:`~jlayers.Embedding.attend` or the head, then ``final_soft_cap``."""
    if self.tied:
      embed = Embedding(self.vocab_size, self.features, **self._kw())
      logits = embed.attend(params["embed"], hidden, impl=impl)
    else:
      head = Linear(self.vocab_size, use_bias=False, **self._kw())
      logits = head.apply(params["head"], {}, hidden, impl=impl)[0]
    return self._cap(logits)

  def _cap(self, logits):
    if self.final_soft_cap is None:
      return logits
    cap = self.final_soft_cap
    return cap * jnp.tanh(logits / cap)

  def forward(self, scope, ids, *, positions=None, segment_ids=None, return_hidden=False,
              cache_index=None, lengths=None):
    ids = self._check_ids(ids)
    b, t = ids.shape
    if positions is None and cache_index is not None:  # the new tokens follow the cached ones
      positions = cache_index[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if positions is not None:
      positions = _checks.as_array("TransformerLM", "positions", positions)
      if positions.shape not in ((t,), (b, t)):
        raise ValueError(f"TransformerLM: positions must have shape (T,) or (B, T) = "
                         f"{(t,)} or {(b, t)}, got {tuple(positions.shape)}")
    embed = Embedding(self.vocab_size, self.features, **self._kw())
    h = scope("embed", embed, ids)
    if self.embedding_scale is not None:  # in the activations' dtype, as Gemma rounds it
      h = h * jnp.asarray(self.embedding_scale, h.dtype)
    if self.positions == "learned":
      where = jnp.arange(t, dtype=jnp.int32).reshape(1, t) if positions is None else positions
      pos = scope("position", Embedding(self.context, self.features, **self._kw()),
                  where.reshape(-1, t))
      h = h + _sharding.reshard_like(pos, h)  # a table split otherwise (FSDP) laid out as h
      positions = None  # the attention layers have no rotary embedding
    for i in range(self.layers):
      block = self._block(i)
      h = scope(f"block_{i}", Remat(block) if self.remat else block, h, positions=positions,
                segment_ids=segment_ids, cache_index=cache_index, lengths=lengths)
    h = scope("norm", self._final_norm(), h)
    head = Linear(self.vocab_size, use_bias=False, **self._kw())
    if return_hidden:
      if not self.tied:
        scope.skip("head", head)
      return h
    if self.tied:
      logits = embed.attend(scope.params_of("embed"), h, impl=scope.impl)
    else:
      logits = scope("head", head, h)
    return self._cap(logits)

  def init_shapes(self) -> dict:
    """The params' shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), without computing
    them."""
    return jax.eval_shape(lambda key: self.init(key, (1, 1), input_dtype=jnp.int32)[0],
                          jax.random.key(0))

  def output_weights(self, params) -> jax.Array:
    """The output projection ``float[features, vocab_size]``: the embedding table transposed
    (tied) or the head's kernel."""
    if self.tied:
      return params["embed"]["embedding"].T
    return params["head"]["kernel"]

  def loss(self, params, ids, targets, *, where=None, positions=None, segment_ids=None,
           reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
           impl: str = "manual", key=None, train: bool = False) -> jax.Array:
    """The cross-entropy of predicting ``targets: int[B, T]`` from ``ids: int[B, T]``,
    through :func:`jlayers.linear_cross_entropy` on the final hidden states: the
    ``[B, T, vocab_size]`` logits are never formed, in either pass.

    Args:
      params: the model's params.
      ids, targets: int[B, T]; ``targets`` are usually ``ids`` shifted by one.
      where: optional bool[B, T]: the tokens that count (False: padding, or the last token of
        a packed document).
      positions, segment_ids: as for ``apply`` (packed rows).
      reduction: ``"mean"`` (over the counted tokens), ``"sum"`` or ``"none"`` (float[B, T]).
      label_smoothing, z_loss: as :func:`jlayers.linear_cross_entropy`.
      impl, key, train: as for ``apply``.

    Returns:
      float[] (or float[B, T] with ``reduction="none"``) in float32 (or wider).
    """
    hidden, _ = self.apply(params, {}, ids, positions=positions, segment_ids=segment_ids,
                           return_hidden=True, impl=impl, key=key, train=train)
    w = self.output_weights(params)
    if self.dtype is not None:
      w = w.astype(self.dtype)
    return linear_cross_entropy_op.select(impl)(
        hidden, w, targets, where=where, label_smoothing=label_smoothing, z_loss=z_loss,
        logits_soft_cap=self.final_soft_cap, reduction=reduction)

  # ------------------------------------------------------------------------------------------
  # Presets. Each builds the architecture as its reference implementation computes it.

  @classmethod
  def gpt2(cls, vocab_size: int = 50257, context: int = 1024, *, features: int = 768,
           layers: int = 12, heads: int = 12, **overrides) -> TransformerLM:
    """GPT-2: learned positions, pre-LayerNorm (eps 1e-5) with offsets, biases everywhere,
    tanh-GELU MLP of ``4 · features``, tied output embedding."""
    return cls(vocab_size, context, features=features, layers=layers, heads=heads, **overrides)

  @classmethod
  def llama(cls, vocab_size: int, context: int, *, features: int, layers: int, heads: int,
            num_kv_heads: int | None = None, mlp_features: int, rotary_base: float = 10000.0,
            rope_scaling: Mapping[str, Any] | None = None, norm_eps: float = 1e-5,
            tied: bool = False, **overrides) -> TransformerLM:
    """Llama 2 and 3: rotary positions (rotate-half, ``rotary_base``; Llama 3.1's frequency
    scaling from ``rope_scaling``, Hugging Face's ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``), RMS norm
    (``x̂ · w``), SwiGLU MLP, grouped-query attention, no biases, untied head by default."""
    head = overrides.get("head_features") or features // heads
    frequencies = None
    kind = None if rope_scaling is None else rope_scaling.get("rope_type",
                                                              rope_scaling.get("type"))
    if kind not in (None, "default"):
      if kind != "llama3":
        raise ValueError(f"TransformerLM.llama: rope_scaling of type {kind!r} is not supported "
                         "(only 'llama3'); compute the frequencies and pass "
                         "rotary_frequencies=")
      frequencies = llama3_frequencies(
          rotary_base, overrides.get("rotary_dim") or head,
          factor=rope_scaling["factor"], low_freq_factor=rope_scaling["low_freq_factor"],
          high_freq_factor=rope_scaling["high_freq_factor"],
          original_max_position_embeddings=rope_scaling["original_max_position_embeddings"])
    options = {"positions": "rotary", "rotary_base": rotary_base,
               "rotary_frequencies": frequencies, "mlp": "swiglu", "norm": "rms",
               "norm_eps": norm_eps, "use_bias": False, "tied": tied,
               "num_kv_heads": num_kv_heads, "mlp_features": mlp_features}
    return cls(vocab_size, context, features=features, layers=layers, heads=heads,
               **{**options, **overrides})

  @classmethod
  def mistral(cls, vocab_size: int, context: int, *, sliding_window: int | None = 4096,
              **kwargs) -> TransformerLM:
    """Mistral: Llama with a sliding window on every layer (a query sees itself and the
    ``sliding_window − 1`` positions before it)."""
    return cls.llama(vocab_size, context, sliding_window=sliding_window, **kwargs)

  @classmethod
  def qwen2(cls, vocab_size: int, context: int, *, norm_eps: float = 1e-6,
            rotary_base: float = 1e6, **kwargs) -> TransformerLM:
    """Qwen2: Llama with biases on the query, key and value projections (none on the output)
    and Qwen's defaults (RMS eps 1e-6, rotary base 10⁶)."""
    return cls.llama(vocab_size, context, norm_eps=norm_eps, rotary_base=rotary_base,
                     qkv_bias=True, **kwargs)

  @classmethod
  def gemma2(cls, vocab_size: int, context: int, *, features: int, layers: int, heads: int,
             num_kv_heads: int | None = None, head_features: int = 256, mlp_features: int,
             sliding_window: int = 4096, query_pre_attn_scalar: float | None = None,
             attention_soft_cap: float | None = 50.0, final_soft_cap: float | None = 30.0,
             rotary_base: float = 10000.0, norm_eps: float = 1e-6,
             **overrides) -> TransformerLM:
    """Gemma 2: embeddings × √features, RMS norm as ``x̂ · (1 + w)`` before and after each
    sublayer, GeGLU (tanh) MLP, rotary positions, attention scores scaled by
    ``query_pre_attn_scalar^{−1/2}`` (default ``head_features``) and soft-capped, a sliding
    window on the even-numbered layers (0, 2, …) and global attention on the others, the
    final logits soft-capped, tied embeddings."""
    scalar = head_features if query_pre_attn_scalar is None else query_pre_attn_scalar
    options = {"positions": "rotary", "rotary_base": rotary_base, "mlp": "geglu",
               "norm": "rms", "norm_eps": norm_eps, "norm_scale_offset": 1.0,
               "post_norms": True, "use_bias": False, "tied": True,
               "num_kv_heads": num_kv_heads, "head_features": head_features,
               "mlp_features": mlp_features, "sliding_window": sliding_window,
               "sliding_window_layers": "even", "attention_soft_cap": attention_soft_cap,
               "final_soft_cap": final_soft_cap, "attention_scale": scalar ** -0.5,
               "embedding_scale": math.sqrt(features)}
    return cls(vocab_size, context, features=features, layers=layers, heads=heads,
               **{**options, **overrides})

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any], *, context: int | None = None,
                     **overrides) -> TransformerLM:
    """The preset for a Hugging Face ``config.json`` (as a dict): ``model_type`` ``"gpt2"``,
    ``"llama"``, ``"mistral"``, ``"qwen2"`` or ``"gemma2"``. ``context`` defaults to the
    config's maximum positions."""
    kind = config.get("model_type")
    if kind == "gpt2":
      return cls.gpt2(config["vocab_size"], context or config["n_positions"],
                      features=config["n_embd"], layers=config["n_layer"],
                      heads=config["n_head"], norm_eps=config.get("layer_norm_epsilon", 1e-5),
                      **overrides)
    if kind not in ("llama", "mistral", "qwen2", "gemma2"):
      raise ValueError(f"TransformerLM.from_hf_config: model_type must be one of 'gpt2', "
                       f"'llama', 'mistral', 'qwen2', 'gemma2', got {kind!r}")
    common = {"features": config["hidden_size"], "layers": config["num_hidden_layers"],
              "heads": config["num_attention_heads"],
              "num_kv_heads": config.get("num_key_value_heads"),
              "mlp_features": config["intermediate_size"],
              "rotary_base": config.get("rope_theta", 10000.0),
              "norm_eps": config.get("rms_norm_eps", 1e-6)}
    if config.get("head_dim") is not None:
      common["head_features"] = config["head_dim"]
    context = context or config.get("max_position_embeddings", 4096)
    if kind == "gemma2":
      return cls.gemma2(config["vocab_size"], context, **common,
                        sliding_window=config.get("sliding_window", 4096),
                        query_pre_attn_scalar=config.get("query_pre_attn_scalar"),
                        attention_soft_cap=config.get("attn_logit_softcapping"),
                        final_soft_cap=config.get("final_logit_softcapping"), **overrides)
    common.update(tied=bool(config.get("tie_word_embeddings", False)),
                  rope_scaling=config.get("rope_scaling"))
    if kind == "qwen2":
      if config.get("use_sliding_window"):
        raise ValueError("TransformerLM.from_hf_config: Qwen2's use_sliding_window=True "
                         "(windows from layer max_window_layers on) is not supported")
      return cls.qwen2(config["vocab_size"], context, **common, **overrides)
    if kind == "mistral":
      return cls.mistral(config["vocab_size"], context,
                         sliding_window=config.get("sliding_window"), **common, **overrides)
    for flag in ("attention_bias", "mlp_bias"):
      if config.get(flag):
        raise ValueError(f"TransformerLM.from_hf_config: {flag}=True (biases on every "
                         "projection of a Llama) is not supported")
    return cls.llama(config["vocab_size"], context, **common, **overrides)
