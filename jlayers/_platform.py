"""Per-platform formulations: the one tuned for XLA:CPU, XLA's native one everywhere else.

Where a rule is evaluated differently for speed on XLA:CPU (the convolution's weight gradient
as a patch loop, pooling as one strided view per window offset), both formulations are staged
out with :func:`jax.lax.platform_dependent`, and the one for the platform being lowered for is
kept: ``jax.jit(..., device=...)``, ``jax.export`` for several platforms and mixed set-ups pick
right. Every other platform (GPU, TPU) gets the XLA-native formulation (the backward-filter
convolution, ``reduce_window`` and select-and-scatter), which the vendors tune.

:func:`formulation` forces one of them while tracing, on any platform: the tests run both on
CPU, and a user can time the native one there.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

from jax import lax

FORMULATIONS = ("auto", "cpu", "native")

_forced: contextvars.ContextVar[str] = contextvars.ContextVar("jlayers_formulation",
                                                              default="auto")


@contextlib.contextmanager
def formulation(name: str) -> Iterator[None]:
  """Forces the formulation of the platform-dependent rules traced inside the block.

  Args:
    name: ``"cpu"`` (the formulations tuned for XLA:CPU, and attention's XLA blockwise form on
      every platform), ``"native"`` (what GPUs and TPUs get: XLA's own primitives, and
      attention's Pallas kernels, which a CPU runs in Pallas's interpret mode) or ``"auto"``
      (by the platform lowered for: the default).

  The choice is read when a function is traced, so trace (or ``jax.jit``) a fresh function
  inside the block: a function jitted and called before it keeps its compiled formulation.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> with jlayers.formulation("native"):
    ...   g = jax.grad(lambda x: jlayers.max_pool2d(x, 2).sum())(x)
    >>> g[0, :, :, 0].astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
  """
  with setting(_forced, "formulation: name", name, FORMULATIONS):
    yield


@contextlib.contextmanager
def setting(var: contextvars.ContextVar, what: str, value: str,
            choices: tuple[str, ...]) -> Iterator[None]:
  """``var`` set to ``value`` (one of ``choices``, else a ``ValueError`` naming ``what``, the
  function and argument) inside the block: the switches read while tracing (:func:`formulation`, and attention's choice of
  kernels to interpret)."""
  if value not in choices:
    raise ValueError(f"{what} must be one of {choices}, got {value!r}")
  token = var.set(value)
  try:
    yield
  finally:
    var.reset(token)


def forced() -> str:
  """The formulation forced by :func:`formulation` where this is traced (``"auto"`` if none)."""
  return _forced.get()


def by_platform(*args: Any, cpu: Callable[..., Any], native: Callable[..., Any]) -> Any:
  """``cpu(*args)`` when lowering for CPU, ``native(*args)`` for every other platform (or the
  one forced by :func:`formulation`). Both must return the same shapes and dtypes."""
  forced = _forced.get()
  if forced == "cpu":
    return cpu(*args)
  if forced == "native":
    return native(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=native)
