"""Choice between the hand-written rules and their autodiff twins, made per call.

Layers look their ops up here at trace time, so the same layer object runs either
implementation and ``impl`` works as a static argument of ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

IMPLS = ("manual", "autodiff")
"""``"manual"``: the ``custom_vjp`` rules; ``"autodiff"``: the plain-jnp reference twins."""


def check(impl, where: str = "apply") -> str:
  """Returns ``impl`` if it names an implementation, else raises ``ValueError``."""
  if not isinstance(impl, str) or impl not in IMPLS:
    raise ValueError(f"{where}: impl must be 'manual' or 'autodiff', got {impl!r}")
  return impl


def op(name: str, impl: str) -> Callable[..., Any]:
  """The registered op ``name``: its manual rule or its autodiff twin.

  Args:
    name: registry name, e.g. ``"conv2d"``.
    impl: ``"manual"`` or ``"autodiff"``.

  Returns:
    ``OPS[name].manual`` or ``OPS[name].reference``.
  """
  impl = check(impl, name)
  from jlayers.registry import OPS  # noqa: PLC0415  (the registry imports every op module)

  try:
    spec = OPS[name]
  except KeyError:
    raise NotImplementedError(f"{name}: no op of that name is registered in jlayers.registry.OPS "
                              f"(registered: {sorted(OPS)})") from None
  return spec.manual if impl == "manual" else spec.reference
