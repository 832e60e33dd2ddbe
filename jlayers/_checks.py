"""Trace-time argument validation shared by every op.

Every check runs on static information only (shapes, dtypes, Python config values), so it
raises the same error eagerly and under ``jax.jit``. Messages name the op, the argument, what
was expected and what came, as a single string.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_int(v) -> bool:
  """A Python or NumPy integer, and not a bool."""
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def positive_int(op: str, name: str, value) -> int:
  """``value`` as an int, which must be >= 1."""
  if not is_int(value):
    raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
  if value < 1:
    raise ValueError(f"{op}: {name} must be positive, got {value}")
  return int(value)


def as_array(op: str, name: str, x) -> jax.Array:
  """Converts ``x`` to an array, rejecting objects that are not array-like."""
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return jnp.asarray(x)
  if isinstance(x, (bool, int, float)):
    return jnp.asarray(x)
  raise TypeError(f"{op}: {name} must be an array, got {type(x).__name__}")


def floating(op: str, name: str, x) -> jax.Array:
  """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is floating."""
  x = as_array(op, name, x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{op}: {name} must have a floating dtype, got {x.dtype}")
  return x


def integers_in(op: str, name: str, x, shape: tuple[int, ...], lo: int, hi: int) -> jax.Array:
  """``x`` as an int32 array of ``shape`` whose entries lie in ``[lo, hi]``. The range is
  checked when the values are known (not under ``jax.jit``); a traced ``x`` is the caller's to
  guard (the library's callers mark such rows invalid)."""
  x = as_array(op, name, x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{op}: {name} must have an integer dtype, got {x.dtype}")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
  if not isinstance(x, jax.core.Tracer):
    values = np.asarray(x)
    bad = (values < lo) | (values > hi)
    if bad.any():
      raise ValueError(f"{op}: {name} must lie in [{lo}, {hi}], got {values[bad][:5].tolist()} "
                       f"at {np.argwhere(bad)[:5, 0].tolist()}")
  return x.astype(jnp.int32)


def rank(op: str, name: str, x: jax.Array, expected: int | Sequence[int], what: str = "") -> None:
  """Raises ``ValueError`` unless ``x.ndim`` is ``expected`` (an int or a collection)."""
  allowed = (expected,) if isinstance(expected, int) else tuple(expected)
  if x.ndim not in allowed:
    want = " or ".join(str(r) for r in allowed)
    detail = f" {what}" if what else ""
    raise ValueError(f"{op}: {name} must have rank {want}{detail}, got shape {tuple(x.shape)}")


def min_rank(op: str, name: str, x: jax.Array, minimum: int, what: str = "") -> None:
  """Raises ``ValueError`` unless ``x.ndim >= minimum``."""
  if x.ndim < minimum:
    detail = f" {what}" if what else ""
    raise ValueError(
        f"{op}: {name} must have rank at least {minimum}{detail}, got shape {tuple(x.shape)}")


def shape(op: str, name: str, x: jax.Array, expected: tuple[int, ...], what: str = "") -> None:
  """Raises ``ValueError`` unless ``x.shape == expected``."""
  if tuple(x.shape) != tuple(expected):
    detail = f" {what}" if what else ""
    raise ValueError(
        f"{op}: {name} must have shape {tuple(expected)}{detail}, got {tuple(x.shape)}")


def axis_index(op: str, name: str, axis, ndim: int) -> int:
  """Normalises an integer axis into ``[0, ndim)``, raising on a bad type or value."""
  if not is_int(axis):
    raise TypeError(f"{op}: {name} must be an int, got {type(axis).__name__}")
  if not -ndim <= axis < ndim:
    raise ValueError(f"{op}: {name}={axis} is out of range for an input of rank {ndim}")
  return int(axis) % ndim


def axes(op: str, name: str, value, ndim: int) -> tuple[int, ...]:
  """An int or a non-empty sequence of distinct ints, each normalised into ``[0, ndim)``;
  returned sorted (a hashable tuple, for ``nondiff_argnums``)."""
  if is_int(value):
    return (axis_index(op, name, value, ndim),)
  if not isinstance(value, Sequence) or isinstance(value, str) or not all(map(is_int, value)):
    raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got {value!r}")
  if not value:
    raise ValueError(f"{op}: {name} must name at least one axis, got {value!r}")
  out = tuple(axis_index(op, name, a, ndim) for a in value)
  if len(set(out)) != len(out):
    raise ValueError(f"{op}: {name} must not repeat an axis, got {tuple(value)} for an input "
                     f"of rank {ndim}")
  return tuple(sorted(out))


def positive_float(op: str, name: str, value) -> float:
  """``value`` as a float, which must be finite and > 0 (an ``eps``)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{op}: {name} must be a positive float, got {type(value).__name__}")
  if not value > 0:
    raise ValueError(f"{op}: {name} must be a positive float, got {value!r}")
  if not math.isfinite(value):
    raise ValueError(f"{op}: {name} must be a finite positive float, got {value!r}")
  return float(value)


def optional_finite(op: str, name: str, value) -> float | None:
  """``None``, or ``value`` as a finite float (a scale that defaults when omitted)."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
      value):
    raise TypeError(f"{op}: {name} must be None or a finite float, got {value!r}")
  return float(value)


def real(op: str, name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
         lo_open: bool = False, hi_open: bool = False) -> float:
  """``value`` as a finite float within ``[lo, hi]`` (ends excluded when ``*_open``)."""
  interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    where = "" if math.isinf(lo) and math.isinf(hi) else f" in {interval}"
    raise TypeError(f"{op}: {name} must be a float{where}, got {type(value).__name__}")
  value = float(value)
  above = value > lo if lo_open else value >= lo
  below = value < hi if hi_open else value <= hi
  if not (math.isfinite(value) and above and below):
    raise ValueError(f"{op}: {name} must be in {interval}, got {value}")
  return value


def flag(op: str, name: str, value) -> bool:
  """``value`` as a bool; it must be a Python or NumPy bool (static configuration)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
  return bool(value)


IMPLS = ("manual", "autodiff")


def impl(op: str, value) -> str:
  """``value`` if it names an implementation: ``"manual"`` or ``"autodiff"``."""
  if not isinstance(value, str) or value not in IMPLS:
    raise ValueError(f"{op}: impl must be 'manual' or 'autodiff', got {value!r}")
  return value


def static_call(where: str, train, impl_name) -> None:
  """Validates the static arguments of a layer's ``apply``.

  ``train`` selects Python control flow, so it must be a concrete bool: under ``jax.jit`` pass
  it (and ``impl``) through ``static_argnames`` or close over it.
  """
  if not isinstance(train, (bool, np.bool_)):
    raise TypeError(f"{where}: train must be a Python bool (mark it static under jax.jit), "
                    f"got {type(train).__name__}")
  impl(where, impl_name)


def shape_of(where: str, input_shape, *, rank: int | None = None,
             min_rank: int | None = None) -> tuple[int, ...]:
  """A layer's ``input_shape`` as a tuple of non-negative ints, its rank checked."""
  if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not all(
      is_int(n) for n in input_shape):
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


def initializer(where: str, name: str, value):
  """A ``jax.nn.initializers``-style callable ``(key, shape, dtype) -> array``."""
  if not callable(value):
    raise TypeError(f"{where}: {name} must be an initializer (key, shape, dtype) -> array, "
                    f"got {type(value).__name__}")
  return value


def float_dtype(where: str, name: str, value, *, optional: bool):
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


def without_axis(shape, axis: int) -> tuple[int, ...]:
  """``shape`` with ``axis`` removed (the per-example shape of logits)."""
  return tuple(shape[:axis]) + tuple(shape[axis + 1:])


def class_logits(op: str, logits, axis) -> tuple[jax.Array, int]:
  """Floating logits of rank >= 1 with at least one class, and the class axis normalised."""
  logits = floating(op, "logits", logits)
  min_rank(op, "logits", logits, 1, "(a class axis)")
  axis = axis_index(op, "axis", axis, logits.ndim)
  if logits.shape[axis] == 0:
    raise ValueError(f"{op}: logits must have at least one class (C >= 1) on axis {axis}, "
                     f"got shape {tuple(logits.shape)}")
  return logits, axis


def example_or_class_mask(op: str, where, logits, axis: int):
  """``where`` as a bool of ``logits``' rank: one flag per class (``logits.shape``) as given,
  one flag per example (``logits.shape`` without ``axis``) with a size-1 class axis; ``None``
  stays ``None``."""
  if where is None:
    return None
  where = as_array(op, "where", where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"{op}: where must have dtype bool, got {where.dtype}")
  examples = without_axis(logits.shape, axis)
  if tuple(where.shape) == examples:
    return jnp.expand_dims(where, axis)
  if where.shape == logits.shape:
    return where
  raise ValueError(f"{op}: where must have shape {examples} (one flag per example) or "
                   f"{tuple(logits.shape)} (logits.shape, one flag per class), "
                   f"got {tuple(where.shape)}")


def positive_ints(op: str, name: str, value, n: int) -> tuple[int, ...]:
  """Normalises an int or a length-``n`` sequence of ints, each of which must be >= 1."""
  if is_int(value):
    value = (int(value),) * n
  elif isinstance(value, Sequence) and not isinstance(value, str):
    value = tuple(value)
    if len(value) != n or not all(map(is_int, value)):
      raise TypeError(f"{op}: {name} must be an int or a sequence of {n} ints, got {value!r}")
    value = tuple(int(v) for v in value)
  else:
    raise TypeError(f"{op}: {name} must be an int or a sequence of {n} ints, got {value!r}")
  if any(v < 1 for v in value):
    raise ValueError(f"{op}: {name} must be positive, got {value}")
  return value


_PADDING_FORMS = "'SAME', 'VALID', an int or ((lo_h, hi_h), (lo_w, hi_w)) of ints"


def padding(op: str, value):
  """Validates a 2-D padding without looking at sizes.

  Returns ``"SAME"`` or ``"VALID"`` as given, or explicit non-negative pairs
  ``((lo_h, hi_h), (lo_w, hi_w))`` for an int or pairs (hashable, for ``nondiff_argnums``).
  """
  if isinstance(value, str):
    if value in ("SAME", "VALID"):
      return value
    raise ValueError(f"{op}: padding must be {_PADDING_FORMS}, got {value!r}")
  if is_int(value):
    pads = ((int(value),) * 2,) * 2
  elif (isinstance(value, Sequence) and len(value) == 2 and all(
      isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
      and all(map(is_int, p)) for p in value)):
    pads = tuple((int(lo), int(hi)) for lo, hi in value)
  else:
    raise TypeError(f"{op}: padding must be {_PADDING_FORMS}, got {value!r}")
  if any(v < 0 for pair in pads for v in pair):
    raise ValueError(f"{op}: padding must be non-negative, got {value!r}")
  return pads


def explicit_padding(op: str, value, size, window, stride) -> tuple[tuple[int, int], ...]:
  """``((lo_h, hi_h), (lo_w, hi_w))`` for any accepted padding, given the spatial ``size``,
  the (dilated) ``window`` and the ``stride``. ``"SAME"`` follows ``lax.padtype_to_pads``:
  output size ``ceil(size / stride)``, an odd total split with the extra element high."""
  pads = padding(op, value)
  if pads == "VALID":
    return ((0, 0), (0, 0))
  if pads == "SAME":
    total = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(size, window, stride)]
    return tuple((t // 2, t - t // 2) for t in total)
  return pads


def axis_name(op: str, value):
  """``None`` or a hashable name of a mapped axis (it is static configuration)."""
  try:
    hash(value)
  except TypeError:
    raise TypeError(f"{op}: axis_name must be None or a hashable axis name, "
                    f"got {value!r}") from None
  return value


def bound_axis_name(op: str, value):
  """:func:`axis_name`, and every name in it bound here: the axis of an enclosing
  ``shard_map``, ``pmap`` or ``vmap`` (checked while tracing the op, where a reduction over an
  unbound name would fail inside JAX)."""
  value = axis_name(op, value)
  for name in () if value is None else value if isinstance(value, tuple) else (value,):
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise ValueError(f"{op}: axis_name {name!r} is not the name of a mapped axis here (a "
                       "shard_map, pmap or vmap axis around this call)") from None
  return value


def layout(op: str, value) -> str:
  """Validates a 2-D spatial layout name."""
  if value not in ("NHWC", "NCHW"):
    raise ValueError(f"{op}: layout must be 'NHWC' or 'NCHW', got {value!r}")
  return value


def at_least_float32(dtype) -> jnp.dtype:
  """The dtype statistics are computed in: ``dtype`` itself if it is at least 32 bits wide,
  else float32 (for bfloat16 and float16). Independent of the dtype-promotion mode."""
  dtype = jnp.dtype(dtype)
  return dtype if dtype.itemsize >= 4 else jnp.dtype(jnp.float32)


_PRECISION_NAMES = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32",
                    "fastest")


def precision(op: str, value):
  """``None``, a :class:`jax.lax.Precision`, one of its string names, or a pair of those (lhs,
  rhs), as ``jax.lax.dot_general`` takes; returned in a hashable form for ``nondiff_argnums``."""
  def one(v):
    if isinstance(v, jax.lax.Precision):
      return v
    if isinstance(v, str) and v.lower() in _PRECISION_NAMES:
      return jax.lax.Precision(v.lower())
    raise TypeError(f"{op}: precision must be None, a jax.lax.Precision, one of "
                    f"{_PRECISION_NAMES} or a pair of those, got {value!r}")

  if value is None:
    return None
  if isinstance(value, (tuple, list)):
    if len(value) != 2:
      raise TypeError(f"{op}: precision must be None, a jax.lax.Precision, one of "
                      f"{_PRECISION_NAMES} or a pair of those, got {value!r}")
    return (one(value[0]), one(value[1]))
  return one(value)


def out_sharding(op: str, value, ndim: int):
  """``None``, a :class:`jax.sharding.PartitionSpec` of at most ``ndim`` entries, or a
  ``NamedSharding`` (its spec is used, on the current mesh): the layout asked of an op's
  output, as a ``PartitionSpec`` (hashable, for ``nondiff_argnums``)."""
  if value is None:
    return None
  spec = getattr(value, "spec", value)
  if not isinstance(spec, jax.sharding.PartitionSpec):
    raise TypeError(f"{op}: out_sharding must be None, a jax.sharding.PartitionSpec or a "
                    f"NamedSharding, got {type(value).__name__}")
  if len(spec) > ndim:
    raise ValueError(f"{op}: out_sharding must have at most {ndim} entries (the output's "
                     f"rank), got {spec}")
  return spec
