"""Which evaluation of attention's rule a platform runs: the Pallas kernels on GPUs
(:mod:`jlayers._attention_pallas`) and TPUs (:mod:`jlayers._attention_mosaic`), the XLA
blockwise form (:mod:`jlayers.attention`) on CPUs and wherever a kernel cannot take the call
(:func:`jlayers._attention_kernels.fallback`).

Both are staged out with :func:`jax.lax.platform_dependent`, so the platform being lowered for
picks (``jax.jit(..., device=...)``, ``jax.export`` and lowering for a named platform pick
right); :func:`jlayers.formulation` forces the XLA form (``"cpu"``) or the kernels
(``"native"``, which a CPU runs in Pallas's interpret mode: the Triton kernels, or the Mosaic
ones inside :func:`interpreting`). Forward and backward choose alike, and both evaluations
keep the same residuals (the output and log-sum-exp ``[B, K, G, T]`` in at least float32,
``+inf`` for a row that sees nothing), so a forward and backward always pair.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import jax.numpy as jnp
from jax import lax

from jlayers import _attention_kernels as _k
from jlayers import _attention_mosaic, _attention_pallas, _platform

_interpreted: contextvars.ContextVar[str] = contextvars.ContextVar(
    "jlayers_attention_interpreted", default="triton")
_MODULES = {"triton": _attention_pallas, "mosaic": _attention_mosaic}


@contextlib.contextmanager
def interpreting(backend: str) -> Iterator[None]:
  """Under ``formulation("native")`` on a CPU, interpret ``backend``'s kernels (``"triton"``,
  the default, or ``"mosaic"``) while tracing inside the block."""
  if backend not in _MODULES:
    raise ValueError(f"interpreting: backend must be one of {tuple(_MODULES)}, got {backend!r}")
  token = _interpreted.set(backend)
  try:
    yield
  finally:
    _interpreted.reset(token)


def _choose(q, k, extras, xla, kernel):
  """A function of the same arguments as ``xla``: ``xla`` where the XLA form runs, else
  ``platform_dependent`` over ``kernel(backend, interpret)`` per platform."""
  forced = _platform.forced()
  if forced == "cpu":
    return xla
  branches = {}
  for platforms, backend in ((("cuda", "rocm"), "triton"), (("tpu",), "mosaic")):
    fn = xla if _k.fallback(backend, q, k, extras) else kernel(backend, False)
    branches.update(dict.fromkeys(platforms, fn))
  cpu = xla
  if forced == "native":
    backend = _interpreted.get()
    if not _k.fallback(backend, q, k, extras, interpret=True):
      cpu = kernel(backend, True)
  if all(fn is xla for fn in (cpu, *branches.values())):
    return xla
  return lambda *args: lax.platform_dependent(*args, cpu=cpu, default=xla, **branches)


def _spec(config, q, k, extras, backend):
  t, s = q.shape[1], k.shape[1]
  bq, bk = _k.block_sizes(backend, t, s)
  return _k.prepare(extras, q, k, bq, bk, causal=config.causal, window=config.window,
                    soft_cap=config.soft_cap, scale=config.scale)


def forward(config, q, k, v, extras, *, xla):
  """``(output [B, T, N, H], log-sum-exp [B, K, G, T])`` in at least float32 (``+inf`` where a
  row sees nothing and has no sink), by the platform's evaluation; ``xla(config, q, k, v,
  extras)`` is the XLA form."""

  def kernel(backend, interpret):
    def run(q, k, v, extras):
      spec, ops = _spec(config, q, k, extras, backend)
      out, lse = _MODULES[backend].forward(q, k, v, spec, ops, interpret=interpret)
      b, t, n, _ = q.shape
      lse = jnp.where(lse == -jnp.inf, jnp.inf, lse).reshape(b, k.shape[2], -1, t)
      return out, lse
    return run

  return _choose(q, k, extras, functools.partial(xla, config), kernel)(q, k, v, extras)


def backward(config, q, k, v, extras, g, lse, delta, *, xla):
  """``(dQ, dK, dV, dbias or None)`` in at least float32 from the output cotangent ``g`` and
  the residual log-sum-exp ``lse`` and ``δ = dO · O − \\bar L`` (both ``[B, K, G, T]``), by the
  platform's evaluation; ``xla(config, q, k, v, extras, g, lse, delta)`` is the XLA form."""

  def kernel(backend, interpret):
    def run(q, k, v, extras, g, lse, delta):
      spec, ops = _spec(config, q, k, extras, backend)
      b, t, n, _ = q.shape
      lse = jnp.where(lse == jnp.inf, -jnp.inf, lse).reshape(b, n, t)
      return _MODULES[backend].backward(q, k, v, g, lse, delta.reshape(b, n, t), spec, ops,
                                        interpret=interpret)
    return run

  return _choose(q, k, extras, functools.partial(xla, config), kernel)(
      q, k, v, extras, g, lse, delta)
