"""The op table: each op's manual rule and its autodiff twin, looked up by name per call.

Layers look their ops up here when ``apply`` is traced, so the same layer object runs either
implementation and ``impl`` works as a static argument of ``jax.jit``. jlayers registers its
own ops when it is imported; users add theirs with :func:`register_op`. The table knows no
configuration grids: those live with the tests and the command-line tools
(:mod:`jlayers.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

IMPLS = ("manual", "autodiff")
"""``"manual"``: the ``custom_vjp`` rules; ``"autodiff"``: the plain-jnp reference twins."""


class Entry(NamedTuple):
  """One op of the table: its hand-written rule and its autodiff twin (same signature)."""

  manual: Callable[..., Any]
  reference: Callable[..., Any]


_TABLE: dict[str, Entry] = {}


def check(impl, where: str = "apply") -> str:
  """Returns ``impl`` if it names an implementation, else raises ``ValueError``."""
  if not isinstance(impl, str) or impl not in IMPLS:
    raise ValueError(f"{where}: impl must be 'manual' or 'autodiff', got {impl!r}")
  return impl


def register_op(name: str, manual: Callable[..., Any], reference: Callable[..., Any], *,
                replace: bool = False) -> None:
  """Adds an op to the table, so that layers calling :func:`op` follow ``impl`` for it.

  Args:
    name: the op's name (a non-empty string).
    manual: the op with its hand-written backward pass (typically a ``jax.custom_vjp``).
    reference: its autodiff twin: the same signature and forward, no custom rule.
    replace: allow replacing an op already registered under ``name``.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> @jax.custom_vjp
    ... def square(x):
    ...   return x * x
    >>> square.defvjp(lambda x: (x * x, x), lambda x, g: (2 * x * g,))
    >>> jlayers.register_op("square", square, lambda x: x * x)
    >>> float(jax.grad(jlayers.op("square", "autodiff"))(3.0))
    6.0
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"register_op: name must be a non-empty string, got {name!r}")
  for what, fn in (("manual", manual), ("reference", reference)):
    if not callable(fn):
      raise TypeError(f"register_op: {what} must be callable, got {type(fn).__name__}")
  if name in _TABLE and not replace and _TABLE[name] != (manual, reference):
    raise ValueError(f"register_op: an op named {name!r} is registered already; pass "
                     "replace=True to replace it")
  _TABLE[name] = Entry(manual, reference)


def op(name: str, impl: str = "manual") -> Callable[..., Any]:
  """The registered op ``name``: its manual rule or its autodiff twin.

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
  impl = check(impl, name)
  try:
    entry = _TABLE[name]
  except KeyError:
    raise KeyError(f"{name}: no op of that name is registered (registered: "
                   f"{sorted(_TABLE)}); add one with jlayers.register_op") from None
  return entry.manual if impl == "manual" else entry.reference


def registered_ops() -> dict[str, Entry]:
  """A copy of the table: ``{name: Entry(manual, reference)}``."""
  return dict(_TABLE)
