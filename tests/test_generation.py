"""Decoding through the key/value cache (:func:`jlayers.generate`, ``TransformerLM.apply`` with
a cache) against the full forward without one, and token choice (:func:`jlayers.filter_logits`,
:func:`jlayers.sample_logits`) against a NumPy reference written from the docstring.

Kept cheap: tiny models (vocabulary 13, 16 features, context 16), one jitted full forward of a
fixed width per model and dtype, reused for every step of the greedy recomputation (causal
attention makes the padding after a position irrelevant to its logits).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlayers
from jlayers import TransformerLM

V, CONTEXT = 13, 16
B, WIDTH, NEW = 3, 6, 5  # prompt rows, prompt width, new tokens
LENGTHS = (6, 2, 4)  # the prompt length of each row
FULL = WIDTH + NEW  # the width of the full forward: every row's prompt and new tokens
_LLAMA = {"features": 16, "layers": 2, "heads": 4, "num_kv_heads": 2, "mlp_features": 24}
ARCHS = {  # windows of 3, shorter than the prompts: the rings wrap in prefill and decoding
    "gpt2": lambda: TransformerLM.gpt2(V, CONTEXT, features=16, layers=2, heads=2),
    "llama": lambda: TransformerLM.llama(V, CONTEXT, **_LLAMA),
    "mistral": lambda: TransformerLM.mistral(V, CONTEXT, sliding_window=3, **_LLAMA),
    "qwen2": lambda: TransformerLM.qwen2(V, CONTEXT, **_LLAMA),
    "gemma2": lambda: TransformerLM.gemma2(  # layers 0, 2 local; 1 global; caps that bend
        V, CONTEXT, features=16, layers=3, heads=2, num_kv_heads=1, head_features=8,
        mlp_features=24, sliding_window=3, attention_soft_cap=1.0, final_soft_cap=2.0),
}
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}  # relative to the largest |logit|


@functools.cache
def _setup(name, dtype):
  """``(model, params, forward)``: params in ``dtype`` and the jitted full forward (no cache).
  For float64, call it (and use what it returns) under ``jax.enable_x64(True)``."""
  model = ARCHS[name]()
  params, _ = model.init(jax.random.key(0), (1, CONTEXT), input_dtype=jnp.int32)
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  forward = jax.jit(lambda params, ids: model.apply(params, {}, ids)[0])
  return model, params, forward


def _prompt(seed=0):
  prompt = np.random.default_rng(seed).integers(1, V, (B, WIDTH)).astype(np.int32)
  for b, n in enumerate(LENGTHS):
    prompt[b, n:] = 0  # padding, which must not matter
  return jnp.asarray(prompt), jnp.asarray(LENGTHS, jnp.int32)


def _rows(prompt, lengths, tokens):
  """int32[B, FULL]: each row's prompt, then its new tokens, then zeros."""
  seq = np.zeros((B, FULL), np.int32)
  for b, n in enumerate(np.asarray(lengths)):
    row = np.concatenate([np.asarray(prompt)[b, :n], np.asarray(tokens)[b]])
    seq[b, :len(row)] = row
  return seq


def _at(full, lengths, steps):
  """``full[b, lengths[b] - 1 + s]`` for ``s < steps``: the logits each new token came from."""
  pos = np.asarray(lengths)[:, None] - 1 + np.arange(steps)[None, :]
  return np.take_along_axis(np.asarray(full), pos[..., None], axis=1)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _greedy_by_recomputation(forward, params, prompt, lengths, steps):
  """Greedy decoding without a cache: the argmax of the full forward at each row's last
  position, appended, ``steps`` times."""
  seq = _rows(prompt, lengths, np.zeros((B, 0), np.int32))
  ends = np.asarray(lengths).copy()
  out = np.zeros((B, steps), np.int32)
  for s in range(steps):
    logits = np.asarray(forward(params, seq))[np.arange(B), ends - 1]
    out[:, s] = np.argmax(logits, axis=-1)
    seq[np.arange(B), ends] = out[:, s]
    ends += 1
  return out


# ---------------------------------------------------------------------------------------------
# Generation equals the full forward.


