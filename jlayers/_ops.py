"""Ops as declared objects: each op's manual rule next to its autodiff twin.

Every op module ends with one :class:`Op` (``linear_op = declare("linear", linear,
linear_reference)``), next to the rule's ``defvjp`` and the twin. Layers import that object and
run ``linear_op.select(impl)``, so a reader follows a layer's input into the op's module by an
import. :mod:`jlayers.reference`, the op table (:func:`registered_ops`) and the test grids
(:mod:`jlayers.grids`) are derived from these declarations.

Users add ops of their own to the table with :func:`register_op` and look them up by name
with :func:`op`. The table is for users' layers: jlayers' own layers never read it, so
registering an op never changes what a built-in layer runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from jlayers import _checks

@dataclasses.dataclass(frozen=True)
class Op:
  """An op: its hand-written rule and its autodiff twin (the same signature and forward).

  Attributes:
    name: the op's name (``jlayers.<name>``, ``jlayers.reference.<name>`` for jlayers' own).
    manual: the op with its hand-written backward pass (typically a ``jax.custom_vjp``).
    reference: the twin, differentiated by JAX.

  Examples:
    >>> import jlayers
    >>> from jlayers.activation import relu_op
    >>> relu_op.select("autodiff") is jlayers.reference.relu
    True
  """

  name: str
  manual: Callable[..., Any]
  reference: Callable[..., Any]

  def select(self, impl: str) -> Callable[..., Any]:
    """The manual rule (``impl="manual"``) or the twin (``impl="autodiff"``)."""
    impl = _checks.impl(self.name, impl)
    return self.manual if impl == "manual" else self.reference


_BUILTIN: dict[str, Op] = {}
_USERS: dict[str, Op] = {}


def declare(name: str, manual: Callable[..., Any], reference: Callable[..., Any]) -> Op:
  """Declares one of jlayers' own ops (called once per op, at the end of its module)."""
  if name in _BUILTIN:
    raise RuntimeError(f"op {name!r} is declared twice")
  _BUILTIN[name] = Op(name, manual, reference)
  return _BUILTIN[name]


def builtin_ops() -> dict[str, Op]:
  """jlayers' own ops, ``{name: Op}``, in the order their modules declare them."""
  return dict(_BUILTIN)


def register_op(name: str, manual: Callable[..., Any], reference: Callable[..., Any], *,
                replace: bool = False) -> Op:
  """Adds an op of yours to the table, so that your layers calling :func:`op` follow ``impl``.

  Args:
    name: the op's name (a non-empty string, not the name of one of jlayers' ops).
    manual: the op with its hand-written backward pass (typically a ``jax.custom_vjp``).
    reference: its autodiff twin: the same signature and forward, no custom rule.
    replace: allow replacing an op of yours registered under ``name`` before.

  Returns:
    The :class:`Op` registered.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> @jax.custom_vjp
    ... def square(x):
    ...   return x * x
    >>> square.defvjp(lambda x: (x * x, x), lambda x, g: (2 * x * g,))
    >>> _ = jlayers.register_op("square", square, lambda x: x * x)
    >>> float(jax.grad(jlayers.op("square", "autodiff"))(3.0))
    6.0
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"register_op: name must be a non-empty string, got {name!r}")
  for what, fn in (("manual", manual), ("reference", reference)):
    if not callable(fn):
      raise TypeError(f"register_op: {what} must be callable, got {type(fn).__name__}")
  if name in _BUILTIN:
    raise ValueError(f"register_op: {name!r} is one of jlayers' own ops (its layers run it "
                     "directly, whatever the table holds); register yours under another name")
  entry = Op(name, manual, reference)
  if name in _USERS and not replace and _USERS[name] != entry:
    raise ValueError(f"register_op: an op named {name!r} is registered already; pass "
                     "replace=True to replace it")
  _USERS[name] = entry
  return entry


def unregister_op(name: str) -> None:
  """Removes an op of yours from the table (``KeyError`` if none is registered as ``name``)."""
  if name in _BUILTIN:
    raise ValueError(f"unregister_op: {name!r} is one of jlayers' own ops")
  try:
    del _USERS[name]
  except KeyError:
    raise KeyError(f"unregister_op: no op of yours is registered as {name!r}") from None


def op(name: str, impl: str = "manual") -> Callable[..., Any]:
  """The op ``name`` of the table (jlayers' or one of yours): its manual rule or its twin.

  Args:
    name: a registered name, e.g. ``"conv2d"`` (see :func:`registered_ops`).
    impl: ``"manual"`` or ``"autodiff"``.

  Returns:
    The manual rule or the twin.

  Examples:
    >>> import jlayers
    >>> jlayers.op("relu", "autodiff") is jlayers.reference.relu
    True
  """
  entry = _BUILTIN.get(name) or _USERS.get(name)
  if entry is None:
    raise KeyError(f"{name}: no op of that name is registered (registered: "
                   f"{sorted(registered_ops())}); add one with jlayers.register_op")
  return entry.select(impl)


def registered_ops() -> dict[str, Op]:
  """The table: jlayers' ops and yours, ``{name: Op}`` (a copy)."""
  return {**_BUILTIN, **_USERS}
