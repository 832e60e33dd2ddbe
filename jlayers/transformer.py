"""A decoder-only transformer language model built from jlayers layers.

Every op of it (embedding lookups, layer norms, projections, causal attention, GELU, the tied
output logits) runs its hand-derived backward pass under ``impl="manual"`` and autodiff of
the twins under ``impl="autodiff"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

from jlayers import _checks
from jlayers.layers import GELU, Embedding, LayerNorm, Linear, MultiHeadAttention
from jlayers.layers import base
from jlayers.models import Composite, Remat, Residual, Sequential


def transformer_block(features: int, heads: int, *, num_kv_heads: int | None = None,
                      mlp_features: int | None = None, causal: bool = True, dtype=None,
                      param_dtype=jnp.float32) -> Sequential:
  """One pre-norm block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

  As a :class:`jlayers.Sequential` of two :class:`jlayers.Residual` s::

    attention: LayerNorm → MultiHeadAttention(heads, causal) → + x
    mlp:       LayerNorm → Linear(mlp_features) → GELU → Linear(features) → + x

  ``mlp_features`` defaults to ``4 · features``. Maps ``float[B, T, features]`` to the same.
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


@dataclasses.dataclass(frozen=True)
class TransformerLM(Composite):
  """A decoder-only (GPT-style) transformer over token ids.

  ``ids: int[B, T]`` (``T <= context``) → token embedding + learned position embedding →
  ``layers`` × :func:`transformer_block` (causal) → final ``LayerNorm`` → logits
  ``float[B, T, vocab_size]``: the token embedding's :meth:`~jlayers.Embedding.attend` (tied,
  the default) or a ``Linear`` head (``tied=False``). ``remat=True`` wraps every block in
  :class:`jlayers.Remat` (recomputed in the backward pass). ``dtype``/``param_dtype`` go to
  every layer; the logits come out in ``dtype`` (``None``: float32).

  Params: ``{"embed", "position", "block_0", ..., "norm"}`` (and ``"head"`` untied). No state.
  Initialise with ``init(key, (B, T), input_dtype=jnp.int32)``.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.TransformerLM(11, 8, features=16, layers=2, heads=2)
    >>> params, _ = model.init(jax.random.key(0), (2, 8), input_dtype=jnp.int32)
    >>> forward = jax.jit(lambda params, ids: model.apply(params, {}, ids)[0])
    >>> forward(params, jnp.zeros((2, 8), jnp.int32)).shape
    (2, 8, 11)
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

  def __post_init__(self):
    for name in ("vocab_size", "context", "features", "layers", "heads"):
      _checks.positive_int("TransformerLM", name, getattr(self, name))
    for name in ("tied", "remat"):
      _checks.flag("TransformerLM", name, getattr(self, name))
    base.check_dtypes(self)

  def _kw(self):
    return {"dtype": self.dtype, "param_dtype": self.param_dtype}

  def forward(self, scope, ids):
    if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.context:
      raise ValueError(f"TransformerLM: ids must have shape (B, T) with 1 <= T <= context="
                       f"{self.context}, got {tuple(ids.shape)}")
    embed = Embedding(self.vocab_size, self.features, **self._kw())
    h = scope("embed", embed, ids)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32).reshape(1, -1)
    h = h + scope("position", Embedding(self.context, self.features, **self._kw()), positions)
    block = transformer_block(self.features, self.heads, num_kv_heads=self.num_kv_heads,
                              mlp_features=self.mlp_features, **self._kw())
    if self.remat:
      block = Remat(block)
    for i in range(self.layers):
      h = scope(f"block_{i}", block, h)
    h = scope("norm", LayerNorm(**self._kw()), h)
    if self.tied:
      return embed.attend(scope.params_of("embed"), h, impl=scope.impl)
    return scope("head", Linear(self.vocab_size, **self._kw()), h)