@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_generation_in_float64_equals_the_full_forward_and_its_greedy_decoding(name):
  """Prompts of lengths 6, 2 and 4 in one batch: the logits of every new token equal the full
  forward's over the same tokens at the same position (1e-10 relative), and the tokens equal
  greedy decoding by full recomputation, token for token."""
  with jax.enable_x64(True):
    model, params, forward = _setup(name, "float64")
    prompt, lengths = _prompt()
    out = jlayers.generate(model, params, prompt, lengths=lengths, max_new_tokens=NEW,
                           temperature=0.0, return_logits=True, cache_dtype=jnp.float64)
    assert out.tokens.shape == (B, NEW) and out.tokens.dtype == jnp.int32
    assert out.logits.shape == (B, NEW, V) and out.logits.dtype == jnp.float64
    assert out.lengths.tolist() == [NEW] * B
    full = forward(params, _rows(prompt, lengths, out.tokens))
    assert _rel(out.logits, _at(full, lengths, NEW)) <= TOLERANCE["float64"]
    want = _greedy_by_recomputation(forward, params, prompt, lengths, NEW)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


@pytest.mark.parametrize("name", ["gpt2", "mistral", "gemma2"])
def test_greedy_generation_in_float32_equals_the_full_forward(name):
  """The same in float32 (1e-5 relative), with a cache longer than needed (``max_length`` the
  context): each token is the argmax of the full forward's logits wherever the top two are
  not within rounding of each other."""
  model, params, forward = _setup(name, "float32")
  prompt, lengths = _prompt()
  out = jlayers.generate(model, params, prompt, lengths=lengths, max_new_tokens=NEW,
                         temperature=0.0, return_logits=True, max_length=CONTEXT)
  assert out.logits.dtype == jnp.float32
  want = _at(forward(params, _rows(prompt, lengths, out.tokens)), lengths, NEW)
  assert _rel(out.logits, want) <= TOLERANCE["float32"]
  top2 = -np.sort(-want, axis=-1)[..., :2]
  clear = top2[..., 0] - top2[..., 1] > 1e-4 * np.max(np.abs(want))
  assert clear.mean() > 0.8  # the check below has something to check
  np.testing.assert_array_equal(np.asarray(out.tokens)[clear], np.argmax(want, axis=-1)[clear])


@pytest.mark.parametrize("name", list(ARCHS))
def test_chunked_prefill_then_a_step_equals_the_full_forward(name):
  """Two chunks of 5 tokens with other real lengths per row (5+5, 2+4, 0+3), then one token:
  every real token's logits equal the full forward's, so each chunk attends causally to what
  the cache already holds (through the ring of a window of 3, shorter than a chunk)."""
  first, second = np.array([5, 2, 0]), np.array([5, 4, 3])
  with jax.enable_x64(True):
    model, params, forward = _setup(name, "float64")
    seq = np.random.default_rng(1).integers(0, V, (B, FULL)).astype(np.int32)
    chunk1 = seq[:, :5]
    chunk2 = np.stack([seq[b, first[b]:first[b] + 5] for b in range(B)])
    step = seq[np.arange(B), first + second][:, None]

    @jax.jit
    def chunks(params, chunk1, chunk2, step, first, second):
      cache = model.init_cache(B, CONTEXT, dtype=jnp.float64)
      y1, cache = model.apply(params, cache, chunk1, lengths=first)
      y2, cache = model.apply(params, cache, chunk2, lengths=second)
      y3, cache = model.apply(params, cache, step)
      return y1, y2, y3, cache["index"]

    y1, y2, y3, index = chunks(params, chunk1, chunk2, step, first, second)
    full = np.asarray(forward(params, seq))
    got, want = [], []
    for b in range(B):
      n1, n2 = first[b], second[b]
      got += [np.asarray(y1)[b, :n1], np.asarray(y2)[b, :n2], np.asarray(y3)[b]]
      want += [full[b, :n1], full[b, n1:n1 + n2], full[b, n1 + n2:n1 + n2 + 1]]
    assert _rel(np.concatenate(got), np.concatenate(want)) <= TOLERANCE["float64"]
    assert index.tolist() == (first + second + 1).tolist()


