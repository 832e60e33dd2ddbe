"""Text generation from a :class:`jlayers.TransformerLM` with its key/value cache: the prompt
in one pass, then one token per step inside one compiled loop.

:func:`generate` runs the prompt (rows of different lengths, padded to one width) through
the model once, filling the cache (:meth:`TransformerLM.init_cache`), then picks a token per
row from the last position's logits and feeds it back, one position at a time, in a
``lax.while_loop`` that stops when every row has ended or ``max_new_tokens`` are out. The
prefill and the loop compile once per prompt width and set of options; prompts of other
lengths in that width reuse the program.

Token choice (:func:`sample_logits`), as Hugging Face ``transformers`` orders it: the logits
are divided by ``temperature``, then :func:`filter_logits` keeps the ``top_k`` largest and,
of those, the smallest set of most likely tokens whose probability reaches ``top_p``; a token
is drawn from what is kept (``jax.random.categorical``). ``temperature=0`` (the limit of the
softmax as the temperature falls to 0) and ``top_k=1`` are greedy: the first largest logit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _sharding


class Generation(NamedTuple):
  """What :func:`generate` returns.

  Attributes:
    tokens: int32[B, max_new_tokens], the new tokens of each row; after a row's
      end-of-sequence token (which is kept), ``pad_id``.
    lengths: int32[B], the new tokens of each row, its end-of-sequence token included.
    logits: float[B, max_new_tokens, vocab_size] (float32 or wider), the logits each token was chosen from
      (before temperature and filtering; ``return_logits=True``), else ``None``.
  """

  tokens: jax.Array
  lengths: jax.Array
  logits: jax.Array | None = None


class _Options(NamedTuple):
  max_new_tokens: int
  temperature: float
  top_k: int | None
  top_p: float | None
  eos_id: int | None
  pad_id: int
  max_length: int
  return_logits: bool
  impl: str
  cache_dtype: object


def filter_logits(logits: jax.Array, *, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """``logits`` with every token outside the top-k and top-p sets set to ``-inf``.

  ``top_k``: keeps the tokens whose logit is at least the ``k``-th largest of their row (ties
  with it included, so more than ``k`` may stay; ``k`` above the vocabulary keeps all).
  ``top_p`` in ``(0, 1]``: of what ``top_k`` kept, with ``p`` the softmax of the row sorted
  from most to least likely, keeps the tokens before which less than ``top_p`` of the
  probability is gathered (at least the most likely one), and every token as likely as the
  last of them (ties included). ``None`` (or ``top_p=1``) skips a filter.

  Args:
    logits: float[..., V].

  Returns:
    float[..., V], the same dtype.
  """
  where = "filter_logits"
  logits = _checks.floating(where, "logits", logits)
  _checks.min_rank(where, "logits", logits, 1, "(..., V)")
  top_k, top_p = _check_filters(where, top_k, top_p)
  ninf = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k is not None and top_k < logits.shape[-1]:
    # The k-th largest from a sort along the vocabulary: local to each row on a mesh, where
    # lax.top_k's partitioning gathers the batch.
    v = logits.shape[-1]
    kth = jnp.sort(logits, axis=-1)[..., v - top_k:v - top_k + 1]
    logits = jnp.where(logits >= kth, logits, ninf)
  if top_p is not None and top_p < 1:
    p = jax.nn.softmax(logits.astype(_checks.at_least_float32(logits.dtype)), axis=-1)
    ordered = -jnp.sort(-p, axis=-1)
    before = jnp.cumsum(ordered, axis=-1) - ordered  # probability gathered before each
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: before[0] = 0
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    logits = jnp.where(p >= threshold, logits, ninf)
  return logits


def sample_logits(logits: jax.Array, key: jax.Array | None = None, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """One token per row of ``logits: float[..., V]``: greedy (the first largest logit) when
  ``temperature == 0`` or ``top_k == 1``, else drawn with ``key`` from
  ``softmax(filter_logits(logits / temperature, top_k=, top_p=))``. Returns int32[...]."""
  where = "sample_logits"
  logits = _checks.floating(where, "logits", logits)
  _checks.min_rank(where, "logits", logits, 1, "(..., V)")
  temperature = _check_temperature(where, temperature)
  top_k, top_p = _check_filters(where, top_k, top_p)
  if temperature == 0 or top_k == 1:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if key is None:
    raise ValueError(f"{where}: sampling needs key= (or temperature=0 for greedy choice)")
  x = logits.astype(_checks.at_least_float32(logits.dtype)) / temperature
  x = filter_logits(x, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def _check_temperature(where, temperature):
  return _checks.real(where, "temperature", temperature, 0.0)


def _check_filters(where, top_k, top_p):
  if top_k is not None:
    top_k = _checks.positive_int(where, "top_k", top_k)
  if top_p is not None:
    top_p = _checks.real(where, "top_p", top_p, 0.0, 1.0)
    if top_p == 0:
      raise ValueError(f"{where}: top_p must lie in (0, 1], got 0")
  return top_k, top_p


def generate(model, params, prompt, *, lengths=None, max_new_tokens: int, key=None,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, pad_id: int = 0, max_length: int | None = None,
             return_logits: bool = False, impl: str = "manual",
             cache_dtype=None) -> Generation:
  """Continues each row of ``prompt`` by up to ``max_new_tokens`` tokens, through the model's
  key/value cache.

  The prompt runs once through ``model`` (every row's tokens attend causally to each other,
  filling a cache of ``max_length`` tokens per row); then each step picks a token per row
  from its last logits (:func:`sample_logits`) and runs that one token. A row stops after
  ``eos_id``; the loop stops when every row has, or after ``max_new_tokens``. All of it is one
  compiled program per prompt width and set of options (``jax.jit`` inside; ``generate`` may
  also be called under an outer ``jax.jit``).

  Args:
    model: a :class:`jlayers.TransformerLM`.
    params: its params.
    prompt: int[B, P], each row's prompt at its start, padded on the right to the width ``P``.
    lengths: optional int[B] in ``[1, P]``: each row's prompt length (default ``P``).
    max_new_tokens: tokens to add per row (``>= 0``).
    key: a PRNG key, needed when sampling (``temperature > 0`` and ``top_k != 1``). Step
      ``s`` draws with ``jax.random.fold_in(key, s)``: the same key gives the same tokens,
      jitted or not.
    temperature: ``>= 0``; ``0`` is greedy (documented limit of sampling, not a division).
    top_k, top_p: :func:`filter_logits`; ``top_k=1`` is greedy.
    eos_id: optional end-of-sequence token id: a row that emits it stops.
    pad_id: the token after a row's end.
    max_length: tokens per row the cache holds; default ``P + max_new_tokens``, at most
      ``model.context``. A larger value lets programs be shared by calls with other
      ``max_new_tokens`` only if it is the same.
    return_logits: also return the logits of every chosen token.
    impl: ``"manual"`` or ``"autodiff"`` (the same forward math; decoding takes no
      gradients).
    cache_dtype: the cache's dtype (default the model's compute dtype, or its params').

  Returns:
    :class:`Generation` ``(tokens, lengths, logits)``.

  Raises:
    ValueError: ``P + max_new_tokens`` exceeds ``max_length`` or ``model.context``,
      ``max_new_tokens < 0``, ``lengths`` outside ``[1, P]`` (checked when known; under an
      outer ``jax.jit`` such rows come back with tokens ``-1`` and length 0), sampling without
      a key, or a bad option.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.TransformerLM.llama(11, 16, features=16, layers=2, heads=2,
    ...                                     mlp_features=32)
    >>> params, _ = model.init(jax.random.key(0), (1, 16), input_dtype=jnp.int32)
    >>> prompt = jnp.array([[1, 2, 3], [4, 5, 0]])
    >>> out = jlayers.generate(model, params, prompt, lengths=jnp.array([3, 2]),
    ...                        max_new_tokens=4, temperature=0.0)
    >>> out.tokens.shape, out.lengths.tolist()
    ((2, 4), [4, 4])
  """
  where = "generate"
  _check_model(where, model)
  prompt = _checks.as_array(where, "prompt", prompt)
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f"{where}: prompt must be int[B, P] with P >= 1, got "
                     f"{prompt.dtype}{list(prompt.shape)}")
  b, width = prompt.shape
  if not _checks.is_int(max_new_tokens) or max_new_tokens < 0:
    raise ValueError(f"{where}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
  need = width + max_new_tokens
  if max_length is None:
    max_length = need
  _checks.positive_int(where, "max_length", max_length)
  if need > max_length or max_length > model.context:
    raise ValueError(f"{where}: the prompt width {width} + max_new_tokens {max_new_tokens} = "
                     f"{need} tokens must fit max_length={max_length}, at most the model's "
                     f"context {model.context}")
  lengths = (jnp.full((b,), width, jnp.int32) if lengths is None
             else _checks.integers_in(where, "lengths", lengths, (b,), 1, width))
  temperature = _check_temperature(where, temperature)
  top_k, top_p = _check_filters(where, top_k, top_p)
  greedy = temperature == 0 or top_k == 1
  if not greedy and key is None:
    raise ValueError(f"{where}: sampling needs key= (or temperature=0 for greedy decoding)")
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is not None and not _checks.is_int(value):
      raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__}")
  options = _Options(max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, max_length,
                     _checks.flag(where, "return_logits", return_logits),
                     _checks.impl(where, impl), cache_dtype)
  if greedy:
    key = jax.random.key(0)  # unused
  return _generate(model, options, params, prompt.astype(jnp.int32), lengths, key)


def _check_model(where, model):
  from jlayers.transformer import TransformerLM  # the model imports nothing from here
  if not isinstance(model, TransformerLM):
    raise TypeError(f"{where}: model must be a jlayers.TransformerLM, got "
                    f"{type(model).__name__}")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(model, options: _Options, params, prompt, lengths, key):
  b, width = prompt.shape
  o = options
  bad = (lengths < 1) | (lengths > width)
  lengths = jnp.clip(lengths, 1, width)
  cache = model.init_cache(b, o.max_length, dtype=o.cache_dtype)
  # Laid out along the batch as the prompt (split across devices where it is).
  cache = jax.tree.map(lambda a: _sharding.reshard_like(a, prompt, axes=(0,)), cache)
  hidden, cache = model.apply(params, cache, prompt, lengths=lengths, return_hidden=True,
                              impl=o.impl)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, F]
  logits = model.logits(params, last, impl=o.impl)[:, 0]
  f32 = _checks.at_least_float32(logits.dtype)  # the logits' dtype in the loop
  logits = logits.astype(f32)
  n = o.max_new_tokens
  tokens, saved, done, count = (
      _sharding.reshard_like(a, prompt, axes=(0,)) for a in (
          jnp.full((b, n), o.pad_id, jnp.int32),
          jnp.zeros((b, n, logits.shape[-1]) if o.return_logits else (b, 0), f32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32)))

  def choose(step, logits, done, tokens, count, saved):
    token = sample_logits(logits, jax.random.fold_in(key, step), temperature=o.temperature,
                          top_k=o.top_k, top_p=o.top_p)
    token = jnp.where(done, o.pad_id, token)
    zero = jnp.zeros((), step.dtype)
    tokens = lax.dynamic_update_slice(tokens, token[:, None], (zero, step))
    if o.return_logits:
      saved = lax.dynamic_update_slice(saved, logits[:, None], (zero, step, zero))
    count = count + (~done).astype(jnp.int32)
    if o.eos_id is not None:
      done = done | (token == o.eos_id)
    return token, done, tokens, count, saved

  def cond(carry):
    step, _, _, done = carry[:4]
    return (step < n - 1) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, done, tokens, count, saved = carry
    token, done, tokens, count, saved = choose(step, logits, done, tokens, count, saved)
    hidden, cache = model.apply(params, cache, token[:, None], return_hidden=True, impl=o.impl)
    logits = model.logits(params, hidden, impl=o.impl)[:, 0].astype(f32)
    return step + 1, cache, logits, done, tokens, count, saved

  if n:
    carry = (jnp.int32(0), cache, logits, done, tokens, count, saved)
    step, cache, logits, done, tokens, count, saved = lax.while_loop(cond, body, carry)
    _, done, tokens, count, saved = choose(step, logits, done, tokens, count, saved)
  tokens = jnp.where(bad[:, None], -1, tokens)
  count = jnp.where(bad, 0, count)
  return Generation(tokens, count, saved if o.return_logits else None)

