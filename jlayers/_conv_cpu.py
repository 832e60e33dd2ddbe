r"""The convolution's weight gradient as a loop of patch products, the formulation for XLA:CPU.

:func:`jlayers.conv._conv2d_bwd` derives ``dW`` and evaluates it natively (XLA's
backward-filter convolution) on every platform but CPU; on CPU it calls :func:`weight_grad`
here, which evaluates the same sum

.. math::
  dW_{p,q,c,o} = \sum_n \sum_{i,j} \bar x_{n,\, s i + d p,\, s j + d q,\, c}\, G_{n,i,j,o}

as the product :math:`P^T G` of the patches :math:`P_{(n,i,j),(p,q,c)}` of the padded input
with the cotangent, batched over groups and accumulated over chunks of the batch whose patches
fit in cache (:func:`loop_chunk`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jlayers import _checks, _sharding


def loop_chunk(x, g, kernel, layout: str) -> int:
  """Images per step of the loop for ``x`` and the cotangent ``g`` (each device's share of
  the batch where it is split over devices); 0 where the loop does not apply."""
  xs = (1, 2) if layout == "NHWC" else (2, 3)
  channels = x.shape[3 if layout == "NHWC" else 1]
  per_image = (kernel[0] * kernel[1] * channels * g.shape[xs[0]] * g.shape[xs[1]]
               * x.dtype.itemsize)  # H'·W'·KH·KW·C per image
  parts = _sharding.split_axis(x, 0)[0]
  return _images_per_step(x.shape[0] // parts, per_image, x.size * x.dtype.itemsize)


# Bytes of patches per step of the loop: about half of a 4 MiB L2 cache.
_PATCH_BYTES = 2 << 20


def _images_per_step(batch: int, per_image: int, x_bytes: int) -> int:
  """Images per dW step: as many as fit the budget, spread evenly over the fewest steps (the
  last step overlaps the one before where they do not divide the batch); one image when its patches alone exceed the
  budget but not the size of ``x`` (the transposed copy the convolution would make); 0 (use
  the convolution) otherwise, and for an empty batch."""
  most = max(_PATCH_BYTES // max(per_image, 1), int(per_image <= x_bytes))
  if batch == 0 or most == 0:
    return 0
  steps = -(-batch // most)
  return -(-batch // steps)


def weight_grad(x, g, kernel, pads, chunk, config):
  """dW as ``Σ_chunks Pᵀ G`` with ``P`` the patches of the padded ``x`` (see the bwd).

  With the batch split over ``parts`` devices, ``x`` and ``G`` are viewed as
  ``[steps, parts, chunk, ...]``: the loop runs over the unsplit ``steps`` axis, ``parts`` is
  a batch dimension of the products, and the ``parts`` weight-sized accumulators are summed
  once at the end. When ``chunk`` does not divide a device's ``local`` images, step ``i``
  reads the chunk at ``min(i · chunk, local − chunk)`` instead (a slice inside the loop, no
  padded copy of x or G) and zeroes the cotangent of the images an earlier step has counted.
  """
  stride, _, dilation, groups, layout, _, precision, _ = config
  nchw = layout == "NCHW"
  c, o = x.shape[1 if nchw else 3], g.shape[1 if nchw else 3]
  out = g.shape[2:] if nchw else g.shape[1:3]
  span = [(k - 1) * s + 1 for k, s in zip(out, stride)]
  acc_dtype = _checks.at_least_float32(x.dtype)  # f16/bf16 sum in f32
  parts, names, explicit = _sharding.split_axis(x, 0)
  lead = (parts,) if parts > 1 else ()
  nl = len(lead)
  local = x.shape[0] // parts
  steps = -(-local // chunk)

  def per_device(a):
    """``[N, ...]`` as ``[*lead, local, ...]`` (free: the batch is split device-major)."""
    if not lead:
      return a
    rest = a.shape[1:]
    a = a.reshape(parts, local, *rest,
                  out_sharding=P(names, *(None,) * (len(rest) + 1)) if explicit else None)
    return _sharding.constrain(a, (names,))

  def batches(a):
    """``[N, ...]`` as the scanned ``[steps, *lead, chunk, ...]`` (``[N, ...]`` for unit
    chunks on one device: a unit chunk axis would make XLA copy x and G to another layout)."""
    a = per_device(a)
    if chunk == 1 and not lead:
      return a
    a = a.reshape(*lead, steps, chunk, *a.shape[nl + 1:])
    if lead:
      a = _sharding.constrain(jnp.moveaxis(a, 1, 0), (None, names))
    return a

  def chunk_at(a, i):
    """Step ``i``'s chunk of ``[*lead, local, ...]`` when ``chunk`` does not divide ``local``,
    and the weights (0 or 1) of its images: the last chunk overlaps the one before it."""
    start = jnp.minimum(i * chunk, local - chunk)
    counted = (start + lax.iota(jnp.int32, chunk) >= i * chunk).astype(a.dtype)
    return (lax.dynamic_slice_in_dim(a, start, chunk, axis=nl),
            counted.reshape((1,) * nl + (chunk,) + (1,) * (a.ndim - nl - 1)))

  def step(total, xg):
    if steps * chunk > local:
      (xc, _), (gc, counted) = chunk_at(xg[0], xg[2]), chunk_at(xg[1], xg[2])
      gc = gc * counted
    else:
      xc = xg[0].reshape(*lead, chunk, *x.shape[1:])
      gc = xg[1].reshape(*lead, chunk, *g.shape[1:])
    if nchw:
      to_nhwc = (*range(nl), nl, nl + 2, nl + 3, nl + 1)
      xc, gc = xc.transpose(to_nhwc), gc.transpose(to_nhwc)
    xc = lax.pad(xc, jnp.zeros((), x.dtype),
                 [(0, 0, 0)] * (nl + 1) + [(*pads[0], 0), (*pads[1], 0), (0, 0, 0)])
    taps = [lax.slice(xc, (0,) * (nl + 1) + (p * dilation[0], q * dilation[1], 0),
                      (*lead, chunk, p * dilation[0] + span[0], q * dilation[1] + span[1], c),
                      (1,) * (nl + 1) + (*stride, 1))
            for p in range(kernel[0]) for q in range(kernel[1])]
    patches = jnp.stack(taps, axis=nl + 3).reshape(*lead, chunk, *out, len(taps), groups,
                                                   c // groups)
    gc = gc.reshape(*lead, chunk, *out, groups, o // groups)
    contract = (nl, nl + 1, nl + 2)
    dims = ((contract, contract), ((*range(nl), nl + 4), (*range(nl), nl + 3)))
    return total + lax.dot_general(patches, gc, dims, precision=precision,
                                   preferred_element_type=acc_dtype), None

  shape = (*lead, groups, kernel[0] * kernel[1], c // groups, o // groups)
  if lead and explicit:
    total = jnp.zeros(shape, acc_dtype, out_sharding=P(names))
  else:
    total = _sharding.constrain(jnp.zeros(shape, acc_dtype), (names,) if lead else ())
  if steps * chunk > local:
    xl, gl = per_device(x), per_device(g)
    total, _ = lax.scan(lambda t, i: step(t, (xl, gl, i)), total,
                        jnp.arange(steps, dtype=jnp.int32))
  else:
    total, _ = lax.scan(step, total, (batches(x), batches(g)))
  if lead:
    total = jnp.sum(total, axis=0)
  dw = total.transpose(1, 2, 0, 3).reshape(*kernel, c // groups, o)  # HWIO
  return dw.transpose(3, 2, 0, 1) if nchw else dw