def test_a_window_prefill_traces_under_x64_with_strict_promotion():
  """Several new tokens through a ring (window 3 < 5 tokens) with x64 on and strict dtype
  promotion (the suite's setting): the cache's integer arithmetic stays int32 throughout."""
  model, params, _ = _setup("mistral", "float32")
  with jax.enable_x64(True):
    out = jax.eval_shape(
        lambda params, cache, ids: model.apply(params, cache, ids, lengths=jnp.full((B,), 4)),
        params, model.init_cache(B, CONTEXT), jnp.zeros((B, 5), jnp.int32))
  assert out[1]["index"].dtype == jnp.int32


def test_apply_with_out_of_range_lengths_under_jit_leaves_the_row_and_its_cache_as_they_were():
  """Lengths are unchecked under ``jax.jit``: a row given ``-1`` or ``T + 1`` gets NaN logits,
  keeps its index and leaves its cache (a ring of 3 included) as it was, and its next step
  equals the full forward; the other rows are unaffected."""
  model, params, forward = _setup("mistral", "float32")
  seq = np.random.default_rng(2).integers(0, V, (B, 8)).astype(np.int32)
  step = jax.jit(lambda params, cache, ids, lengths: model.apply(params, cache, ids,
                                                                 lengths=lengths))
  _, cache = step(params, model.init_cache(B, CONTEXT), seq[:, :4], jnp.full((B,), 4))
  y, after = step(params, cache, seq[:, 4:8], jnp.asarray([-1, 4, 5]))
  y = np.asarray(y)
  assert np.isnan(y[[0, 2]]).all() and np.isfinite(y[1]).all()
  assert np.asarray(after["index"]).tolist() == [4, 8, 4]
  for old, new in zip(jax.tree.leaves(cache), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(new)[[0, 2]], np.asarray(old)[[0, 2]])
  full = np.asarray(forward(params, seq))
  assert _rel(y[1], full[1, 4:8]) <= TOLERANCE["float32"]
  z, _ = step(params, after, seq[:, 4:5], jnp.ones((B,), jnp.int32))
  assert _rel(np.asarray(z)[[0, 2], 0], full[[0, 2], 4]) <= TOLERANCE["float32"]


# ---------------------------------------------------------------------------------------------
# Sampling and the end of sequence.

SAMPLING = {"max_new_tokens": 8, "temperature": 1.3, "top_k": 9, "top_p": 0.95,
            "return_logits": True}


@functools.cache
def _jitted_sampler(name):
  """``generate`` with :data:`SAMPLING` under an outer ``jax.jit`` (lengths traced)."""
  model, _, _ = _setup(name, "float32")
  return jax.jit(lambda params, prompt, lengths, key: jlayers.generate(
      model, params, prompt, lengths=lengths, key=key, **SAMPLING))


def test_sampling_is_reproducible_eager_jitted_and_op_by_op():
  """The same key gives the same tokens eagerly and under an outer ``jax.jit``; step ``s``
  draws with ``fold_in(key, s)``, and ``sample_logits`` under ``jax.disable_jit()`` with that
  key and the returned logits draws the same tokens (``generate`` itself under
  ``disable_jit`` costs seconds of op-by-op compiles); another key gives other tokens; every
  token is one the filters keep."""
  model, params, _ = _setup("mistral", "float32")
  prompt, lengths = _prompt()
  key = jax.random.key(7)
  out = jlayers.generate(model, params, prompt, lengths=lengths, key=key, **SAMPLING)
  jitted = _jitted_sampler("mistral")(params, prompt, lengths, key)
  np.testing.assert_array_equal(np.asarray(jitted.tokens), np.asarray(out.tokens))
  np.testing.assert_array_equal(np.asarray(jitted.lengths), np.asarray(out.lengths))
  options = {name: SAMPLING[name] for name in ("temperature", "top_k", "top_p")}
  with jax.disable_jit():  # op by op: step s draws from its logits with fold_in(key, s)
    for s in range(3):
      token = jlayers.sample_logits(out.logits[:, s], jax.random.fold_in(key, s), **options)
      np.testing.assert_array_equal(np.asarray(token), np.asarray(out.tokens)[:, s])
  other = jlayers.generate(model, params, prompt, lengths=lengths, key=jax.random.key(8),
                           **SAMPLING)
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(out.tokens))
  for sample in (out, other):
    kept = _filter_reference(np.asarray(sample.logits) / SAMPLING["temperature"],
                             SAMPLING["top_k"], SAMPLING["top_p"])
    chosen = np.take_along_axis(kept, np.asarray(sample.tokens)[..., None], axis=-1)
    assert chosen.all()
    assert (~kept).any()  # the filters removed something


