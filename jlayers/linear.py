"""Fully connected layer: ``y = x @ w + b`` with a hand-derived backward pass.

On GPUs and TPUs the rule stays in XLA, with no Pallas kernel: value and gradient are three
products (``dot_general``: the vendor's matrix kernels, cuBLAS or the TPU's matrix unit) and one
reduction for the bias, whose addition XLA fuses into the forward product.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jlayers import _checks, _ops, _sharding

_OP = "linear"


class _Config(NamedTuple):
  """Static configuration (hashable; goes in ``nondiff_argnums``)."""

  precision: Any
  bias: Any  # the bias dtype, None without a bias
  out_sharding: Any = None  # a PartitionSpec for y, None: the default layout
  bias_layout: Any = None  # b's sharding where the types carry one (db is laid out so)


def _validate(x, w, b, precision, out_sharding=None):
  x = _checks.floating(_OP, "x", x)
  w = _checks.floating(_OP, "w", w)
  _checks.min_rank(_OP, "x", x, 1, "(..., in)")
  _checks.rank(_OP, "w", w, 2, "(in, out)")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"{_OP}: x's last dimension must equal w's first (in features), "
        f"got x {tuple(x.shape)} and w {tuple(w.shape)}")
  if b is not None:
    b = _checks.floating(_OP, "b", b)
    _checks.shape(_OP, "b", b, (w.shape[1],), "(out,)")
  out_sharding = _checks.out_sharding(_OP, out_sharding, x.ndim)
  return x, w, b, _Config(_checks.precision(_OP, precision), None if b is None else b.dtype,
                          out_sharding, None if b is None else _sharding.like(b))


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *,
           precision=None, out_sharding=None) -> jax.Array:
  r"""Affine map over the last axis, with a manual VJP.

  .. math::
    y = x W + b

  The computation runs in ``x``'s dtype: ``w`` and ``b`` may have another float dtype (float32
  params with bfloat16 activations) and are cast to it; products accumulate in at least
  float32 and the bias is added before the one rounding to ``x``'s dtype. Each gradient comes
  back in its own input's dtype.

  Args:
    x: float[..., in]. Any number of leading (batch) dimensions, including none.
    w: float[in, out], any float dtype.
    b: optional float[out], any float dtype.
    precision: ``None``, a :class:`jax.lax.Precision` (or its name) or a pair of them, for
      every matrix product of the forward and backward passes (on GPU, ``None`` lets float32
      products run in TF32; ``"highest"`` keeps them in float32).
    out_sharding: where a mesh is set, the layout of ``y``: a
      :class:`~jax.sharding.PartitionSpec` (or ``NamedSharding``), as ``jnp.matmul`` takes
      it. Default: ``x``'s leading axes as ``x`` has them and the output features as ``w``
      has them (column-parallel: split over the axis ``w``'s columns are; row-parallel, ``x``'s
      and ``w``'s ``in`` split alike: summed across it and unsplit). Static.

  Returns:
    float[..., out] in the dtype of ``x``.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.linear(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4)).shape
    (2, 4)
    >>> jlayers.linear(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4))).dtype
    dtype(bfloat16)
  """
  x, w, b, config = _validate(x, w, b, precision, out_sharding)
  return _linear(config, x, w, b)


def _forward(config, x, w, b):
  acc = _checks.at_least_float32(x.dtype)
  out = config.out_sharding
  explicit = _sharding.explicit(x)
  if explicit and out is None:
    out = _sharding.product_layout(x, w)
  y = lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                      precision=config.precision, preferred_element_type=acc,
                      out_sharding=out if explicit else None)
  if not explicit and out is not None:
    y = _sharding.constrain(y, _sharding.entries(out))
  if b is not None:
    b = _sharding.reshard_like(b.astype(acc), y, axes=(y.ndim - 1,))
    y = y + b.reshape((1,) * (y.ndim - 1) + b.shape)
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _linear(config, x, w, b):
  return _forward(config, x, w, b)


def _linear_fwd(config, x, w, b):
  """Saves ``x`` and ``w``: dW needs x and dX needs w, and both are inputs (no extra memory)."""
  return _forward(config, x, w, b), (x, w)


def _linear_bwd(config, res, g):
  r"""Backward of ``y = x W + b`` for cotangent ``G = ∂L/∂y``.

  Index the leading (batch) dimensions of ``x`` and ``G`` by one multi-index ``m``. Then
  ``y_{mj} = Σ_i X_{mi} W_{ij} + b_j`` and

  .. math::
    \frac{∂L}{∂X_{mi}} = Σ_j G_{mj} W_{ij}       \;\Rightarrow\; dX = G W^T

    \frac{∂L}{∂W_{ij}} = Σ_m X_{mi} G_{mj}       \;\Rightarrow\; dW = X^T G

    \frac{∂L}{∂b_j}   = Σ_m G_{mj}

  dW and db contract every batch dimension. On a mesh whose devices each hold a slice of the
  batch, each device contracts its own slice and the ``[in, out]`` partial sums are added
  across devices: no batch-sized array moves. Each gradient is laid out as its input
  (``out_sharding`` where the types carry shardings): dW as ``w`` (split as FSDP or tensor
  parallelism split it: the sum arrives reduce-scattered), dX as ``x`` (column-parallel:
  ``G W^T`` contracts the split output features, summed across their axis). Products run in ``x``'s dtype and accumulate in at least
  float32; each cotangent is cast to its input's dtype (the cast of ``w`` to ``x``'s dtype in
  the forward transposes to this cast back).
  """
  x, w = res
  acc = _checks.at_least_float32(x.dtype)
  g = g.astype(x.dtype)
  lead = tuple(range(x.ndim - 1))
  dx = lax.dot_general(g, w.astype(x.dtype), (((g.ndim - 1,), (1,)), ((), ())),
                       precision=config.precision, preferred_element_type=acc,
                       out_sharding=_sharding.like(x))
  dw = lax.dot_general(x, g, ((lead, lead), ((), ())), precision=config.precision,
                       preferred_element_type=acc, out_sharding=_sharding.like(w))
  db = None
  if config.bias is not None:
    db = _sharding.reshard_to(jnp.sum(g.astype(acc), axis=lead), config.bias_layout)
    db = db.astype(config.bias)
  return dx.astype(x.dtype), dw.astype(w.dtype), db


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_reference(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *,
                     precision=None, out_sharding=None) -> jax.Array:
  """Autodiff twin of :func:`linear`: same signature, checks and forward, no custom rule."""
  x, w, b, config = _validate(x, w, b, precision, out_sharding)
  return _forward(config, x, w, b)


linear_op = _ops.declare(_OP, linear, linear_reference)
