"""Grid for ``dot_product_attention``: multi-head, grouped-query and multi-query heads,
``T ≠ S``, causal, masks of every broadcast shape (with fully masked rows), a given scale, and
sequences longer than one block (64 positions up to 512, 128 beyond) that are no multiple of
it, so that the block loop, its causal skipping and its padding run; then each option: local
windows (symmetric, one-sided with causal, over several blocks so that blocks are skipped),
the soft cap, segment ids (with rows of several segments, and ``T ≠ S``), sequence lengths
(with a row that sees nothing), biases of several broadcast shapes and sinks (both
differentiated), the returned log-sum-exp, and all of them at once. The rule is platform
dependent (Pallas kernels on GPUs and TPUs): the tests run every case in both formulations,
the kernels in Pallas's interpret mode.

Masks are fixed per case (a NumPy generator seeded by the case) and passed as the ``mask``
keyword; segment ids, lengths, biases and sinks are drawn per case and passed by name
(``Case.keywords``), so that the mesh tests split their batch with the queries'.
"""

import numpy as np

from jlayers.attention import dot_product_attention_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal


def _mask(shape, seed, density=0.6, empty_row=False):
  m = np.random.default_rng(seed).random(shape) < density
  if empty_row:  # query row 1 sees no key (in the first batch and head)
    m[0, 0, 1, :] = False
  return m