def test_end_of_sequence_stops_each_row_on_its_own():
  """With ``eos_id``, each row keeps the tokens it drew without it up to and including its
  first ``eos_id``, then ``pad_id``; ``lengths`` counts up to and including the ``eos_id``."""
  model, params, _ = _setup("mistral", "float32")
  prompt, lengths = _prompt()
  key = jax.random.key(7)
  n = SAMPLING["max_new_tokens"]
  free = np.asarray(jlayers.generate(model, params, prompt, lengths=lengths, key=key,
                                     **SAMPLING).tokens)

  def stops(eos):  # each row's length with eos as its end
    return [int(np.argmax(row == eos)) + 1 if (row == eos).any() else n for row in free]

  eos = max(range(V), key=lambda t: (len(set(stops(t))), -sum(stops(t))))
  want_lengths = stops(eos)
  assert len(set(want_lengths)) >= 2 and min(want_lengths) < n  # rows end apart
  pad = V  # no token of the vocabulary: it shows where a row has ended
  out = jlayers.generate(model, params, prompt, lengths=lengths, key=key, eos_id=eos,
                         pad_id=pad, **SAMPLING)
  assert out.lengths.tolist() == want_lengths
  for b, length in enumerate(want_lengths):
    np.testing.assert_array_equal(np.asarray(out.tokens)[b, :length], free[b, :length])
    assert (np.asarray(out.tokens)[b, length:] == pad).all()
    assert length == n or out.tokens[b, length - 1] == eos


def test_out_of_range_lengths_under_an_outer_jit_give_tokens_minus_one_and_length_zero():
  """Under an outer ``jax.jit`` the lengths are not known, so they are not checked: a row of
  length 0 or above the width comes back with tokens -1 and length 0, and the other rows are
  as with valid lengths."""
  params = _setup("mistral", "float32")[1]
  prompt, lengths = _prompt()
  key = jax.random.key(7)
  run = _jitted_sampler("mistral")
  good = run(params, prompt, lengths, key)
  bad = run(params, prompt, jnp.asarray([0, WIDTH + 1, LENGTHS[2]], jnp.int32), key)
  assert bad.lengths.tolist() == [0, 0, int(good.lengths[2])]
  assert (np.asarray(bad.tokens)[:2] == -1).all()
  np.testing.assert_array_equal(np.asarray(bad.tokens)[2], np.asarray(good.tokens)[2])


# ---------------------------------------------------------------------------------------------
# filter_logits and sample_logits against a NumPy reference written from the docstring.


def _filter_reference(logits, top_k, top_p):
  """bool[..., V]: the tokens ``filter_logits`` keeps (finite logits only), by its docstring:
  ``top_k`` keeps the logits at least the ``k``-th largest of the row; ``top_p``, of those,
  going through the tokens from most to least likely, keeps each before which less than
  ``top_p`` of the probability is gathered, and then every token as likely as the last kept."""
  logits = np.asarray(logits, np.float64)
  keep = np.isfinite(logits)
  for row, kept in zip(logits.reshape(-1, logits.shape[-1]), keep.reshape(-1, V)):
    if top_k is not None and top_k < V:
      kept &= row >= np.sort(row)[::-1][top_k - 1]
    if top_p is not None and top_p < 1:
      z = np.where(kept, row, -np.inf)
      p = np.exp(z - np.max(z))
      p /= p.sum()
      gathered, last = 0.0, None
      for i in sorted(range(V), key=lambda i: -p[i]):
        if gathered >= top_p:
          break
        last, gathered = p[i], gathered + p[i]
      kept &= p >= last
  return keep


