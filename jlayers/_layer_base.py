"""The layer protocol shared by :mod:`jlayers.layers` and :mod:`jlayers.models`, and the checks
of layer configuration.

A layer is a frozen dataclass holding static configuration only. Its arrays live outside it:

* ``init(key, input_shape, *, dtype=float32) -> (params, state)`` creates them for an input of
  ``input_shape`` (batch dimension included) and dtype ``dtype``; a layer with params creates
  them in its ``param_dtype`` (float32 by default, as in Flax);
* ``apply(params, state, x, *, key=None, train=False, impl="manual") -> (y, state)`` is a pure
  function of them and returns the (possibly updated) state instead of mutating anything.

Params and state are plain dicts of arrays, ``{}`` for a layer that has none.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jlayers import _checks, _impl

Params = dict[str, Any]
State = dict[str, Any]


class Layer:
  """Base class of the layer objects. Subclasses set :attr:`kind` and define the two methods."""

  kind: ClassVar[str] = "layer"
  """Snake-case name; :class:`jlayers.Sequential` names its children ``f"{kind}_{index}"``."""

  def init(self, key: jax.Array, input_shape: Sequence[int], *,
           dtype=jnp.float32) -> tuple[Params, State]:
    """Creates ``(params, state)`` for an input of ``input_shape`` (batch included)."""
    del key, dtype
    shape_of(type(self).__name__, input_shape)
    return {}, {}

  def apply(self, params: Params, state: State, x: jax.Array, *, key: jax.Array | None = None,
            train: bool = False, impl: str = "manual") -> tuple[jax.Array, State]:
    """Maps ``x`` to ``(y, new_state)``; ``impl`` selects the manual rules or autodiff twins."""
    raise NotImplementedError

  def output_shape(self, input_shape: Sequence[int], *, dtype=jnp.float32) -> tuple[int, ...]:
    """The shape ``apply`` gives for an input of ``input_shape``, computed without any FLOPs."""
    params, state = jax.eval_shape(lambda k: self.init(k, input_shape, dtype=dtype),
                                   jax.random.key(0))
    out, _ = jax.eval_shape(lambda p, s, x: self.apply(p, s, x),
                            params, state, jax.ShapeDtypeStruct(tuple(input_shape), dtype))
    return tuple(out.shape)


def check_call(where: str, train, impl) -> None:
  """Validates the static arguments of ``apply``.

  ``train`` selects Python control flow, so it must be a concrete bool: under ``jax.jit`` pass
  it (and ``impl``) through ``static_argnames`` or close over it.
  """
  if not isinstance(train, (bool, np.bool_)):
    raise TypeError(f"{where}: train must be a Python bool (mark it static under jax.jit), "
                    f"got {type(train).__name__}")
  _impl.check(impl, where)


def shape_of(where: str, input_shape, *, rank: int | None = None,
             min_rank: int | None = None) -> tuple[int, ...]:
  """Normalises ``input_shape`` to a tuple of non-negative ints, checking its rank."""
  if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not all(
      _checks.is_int(n) for n in input_shape):
    raise TypeError(f"{where}: input_shape must be a sequence of ints (batch dimension "
                    f"included), got {input_shape!r}")
  shape = tuple(int(n) for n in input_shape)
  if any(n < 0 for n in shape):
    raise ValueError(f"{where}: input_shape must have non-negative sizes, got {shape}")
  if rank is not None and len(shape) != rank:
    raise ValueError(f"{where}: input_shape must have rank {rank}, got {shape}")
  if min_rank is not None and len(shape) < min_rank:
    raise ValueError(f"{where}: input_shape must have rank at least {min_rank}, got {shape}")
  return shape


def real(where: str, name: str, value, lo: float, hi: float, *, lo_open: bool = False,
         hi_open: bool = False) -> float:
  """``value`` as a float within ``[lo, hi]`` (ends excluded when ``*_open``)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{where}: {name} must be a float, got {type(value).__name__}")
  value = float(value)
  above = value > lo if lo_open else value >= lo
  below = value < hi if hi_open else value <= hi
  if not (above and below):
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise ValueError(f"{where}: {name} must be in {interval}, got {value}")
  return value


def flag(where: str, name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__}")
  return bool(value)


def initializer(where: str, name: str, value):
  if not callable(value):
    raise TypeError(f"{where}: {name} must be an initializer (key, shape, dtype) -> array, "
                    f"got {type(value).__name__}")
  return value


def dtype_field(where: str, name: str, value, *, optional: bool):
  """``value`` as a floating ``jnp.dtype`` (``None`` allowed when ``optional``)."""
  if value is None and optional:
    return None
  try:
    dtype = None if value is None else jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    allowed = "None or a float dtype" if optional else "a float dtype"
    raise TypeError(f"{where}: {name} must be {allowed}, got {value!r}")
  return dtype


def check_dtypes(layer) -> None:
  """Validates and normalises the ``dtype`` and ``param_dtype`` fields of ``layer``."""
  where = type(layer).__name__
  set_field(layer, "dtype", dtype_field(where, "dtype", layer.dtype, optional=True))
  set_field(layer, "param_dtype",
            dtype_field(where, "param_dtype", layer.param_dtype, optional=False))


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