def _segments(b, length, seed, parts=3):
  """Segment ids: each row cut at sorted random points into up to ``parts`` segments."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.integers(0, length, (b, parts - 1)), axis=1)
  return (np.arange(length)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)


def _case(b, t, n, s, k, h, *, causal=False, mask=None, scale=None, suffix="", extra=None,
          diff_extra=(), **options):
  """A case; ``extra`` maps keyword arrays (segment ids, lengths, bias, sinks) to functions
  ``(rng, dtype) -> array`` (passed by name, batched when their first axis is ``b``), of which
  ``diff_extra`` are differentiated; ``options`` are the static keywords."""
  kwargs = dict(options)
  if causal:
    kwargs["causal"] = True
  if mask is not None:
    kwargs["mask"] = mask
  if scale is not None:
    kwargs["scale"] = scale
  extra = extra or {}

  def make(rng, dtype):
    arrays = (normal(rng, (b, t, n, h), dtype), normal(rng, (b, s, k, h), dtype),
              normal(rng, (b, s, k, h), dtype))
    return arrays + tuple(draw(rng, dtype) for draw in extra.values())

  names = tuple(extra)
  shapes = [np.shape(draw(np.random.default_rng(0), np.float32)) for draw in extra.values()]
  batched = (0, 1, 2) + tuple(3 + i for i, sh in enumerate(shapes) if len(sh) > 1
                              and sh[0] == b and b > 1)
  heads = "mha" if n == k else ("mqa" if k == 1 else "gqa")
  ident = f"{heads}-b{b}t{t}n{n}s{s}k{k}h{h}" + ("-causal" if causal else "") + suffix
  return Case(ident, make, kwargs, diff=(0, 1, 2) + tuple(3 + names.index(d) for d in diff_extra),
              batched=batched, keywords=names)


def _ints(values):
  return lambda rng, dtype: np.asarray(values, np.int32)


def _normal(shape, scale=1.0):
  return lambda rng, dtype: normal(rng, shape, dtype, scale=scale)


def _option_cases(b):
  """One case per option, and one with all of them (``b`` is the batch: 2, or the mesh's)."""
  seg_q, seg_kv = _segments(b, 9, 5), _segments(b, 11, 6)
  lengths = [5 + i % 5 for i in range(b)]
  return (
      _case(b, 9, 4, 9, 2, 3, local_window_size=2, suffix="-window2"),
      _case(b, 9, 2, 9, 1, 3, causal=True, local_window_size=(3, 0), suffix="-window30"),
      _case(b, 7, 4, 6, 2, 3, causal=True, logits_soft_cap=0.8, suffix="-softcap"),
      _case(b, 9, 4, 9, 2, 3, causal=True, suffix="-segments",
            extra={"q_segment_ids": _ints(seg_q)}),
      _case(b, 9, 2, 11, 2, 3, suffix="-segments-tneqs",
            extra={"q_segment_ids": _ints(seg_q), "kv_segment_ids": _ints(seg_kv)}),
      _case(b, 7, 4, 8, 2, 3, suffix="-lengths",
            extra={"query_seq_lengths": _ints([7 - i % 3 for i in range(b)]),
                   "key_value_seq_lengths": _ints([0] + lengths[1:])}),
      _case(b, 6, 4, 7, 2, 3, causal=True, suffix="-bias1nt1-sinks",
            extra={"bias": _normal((1, 4, 6, 1)), "sinks": _normal((4,))},
            diff_extra=("bias", "sinks")),
      _case(b, 6, 2, 7, 2, 3, suffix="-biasfull",
            extra={"bias": _normal((b, 2, 6, 7))}, diff_extra=("bias",)),
      _case(b, 5, 4, 5, 1, 3, causal=True, return_residual=True, suffix="-residual",
            extra={"sinks": _normal((4,))}, diff_extra=("sinks",)),
      _case(b, 9, 4, 9, 2, 3, causal=True, local_window_size=(4, 0), logits_soft_cap=1.3,
            return_residual=True, suffix="-everything",
            extra={"q_segment_ids": _ints(seg_q), "key_value_seq_lengths": _ints(lengths),
                   "bias": _normal((b, 1, 1, 9)), "sinks": _normal((4,))},
            diff_extra=("bias", "sinks")),
  )


def _bench(t, causal):
  def make(rng, dtype):
    return tuple(normal(rng, (4, t, 8, 64), dtype) for _ in range(3))
  return Case(f"4x{t}x8x64" + ("-causal" if causal else ""), make,
              {"causal": True} if causal else {}, diff=(0, 1, 2), batched=(0, 1, 2))


GRIDS = [
    Grid(
        dot_product_attention_op,
        (_case(2, 5, 2, 7, 2, 3),
         _case(2, 5, 4, 7, 2, 3, causal=True),
         _case(2, 7, 4, 5, 2, 3, causal=True),
         _case(1, 6, 4, 6, 1, 4, mask=_mask((1, 1, 6, 6), 0), suffix="-mask11ts"),
         _case(2, 4, 4, 5, 2, 3, mask=_mask((2, 4, 4, 5), 1, empty_row=True),
               suffix="-maskfull-emptyrow"),
         _case(2, 3, 2, 4, 2, 2, causal=True, mask=_mask((2, 1, 1, 4), 2, 0.7), scale=0.7,
               suffix="-maskb11s-scale"),
         _case(1, 150, 2, 140, 1, 2, causal=True, suffix="-blocks"),
         _case(1, 130, 2, 200, 2, 2, mask=_mask((1, 2, 130, 1), 3, 0.8), suffix="-blocks-mask"),
         _case(1, 1, 1, 1, 1, 2),
         *_option_cases(2),
         _case(1, 200, 2, 200, 1, 2, causal=True, local_window_size=(70, 0),
               suffix="-window-blocks"),
         _case(1, 140, 2, 150, 1, 2, local_window_size=(20, 90), suffix="-window-blocks2")),
        platform_dependent=True,  # the Pallas kernels on GPUs and TPUs
        representative=("gqa-b2t4n4s5k2h3-maskfull-emptyrow",
                        "mqa-b1t150n2s140k1h2-causal-blocks",
                        "gqa-b2t9n4s9k2h3-causal-everything"),
        bench=(_bench(512, False), _bench(512, True), _bench(2048, False), _bench(2048, True)),
        layouts=tuple(  # heads split over model, grouped-query included
            Layout("heads", _case(MESH_BATCH, 6, n, 6, k, 2, causal=True),
                   ((("data", None, "model"),) * 3), out=("data", None, "model"))
            for n, k in ((4, 4), (8, 4))) + (
            # A replicated bias and sinks: each device forms its heads' part of their gradients,
            # all-gathered whole (the layout's one gather).
            Layout("heads", _case(MESH_BATCH, 6, 8, 6, 4, 2, causal=True, suffix="-bias-sinks",
                                  extra={"bias": _normal((1, 8, 6, 6)), "sinks": _normal((8,))},
                                  diff_extra=("bias", "sinks")),
                   ((("data", None, "model"),) * 3) + ((), ()), gathered=(3, 4),
                   out=("data", None, "model")),),
        mesh=(_case(MESH_BATCH, 130, 4, 140, 2, 2, causal=True, suffix="-blocks"),
              _case(MESH_BATCH, 4, 2, 5, 2, 2, mask=_mask((MESH_BATCH, 1, 1, 5), 4, 0.7),
                    suffix="-keymask"),
              *(c for c in _option_cases(MESH_BATCH)
                if c.id.endswith(("-segments-tneqs", "-lengths", "-biasfull", "-everything")))),
    ),
]