def _settled(logits, top_k, top_p, margin):
  """bool[...]: the rows whose kept set stays the same when ``top_p`` moves by ``margin``
  (elsewhere a gathered probability lies within rounding of ``top_p``)."""
  if top_p is None or top_p >= 1:
    return np.ones(logits.shape[:-1], bool)
  low, high = (_filter_reference(logits, top_k, top_p + d) for d in (-margin, margin))
  return np.all(low == high, axis=-1)


def _rows_to_filter(rng):
  """float64[4, 50, V]: random rows, rows of small integers (ties at every boundary), and rows
  with some tokens already at ``-inf``."""
  normal = rng.standard_normal((100, V)) * 2
  ties = rng.integers(-2, 3, (80, V)).astype(np.float64)
  masked = rng.standard_normal((20, V)) * 2
  masked[rng.random((20, V)) < 0.4] = -np.inf
  masked[:, 0] = 1.0  # at least one finite logit a row
  return np.concatenate([normal, ties, masked]).reshape(4, 50, V)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_filter_logits_keeps_what_the_reference_keeps_ties_included(dtype):
  with jax.enable_x64(dtype == "float64"):
    rng = np.random.default_rng(3)
    rows = _rows_to_filter(rng)
    x = jnp.asarray(rows, dtype)
    margin = 1e-5 if dtype == "float32" else 1e-9
    checked = 0
    for top_k in (None, 1, 2, 5, 12, 13, 20):
      for top_p in (None, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        got = jlayers.filter_logits(x, top_k=top_k, top_p=top_p)
        assert got.dtype == x.dtype and got.shape == x.shape
        got = np.asarray(got)
        want = _filter_reference(np.asarray(x), top_k, top_p)
        use = _settled(np.asarray(x), top_k, top_p, margin)
        assert use.mean() > 0.9, (top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(got)[use], want[use],
                                      err_msg=f"{top_k=} {top_p=}")
        kept = want & use[..., None]
        np.testing.assert_array_equal(got[kept], np.asarray(x)[kept])  # unchanged
        checked += int(use.sum())
    assert checked > 0.95 * 49 * 200


def test_sample_logits_greedy_picks_the_first_maximum():
  logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-jnp.inf, 0.0, 5.0, 5.0]])
  want = [1, 0, 2]
  assert jlayers.sample_logits(logits, temperature=0.0).tolist() == want
  assert jlayers.sample_logits(logits, jax.random.key(0), top_k=1).tolist() == want
  assert jlayers.sample_logits(logits, top_k=1).tolist() == want  # greedy needs no key
  assert jlayers.sample_logits(logits, temperature=0.0).dtype == jnp.int32


def test_sample_logits_draws_only_kept_tokens_with_the_softmax_frequencies():
  """2000 draws of each of 4 random rows stay within the filtered set; 4000 draws of a
  3-token row match ``softmax(logits / temperature)`` within 4 standard errors."""
  keys = jax.random.split(jax.random.key(0), 2000)
  rows = jnp.asarray(np.random.default_rng(4).standard_normal((4, V)) * 2, jnp.float32)
  options = {"temperature": 1.2, "top_k": 8, "top_p": 0.9}
  draws = jax.jit(jax.vmap(lambda k: jlayers.sample_logits(rows, k, **options)))(keys)
  kept = _filter_reference(np.asarray(rows) / options["temperature"], options["top_k"],
                           options["top_p"])
  assert kept.sum(axis=-1).min() >= 2  # a real choice in every row
  assert np.take_along_axis(kept[None], np.asarray(draws)[..., None], axis=-1).all()
  assert all(len(set(np.asarray(draws)[:, r])) >= 2 for r in range(4))

  logits = jnp.asarray([0.0, 1.0, 2.5], jnp.float32)
  n, temperature = 4000, 1.5
  draws = jax.jit(jax.vmap(lambda k: jlayers.sample_logits(logits, k, temperature=temperature)))(
      jax.random.split(jax.random.key(1), n))
  p = np.exp(np.asarray(logits, np.float64) / temperature)
  p /= p.sum()
  freq = np.bincount(np.asarray(draws), minlength=3) / n
  assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n)), (freq, p)


# ---------------------------------------------------------------------------------------------
# Errors.


