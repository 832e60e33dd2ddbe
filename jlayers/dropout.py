"""Inverted dropout with a hand-derived backward pass.

On GPUs and TPUs the rule stays in XLA, with no Pallas kernel: the random bits (the
threefry hash, about 300 integer operations) and the mask are elementwise, and XLA fuses them
into one kernel with the multiplication; the backward is one multiplication by the same mask.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlayers import _checks, _ops, _sharding


# Raw key shapes of JAX's PRNG implementations.
_RAW_KEY_IMPLS = {(2,): "threefry2x32", (4,): "rbg"}
_KEY_SHAPES = {"threefry2x32": (2,), "rbg": (4,), "unsafe_rbg": (4,)}


def _typed_key(key) -> jax.Array:
  """A single typed PRNG key from a typed key or a raw one (``jax.random.PRNGKey``):
  ``uint32[2]`` (threefry) or ``uint32[4]`` (rbg, unsafe_rbg), read with the default
  implementation when its keys have that shape."""
  if isinstance(key, (jax.Array, np.ndarray)):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
      if key.shape != ():
        raise ValueError(f"dropout: key must be a single key, got a key array of shape {key.shape}")
      return key
    shape = tuple(key.shape)
    if key.dtype == jnp.uint32 and shape in _RAW_KEY_IMPLS:
      default = jax.config.jax_default_prng_impl
      impl = default if _KEY_SHAPES.get(default) == shape else _RAW_KEY_IMPLS[shape]
      return jax.random.wrap_key_data(key, impl=impl)
    raise TypeError(
        "dropout: key must be a typed key (jax.random.key) or a raw uint32[2] or uint32[4] key "
        f"(jax.random.PRNGKey), got {key.dtype}{list(key.shape)}")
  raise TypeError(f"dropout: key must be a PRNG key array, got {type(key).__name__}")


def _rate(rate, dtype) -> jax.Array:
  """Validates ``rate`` and returns it as a scalar array of the statistics dtype."""
  wide = _checks.at_least_float32(dtype)
  if isinstance(rate, numbers.Real) and not isinstance(rate, bool):
    if not 0.0 <= float(rate) <= 1.0:
      raise ValueError(f"dropout: rate is the probability of dropping and must be in [0, 1], "
                       f"got {rate}")
    return jnp.asarray(rate, dtype=wide)
  if not isinstance(rate, (jax.Array, np.ndarray, np.generic)):
    raise TypeError(f"dropout: rate must be a float or a scalar float array, got "
                    f"{type(rate).__name__}")
  if rate.shape != () or not jnp.issubdtype(rate.dtype, jnp.floating):
    raise TypeError(
        f"dropout: rate must be a scalar float array, got {rate.dtype}{list(rate.shape)}")
  return jnp.asarray(rate).astype(wide)


def _apply(forward, x, key, rate, broadcast_dims):
  """Validation and mask sampling shared by the op and its twin, then ``forward``."""
  x = _checks.floating("dropout", "x", x)
  key = _typed_key(key)
  if isinstance(broadcast_dims, (str, bytes)) or not isinstance(broadcast_dims, Sequence):
    raise TypeError(f"dropout: broadcast_dims must be a sequence of axes, got {broadcast_dims!r}")
  dims = {_checks.axis_index("dropout", "broadcast_dims", d, x.ndim) for d in broadcast_dims}
  rate_arr = _rate(rate, x.dtype)
  if isinstance(rate, numbers.Real) and rate == 0:
    return x
  mask_shape = tuple(1 if i in dims else n for i, n in enumerate(x.shape))
  # Drawn in float32 whatever x's dtype: one key gives one mask in every precision. Laid out
  # as x where the types carry shardings, so each device draws only its own slice (threefry's
  # partitionable mode, JAX's default, draws the same bits for a slice as for the whole).
  keep = jax.random.bernoulli(key, (1.0 - rate_arr).astype(jnp.float32), mask_shape,
                              out_sharding=_sharding.spec_like(x, mask_shape))
  return forward(x, keep, rate_arr)


def dropout(x: jax.Array, key: jax.Array, *, rate, broadcast_dims=()) -> jax.Array:
  r"""Inverted dropout with a manual VJP.

  Each element is dropped with probability ``rate`` and the survivors are scaled by
  ``1 / (1 - rate)`` so that the expectation is unchanged:

  .. math::
    y = \frac{m \odot x}{1 - p}, \qquad m_i \sim \mathrm{Bernoulli}(1 - p)

  Args:
    x: float[...] of any shape.
    key: a typed key from ``jax.random.key``, or a raw key from ``jax.random.PRNGKey``:
      ``uint32[2]`` (threefry) or ``uint32[4]`` (``rbg``, ``unsafe_rbg``).
    rate: probability of DROPPING, ``0 <= rate <= 1`` (``rate=1`` drops everything: output
      and gradient 0, as PyTorch). A Python float is checked at trace time (``rate=0``
      returns ``x`` itself). A scalar float array may be traced, so one compiled function
      serves every rate; a traced rate outside ``[0, 1]`` gives NaN outputs (and NaN
      gradients for the elements it keeps). ``rate`` receives no gradient.
    broadcast_dims: axes along which one mask value is shared (as in Flax), e.g. ``(1, 2)``
      for channel dropout of an NHWC feature map.

  Returns:
    float[...] with the shape and dtype of ``x``.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> y = jlayers.dropout(jnp.ones(6), jax.random.key(0), rate=0.5)
    >>> sorted(set(y.tolist())) in ([0.0, 2.0], [2.0], [0.0])
    True
  """
  return _apply(_dropout, x, key, rate, broadcast_dims)


def _scale(rate_arr, dtype):
  """``1 / (1 − p)``, 0 at ``p = 1`` (everything dropped: no inf to multiply a zero), and NaN
  for a (traced) ``p`` outside ``[0, 1]``."""
  keep = 1.0 - rate_arr
  safe = jnp.where(keep > 0, keep, jnp.ones_like(keep))
  scale = jnp.where(keep > 0, 1.0 / safe, jnp.zeros_like(keep))
  valid = (rate_arr >= 0) & (rate_arr <= 1)
  return jnp.where(valid, scale, jnp.full_like(scale, jnp.nan)).astype(dtype)


def _forward(x, keep, rate_arr):
  """``(m ⊙ x) / (1 − p)``: every output NaN for a rate outside ``[0, 1]``."""
  return jnp.where(jnp.broadcast_to(keep, x.shape), x, jnp.zeros_like(x)) * _scale(rate_arr,
                                                                                    x.dtype)


@jax.custom_vjp
def _dropout(x, keep, rate_arr):
  return _forward(x, keep, rate_arr)


def _dropout_fwd(x, keep, rate_arr):
  """Saves the boolean keep mask (one byte per mask element, fewer with ``broadcast_dims``)
  and the scalar rate. Regenerating the mask from the key in the backward pass was measured
  not to save memory on CPU (XLA merges the two random-number computations)."""
  return _forward(x, keep, rate_arr), (keep, rate_arr)


def _dropout_bwd(res, g):
  r"""Backward of ``y = m ⊙ x / (1 - p)``.

  With the mask ``m`` fixed, ``y`` is linear and diagonal in ``x``:

  .. math::
    \frac{∂y_i}{∂x_j} = δ_{ij} \frac{m_i}{1 - p}
    \;\Rightarrow\; \frac{∂L}{∂x} = \frac{m ⊙ g}{1 - p}

  that is, ``∂L/∂X = ∂L/∂Y · M`` with the inverted-dropout scale. A mask
  shared along ``broadcast_dims`` is broadcast back to ``x``'s shape. The mask is a sample,
  not a function of ``x`` or ``p``, and ``p`` is treated as a constant (its cotangent is
  ``None``, i.e. zero), as is the key. At ``p = 1`` the scale is taken as 0 (nothing
  survives), so output and gradient are 0. A traced ``p`` outside ``[0, 1]`` has a NaN scale:
  the kept elements get NaN gradients and the dropped ones 0, as autodiff of the forward's
  ``(m ⊙ x) · scale`` gives.
  """
  keep, rate_arr = res
  dx = jnp.where(jnp.broadcast_to(keep, g.shape), g * _scale(rate_arr, g.dtype),
                 jnp.zeros_like(g))
  return dx, None, None


_dropout.defvjp(_dropout_fwd, _dropout_bwd)


def dropout_reference(x: jax.Array, key: jax.Array, *, rate, broadcast_dims=()) -> jax.Array:
  """Autodiff twin of :func:`dropout`: the same mask for the same key, no custom rule.

  ``rate`` is under ``stop_gradient``, matching the manual rule's zero cotangent for it.
  """
  return _apply(lambda x, keep, rate_arr: _forward(x, keep, jax.lax.stop_gradient(rate_arr)),
                x, key, rate, broadcast_dims)


dropout_op = _ops.declare("dropout", dropout, dropout_reference)
