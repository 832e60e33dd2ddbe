"""The layer protocol shared by every layer and by the composition in :mod:`jlayers.models`.

A layer is a frozen dataclass holding static configuration only. Its arrays live outside it:

* ``init(key, input_shape, *, input_dtype=float32) -> (params, state)`` creates them for an
  input of ``input_shape`` (batch dimension included) and dtype ``input_dtype``; a layer with
  params creates them in its ``param_dtype`` (float32 by default, as in Flax);
* ``apply(params, state, x, *, key=None, train=False, impl="manual") -> (y, state)`` is a pure
  function of them and returns the (possibly updated) state instead of mutating anything.

Params and state are plain dicts of arrays, ``{}`` for a layer that has none. A layer's field
``dtype`` is the dtype it *computes* in (``None``: the input's); ``input_dtype`` of ``init``
is the dtype of the input it will be applied to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlayers import _checks

Params = dict[str, Any]
State = dict[str, Any]
Initializer = Callable[..., jax.Array]
"""A ``jax.nn.initializers``-style callable ``(key, shape, dtype) -> array``."""


class Layer:
  """Base class of the layer objects. Subclasses set :attr:`kind` and define the two methods."""

  kind: ClassVar[str] = "layer"
  """Snake-case name; :class:`jlayers.Sequential` names its children ``f"{kind}_{index}"``."""

  def init(self, key: jax.Array, input_shape: Sequence[int], *,
           input_dtype=jnp.float32) -> tuple[Params, State]:
    """Creates ``(params, state)`` for an input of ``input_shape`` (batch included) and
    ``input_dtype``."""
    del key, input_dtype
    _checks.shape_of(type(self).__name__, input_shape)
    return {}, {}

  def apply(self, params: Params, state: State, x: jax.Array, *, key: jax.Array | None = None,
            train: bool = False, impl: str = "manual") -> tuple[jax.Array, State]:
    """Maps ``x`` to ``(y, new_state)``; ``impl`` selects the manual rules or autodiff twins."""
    raise NotImplementedError

  def output_shape(self, input_shape: Sequence[int], *,
                   input_dtype=jnp.float32) -> tuple[int, ...]:
    """The shape ``apply`` gives for an input of ``input_shape``, computed without any FLOPs."""
    params, state = jax.eval_shape(
        lambda k: self.init(k, input_shape, input_dtype=input_dtype), jax.random.key(0))
    out, _ = jax.eval_shape(lambda p, s, x: self.apply(p, s, x), params, state,
                            jax.ShapeDtypeStruct(tuple(input_shape), input_dtype))
    return tuple(out.shape)


def check_dtypes(layer) -> None:
  """Validates and normalises the ``dtype`` and ``param_dtype`` fields of ``layer``."""
  where = type(layer).__name__
  set_field(layer, "dtype", _checks.float_dtype(where, "dtype", layer.dtype, optional=True))
  set_field(layer, "param_dtype",
            _checks.float_dtype(where, "param_dtype", layer.param_dtype, optional=False))


def compute_dtype(layer, x):
  """``x`` cast to ``layer.dtype`` (the computation dtype), or as it is when that is None.

  The cast is an ordinary ``jnp`` op outside the custom rules: autodiff transposes it, so the
  gradient of ``x`` comes back in ``x``'s own dtype.
  """
  x = _checks.floating(type(layer).__name__, "x", x)
  return x if layer.dtype is None else x.astype(layer.dtype)


def entries(layer, tree, what: str, names: Sequence[str]) -> list:
  """``[tree[n] for n in names]``, or a ``KeyError`` naming the layer, the missing entry and
  what ``tree`` has (a params or state dict from another model, or one that lost an entry)."""
  where = type(layer).__name__
  if not isinstance(tree, dict):
    raise TypeError(f"{where}: {what} must be a dict, got {type(tree).__name__}")
  missing = [n for n in names if n not in tree]
  if missing:
    raise KeyError(f"{where}: {what} has no entry {missing[0]!r} (it has {sorted(tree)}; "
                   f"this layer needs {list(names)})")
  return [tree[n] for n in names]


def set_field(obj, name: str, value) -> None:
  """Stores a normalised value on a frozen dataclass from its ``__post_init__``."""
  object.__setattr__(obj, name, value)