_TOO_LONG = CONTEXT - WIDTH + 1
GENERATE_ERRORS = [  # (options, exception, message): each raised eagerly and while traced
    ({"max_new_tokens": _TOO_LONG}, ValueError,
     (rf"generate: the prompt width {WIDTH} \+ max_new_tokens {_TOO_LONG} = {CONTEXT + 1} "
      rf"tokens must fit max_length={CONTEXT + 1}, at most the model's context {CONTEXT}")),
    ({"max_new_tokens": 3, "max_length": 8}, ValueError,
     rf"max_new_tokens 3 = {WIDTH + 3} tokens must fit max_length=8"),
    ({"max_length": CONTEXT + 1}, ValueError, f"at most the model's context {CONTEXT}"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0, got -1"),
    ({"lengths": jnp.ones((2,), jnp.int32)}, ValueError, r"lengths must have shape \(3,\)"),
    ({"temperature": 1.0}, ValueError, "generate: sampling needs key="),
    ({"top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\], got 0"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \[0.0, 1.0\], got 1.5"),
    ({"temperature": -0.5}, ValueError, r"temperature must be in \[0.0, inf\], got -0.5"),
    ({"top_k": 0}, ValueError, "top_k must be positive, got 0"),
    ({"eos_id": 1.0}, TypeError, "eos_id must be an int, got float"),
]


def test_generate_rejects_bad_input_with_a_clear_error():
  """Each error eagerly and under ``jax.eval_shape`` (traced prompt, lengths and params);
  lengths outside ``[1, P]`` eagerly only (traced, they are not known)."""
  model, params, _ = _setup("llama", "float32")
  prompt, lengths = _prompt()

  def generate(params, prompt, row_lengths, **options):
    options = {"lengths": row_lengths, "max_new_tokens": 2, "temperature": 0.0, **options}
    return jlayers.generate(model, params, prompt, **options)

  for options, exception, message in GENERATE_ERRORS:
    with pytest.raises(exception, match=message):
      generate(params, prompt, lengths, **options)
    with pytest.raises(exception, match=message):
      jax.eval_shape(functools.partial(generate, **options), params, prompt, lengths)
  for bad in (0, WIDTH + 1):
    with pytest.raises(ValueError, match=rf"generate: lengths must lie in \[1, {WIDTH}\], got "
                                         rf"\[{bad}\] at \[1\]"):
      generate(params, prompt, jnp.asarray([WIDTH, bad, 1], jnp.int32))
  with pytest.raises(ValueError, match=r"prompt must be int\[B, P\] with P >= 1"):
    generate(params, prompt[0], None)
  with pytest.raises(TypeError, match="model must be a jlayers.TransformerLM"):
    jlayers.generate(model.init_cache, params, prompt, max_new_tokens=1, temperature=0.0)
  x = jnp.zeros((2, V))
  with pytest.raises(ValueError, match=r"filter_logits: top_p must lie in \(0, 1\]"):
    jlayers.filter_logits(x, top_p=0)
  with pytest.raises(ValueError, match="filter_logits: top_k must be positive"):
    jlayers.filter_logits(x, top_k=0)
  with pytest.raises(ValueError, match="sample_logits: sampling needs key="):
    jlayers.sample_logits(x)


def test_apply_rejects_a_cache_of_another_model_or_batch():
  """Traced only (``jax.eval_shape``): the errors come at trace time."""
  model, params, _ = _setup("mistral", "float32")
  ids = jnp.zeros((B, 2), jnp.int32)

  def apply(cache, **options):
    return jax.eval_shape(lambda params, cache: model.apply(params, cache, ids, **options),
                          params, cache)

  apply(model.init_cache(B, CONTEXT))  # the right cache traces
  def mistral(**options):
    return TransformerLM.mistral(V, CONTEXT, sliding_window=3, **{**_LLAMA, **options})

  others = [  # (cache, message)
      (model.init_cache(B + 1, CONTEXT), r"the cache's 'index' must be int\[3\].*another batch"),
      (mistral(layers=3).init_cache(B, CONTEXT), "a cache built for another model"),
      (mistral(num_kv_heads=4).init_cache(B, CONTEXT),
       (r"the cache's 'key' must have shape \(B, K, slots, H\) = \(3, 2, slots <= 3, 4\).*"
        r"got \(3, 4, 3, 4\): a cache built for another model or batch")),
      (_setup("llama", "float32")[0].init_cache(B, CONTEXT),  # 16 slots for a window of 3
       r"slots <= 3, 4\).*got \(3, 2, 16, 4\)"),
  ]
  for cache, message in others:
    with pytest.raises(ValueError, match=message):
      apply(cache)
  with pytest.raises(ValueError, match="the cache has no 'index'"):
    apply({k: v for k, v in model.init_cache(B, CONTEXT).items() if k != "index"})
  with pytest.raises(ValueError, match=r"lengths must have shape \(3,\)"):
    apply(model.init_cache(B, CONTEXT), lengths=jnp.ones((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"lengths must lie in \[0, 2\], got \[3\]"):
    model.apply(params, model.init_cache(B, CONTEXT), ids, lengths=np.asarray([3, 1, 1]))
  with pytest.raises(ValueError, match="lengths are for decoding, with a cache"):
    model.apply(params, {}, ids, lengths=jnp.asarray([1, 1, 1], jnp.int32))
  with pytest.raises(ValueError, match="segment_ids are for packed training rows"):
    apply(model.init_cache(B, CONTEXT), segment_ids=jnp.zeros((B, 2), jnp.int32))


# ---------------------------------------------------------------------------------------------
# The cache itself.


def test_cache_shapes_and_bytes_per_token():
  """Gemma 2's layers 0 and 2 hold a ring of ``min(window, max_length)`` slots, layer 1 one slot
  per token; the bytes per token are those of the global layer's keys and values, and the
  cache grows by exactly that per row and token."""
  model = ARCHS["gemma2"]()  # 3 layers, windows on 0 and 2, 1 kv head of 8 features
  for max_length, window_slots in ((10, 3), (2, 2)):
    cache = model.init_cache(B, max_length, dtype=jnp.bfloat16)
    assert set(cache) == {"index", "block_0", "block_1", "block_2"}
    assert cache["index"].dtype == jnp.int32 and cache["index"].tolist() == [0] * B
    for i, slots in enumerate((window_slots, max_length, window_slots)):
      for name in ("key", "value"):
        a = cache[f"block_{i}"]["attention"][name]
        assert a.shape == (B, 1, slots, 8) and a.dtype == jnp.bfloat16, (i, name)
  by_hand = 1 * 2 * 1 * 8 * 4  # 1 global layer, key and value, 1 kv head, 8 features, float32
  assert model.cache_bytes_per_token() == by_hand
  assert model.cache_bytes_per_token(dtype=jnp.bfloat16) == by_hand // 2
  llama = _setup("llama", "float32")[0]
  assert llama.cache_bytes_per_token() == 2 * 2 * 2 * 4 * 4  # 2 layers, k+v, 2 kv heads of 4
  for m in (model, llama):
    nbytes = [sum(a.nbytes for a in jax.tree.leaves(m.init_cache(1, n))) for n in (8, 9)]
    assert nbytes[1] - nbytes[0] == m.cache_bytes_per_token()


def test_cache_is_a_pytree_that_jit_can_donate():
  """Decoding token by token with the cache donated to a jitted ``apply``: the old buffers are
  consumed and every step's logits equal the full forward's."""
  model, params, forward = _setup("mistral", "float32")
  seq = np.random.default_rng(5).integers(0, V, (B, FULL)).astype(np.int32)
  step = jax.jit(lambda params, cache, ids: model.apply(params, cache, ids), donate_argnums=1)
  cache = model.init_cache(B, CONTEXT)
  got = []
  for t in range(4):
    old = cache
    logits, cache = step(params, cache, seq[:, t:t + 1])
    assert all(a.is_deleted() for a in jax.tree.leaves(old))
    got.append(np.asarray(logits)[:, 0])
  assert cache["index"].tolist() == [4] * B
  want = np.asarray(forward(params, seq))[:, :4]
  assert _rel(np.stack(got, axis=1), want) <= TOLERANCE["float32"]
