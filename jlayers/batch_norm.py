"""Batch normalisation (training and inference) with hand-derived backward passes.

On GPUs and TPUs the rules stay in XLA, with no Pallas kernel: value and gradient lower
to 4 reductions over the batch axes (2 for inference) and elementwise work, which XLA's
reduction fusion evaluates a kernel per reduction with the elementwise work fused in; the
reductions run along the batch and spatial axes, column reductions that XLA tiles itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jlayers import _checks, _ops, _sharding, _standardize


def _config(op, x, axis, eps, axis_name, **vectors):
  """Validates everything static; returns ``x``, the normalised axis and the vectors, each
  laid out as ``x``'s feature axis on a mesh (a vector split otherwise, as FSDP splits it, is
  gathered; the gradient of the reshard lays its gradient out back)."""
  x = _checks.floating(op, "x", x)
  _checks.min_rank(op, "x", x, 1)
  axis = _checks.axis_index(op, "axis", axis, x.ndim)
  eps = _checks.positive_float(op, "eps", eps)
  _checks.bound_axis_name(op, axis_name)
  out = {}
  for name, v in vectors.items():
    v = _checks.floating(op, name, v)
    _checks.shape(op, name, v, (x.shape[axis],), f"(features,) matching x's axis {axis}")
    out[name] = _sharding.reshard_like(v, x, axes=(axis,))
  return x, axis, eps, out


def _per_channel(v, ndim, axis):
  """``v[C]`` reshaped to broadcast against a rank-``ndim`` array along ``axis``."""
  return v.reshape(tuple(-1 if i == axis else 1 for i in range(ndim)))


# --------------------------------------------------------------------------------------------
# Training mode.


def batch_norm(x: jax.Array, scale: jax.Array, offset: jax.Array, *, axis: int = -1,
               eps: float = 1e-5, axis_name=None):
  r"""Batch normalisation with batch statistics, with a manual VJP.

  .. math::
    μ = \frac1N Σ x, \quad σ^2 = \frac1N Σ (x - μ)^2, \quad
    \hat x = (x - μ) / \sqrt{σ^2 + ε}, \quad y = γ \hat x + β

  where the sums run over every axis except ``axis`` (``N`` elements per feature) and, with
  ``axis_name``, over the devices of that mapped axis too (synchronised batch norm).

  Args:
    x: float[..., C, ...] with the features on ``axis`` (default last: NHWC, (N, C)).
    scale: float[C] (``γ``), any float dtype.
    offset: float[C] (``β``), any float dtype.
    axis: the feature axis.
    eps: positive constant added to the variance.
    axis_name: optional name (or tuple of names) of a ``shard_map``, ``pmap`` or ``vmap`` axis
      to reduce the statistics over.

  Returns:
    ``(y, batch_mean, batch_var)``: ``y`` float[x.shape] in ``x``'s dtype; ``batch_mean`` and
    ``batch_var`` float[C] (biased variance) in float32 for bf16/f16 ``x``, else ``x``'s dtype.
    Statistics are computed in at least float32; the variance is two-pass and never negative.
    Gradients flow through all three outputs (with ``axis_name``, those of the statistics
    by autodiff: see the comment in the body).

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> y, m, v = jlayers.batch_norm(jnp.array([[1.0], [3.0]]), jnp.ones(1), jnp.zeros(1))
    >>> y.ravel().round(3).tolist(), m.tolist(), v.tolist()
    ([-1.0, 1.0], [2.0], [1.0])
  """
  x, axis, eps, v = _config("batch_norm", x, axis, eps, axis_name, scale=scale, offset=offset)
  y, mean, var = _batch_norm(axis, eps, axis_name, x, _sharding.varying(v["scale"], axis_name),
                             _sharding.varying(v["offset"], axis_name))
  if axis_name is not None:
    # Where the cotangents of replicated statistics arrive depends on the mapping: whole under
    # shard_map, one share per device under pmap and vmap(grad), pre-summed under grad(vmap).
    # JAX's transpose of psum knows which; a custom rule cannot see it. So with axis_name the
    # returned statistics are differentiated by JAX, and y keeps the closed-form rule (XLA
    # merges the repeated reductions under jit).
    mean, var = _statistics(x, axis, axis_name)[:2]
  return y, mean, var


def _reduced(ndim, axis):
  return tuple(i for i in range(ndim) if i != axis)


def _statistics(x, axis, axis_name):
  """Per-feature mean and (two-pass, never negative) variance in at least float32, the element
  count and ``x − μ``, over every axis but ``axis`` and the devices of ``axis_name``."""
  xc = x.astype(_checks.at_least_float32(x.dtype))
  mean, var, n, centred = _standardize.moments(xc, _reduced(x.ndim, axis), axis_name=axis_name)
  c = x.shape[axis]
  return mean.reshape(c), var.reshape(c), n, centred


def _train_forward(axis, eps, axis_name, x, scale, offset):
  cdt = _checks.at_least_float32(x.dtype)
  mean, var, n, centred = _statistics(x, axis, axis_name)
  inv = jax.lax.rsqrt(var + eps)
  xhat = centred * _per_channel(inv, x.ndim, axis)
  y = xhat * _per_channel(scale.astype(cdt), x.ndim, axis) + _per_channel(
      offset.astype(cdt), x.ndim, axis)
  return (y.astype(x.dtype), mean, var), xhat, inv, n


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _batch_norm(axis, eps, axis_name, x, scale, offset):
  return _train_forward(axis, eps, axis_name, x, scale, offset)[0]


def _batch_norm_fwd(axis, eps, axis_name, x, scale, offset):
  """Saves ``x`` (an input: no memory of the rule's own), the per-feature ``μ`` and
  ``inv = 1/√(σ²+ε)``, and ``γ``.

  The closed-form backward needs ``x̂ = (x − μ)·inv`` and ``inv``: ``x`` and ``μ`` enter only
  through ``x̂``, ``σ`` only through ``inv``. ``x̂`` is recomputed in the backward's one
  elementwise pass, in at least float32: saving it would keep a second array of ``x``'s size
  (and, rounded to a half-precision ``x``'s dtype, lose the gradient of the returned variance
  where ``inv`` is tiny). ``β`` is kept only for its dtype (a per-feature vector), and the
  element count ``N`` (over all devices with ``axis_name``) so the backward needs no collective
  for it. ``μ`` and ``inv`` are differentiable functions of ``x``: second order works.
  """
  out, _, inv, n = _train_forward(axis, eps, axis_name, x, scale, offset)
  return out, (x, out[1], inv, scale, offset, n)


def _batch_norm_bwd(axis, eps, axis_name, res, cotangents):
  r"""Closed-form backward of batch normalisation.

  Write ``g = ∂L/∂y`` and let sums run over the ``N`` elements of one feature. ``x̂`` is
  the standardisation every normalisation shares, whose backward is derived once in
  :func:`jlayers._standardize.standardized_grad`: its Jacobian within a feature is

  .. math::
    \frac{∂\hat x_j}{∂x_i} = inv \Big(δ_{ij} - \frac1N - \frac{\hat x_i \hat x_j}{N}\Big)

  and with ``ĝ = ∂L/∂x̂ = γ g``, ``dx = inv (ĝ − mean ĝ − x̂ mean(ĝ x̂))``. Here ``γ`` is
  constant over a feature's elements, so the two sums factor out of it as ``γ dβ`` and
  ``γ dγ``, the same reductions that give the parameter gradients:

  .. math::
    dβ = Σ_j g_j, \qquad dγ = Σ_j g_j \hat x_j, \qquad
    dx_i = \frac{γ \, inv}{N} \big(N g_i - dβ - \hat x_i \, dγ\big)

  Keeping only the diagonal ``j = i`` of this sum (``∂L/∂x_i = g_i ∂y_i/∂x_i``), a common
  slip, drops the ``−dβ/N`` and ``−x̂_i dγ/N`` couplings through ``μ`` and ``σ`` and disagrees
  with autodiff (see the tests).

  The statistics are outputs too. With cotangents ``g_μ`` and ``g_{σ²}`` (without
  ``axis_name``; with it, JAX differentiates the returned statistics, see :func:`batch_norm`):
  ``∂μ/∂x_i = 1/N`` and ``∂σ²/∂x_i = 2(x_i − μ)/N = 2 \hat x_i /(inv·N)``, so

  .. math::
    dx_i \mathrel{+}= \frac{g_μ}{N} + \frac{2 g_{σ^2} \hat x_i}{inv \, N}

  With ``axis_name`` the sums run over all devices (``N`` is the global count), and each
  device's ``γ`` may differ (``vmap`` with a batched scale): element ``j`` of device ``d(j)``
  has ``∂y_j/∂\hat x_j = γ_{d(j)}``, so the sums inside ``dx`` are of ``γ g``:

  .. math::
    dx_i = \frac{inv}{N} \Big(N γ_{d(i)} g_i - \sum_j γ_{d(j)} g_j
      - \hat x_i \sum_j γ_{d(j)} g_j \hat x_j\Big)

  (the same as above when ``γ`` is one vector). Each device adds ``γ · Σ_local g`` and
  ``γ · Σ_local g x̂`` with ``psum``. The returned ``dγ, dβ`` are this device's share, as
  autodiff of a ``psum`` gives (a parameter replicated across ``shard_map`` enters as a
  per-device value, so JAX sums the shares). Work is in at least float32, and each cotangent
  is cast to its input's dtype.
  """
  x, mean, inv, scale, offset, n = res
  gy, gmean, gvar = cotangents
  cdt = inv.dtype
  pc = functools.partial(_per_channel, ndim=x.ndim, axis=axis)
  xhat = (x.astype(cdt) - pc(mean)) * pc(inv)
  g = gy.astype(cdt)
  red = _reduced(g.ndim, axis)
  dbeta_local = jnp.sum(g, axis=red)
  dgamma_local = jnp.sum(g * xhat, axis=red)
  gamma = scale.astype(cdt)
  # γ is constant over each reduced set, so the closed form's sums of ĝ = γ g factor into
  # γ dβ and γ dγ (added over devices, whose γ may differ, with axis_name).
  sums = (gamma * dbeta_local, gamma * dgamma_local)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  dx = _standardize.standardized_grad(pc(gamma) * g, xhat, pc(inv), n,
                                      sums=tuple(map(pc, sums)))
  if axis_name is None:  # with axis_name the statistics are differentiated outside this rule
    dx = dx + pc(gmean.astype(cdt) / n) + xhat * pc(2 * gvar.astype(cdt) / (inv * n))
  return (dx.astype(gy.dtype), dgamma_local.astype(scale.dtype),
          dbeta_local.astype(offset.dtype))


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_reference(x: jax.Array, scale: jax.Array, offset: jax.Array, *, axis: int = -1,
                         eps: float = 1e-5, axis_name=None):
  """Autodiff twin of :func:`batch_norm`: the same forward, differentiated by JAX."""
  x, axis, eps, v = _config("batch_norm", x, axis, eps, axis_name, scale=scale, offset=offset)
  return _train_forward(axis, eps, axis_name, x, v["scale"], v["offset"])[0]


# --------------------------------------------------------------------------------------------
# Inference mode (given statistics).


def batch_norm_inference(x: jax.Array, scale: jax.Array, offset: jax.Array, mean: jax.Array,
                         var: jax.Array, *, axis: int = -1, eps: float = 1e-5) -> jax.Array:
  r"""Batch normalisation with given (running) statistics, with a manual VJP.

  .. math::
    y = γ \, (x - m) / \sqrt{v + ε} + β

  Args:
    x: float[..., C, ...] with the features on ``axis``.
    scale, offset: float[C], ``γ`` and ``β``.
    mean, var: float[C], the statistics to normalise with (``var >= 0``).
    axis: the feature axis.
    eps: positive constant added to the variance.

  Returns:
    float[x.shape] in ``x``'s dtype (computed in at least float32). Every array argument gets
    a gradient, so statistics can be fine-tuned too.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> one = jnp.ones(1)
    >>> y = jlayers.batch_norm_inference(jnp.array([[3.0]]), one, one, one, 4 * one, eps=1e-12)
    >>> y.round(3).tolist()
    [[2.0]]
  """
  x, axis, eps, v = _config("batch_norm_inference", x, axis, eps, None, scale=scale,
                            offset=offset, mean=mean, var=var)
  return _batch_norm_inference(axis, eps, x, v["scale"], v["offset"], v["mean"], v["var"])


def _inference_forward(axis, eps, x, scale, offset, mean, var):
  cdt = _checks.at_least_float32(x.dtype)
  pc = functools.partial(_per_channel, ndim=x.ndim, axis=axis)
  inv = jax.lax.rsqrt(var.astype(cdt) + eps)
  xhat = (x.astype(cdt) - pc(mean.astype(cdt))) * pc(inv)
  y = xhat * pc(scale.astype(cdt)) + pc(offset.astype(cdt))
  return y.astype(x.dtype), xhat, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _batch_norm_inference(axis, eps, x, scale, offset, mean, var):
  return _inference_forward(axis, eps, x, scale, offset, mean, var)[0]


def _batch_norm_inference_fwd(axis, eps, x, scale, offset, mean, var):
  """Saves ``x`` and the four per-feature inputs (no memory of the rule's own) and the
  per-feature ``inv``; ``x̂ = (x − m)·inv`` is recomputed in the backward, in at least float32,
  as in training mode."""
  y, _, inv = _inference_forward(axis, eps, x, scale, offset, mean, var)
  return y, (x, inv, scale, offset, mean, var)


def _batch_norm_inference_bwd(axis, eps, res, g):
  r"""Backward of ``y = γ x̂ + β`` with ``x̂ = (x − m)·inv`` and ``inv = (v + ε)^{-1/2}``.

  Here ``m`` and ``v`` are inputs, not functions of ``x``, so the Jacobian in ``x`` is
  diagonal. With ``dγ = Σ g x̂`` and ``∂inv/∂v = −inv³/2``, ``∂x̂/∂v = −x̂ inv²/2``:

  .. math::
    dx = γ\,inv\,g, \quad dβ = Σ g, \quad dγ = Σ g \hat x, \quad
    dm = -γ\,inv\,Σ g, \quad dv = -\tfrac12 γ\,inv^2\,Σ g \hat x
  """
  x, inv, scale, offset, mean, var = res
  cdt = inv.dtype
  pc = functools.partial(_per_channel, ndim=x.ndim, axis=axis)
  xhat = (x.astype(cdt) - pc(mean.astype(cdt))) * pc(inv)
  gc = g.astype(cdt)
  red = tuple(i for i in range(g.ndim) if i != axis)
  dbeta = jnp.sum(gc, axis=red)
  dgamma = jnp.sum(gc * xhat, axis=red)
  gamma_inv = scale.astype(cdt) * inv
  dx = gc * _per_channel(gamma_inv, g.ndim, axis)
  dmean = -gamma_inv * dbeta
  dvar = -0.5 * gamma_inv * inv * dgamma
  return (dx.astype(g.dtype), dgamma.astype(scale.dtype), dbeta.astype(offset.dtype),
          dmean.astype(mean.dtype), dvar.astype(var.dtype))


_batch_norm_inference.defvjp(_batch_norm_inference_fwd, _batch_norm_inference_bwd)


def batch_norm_inference_reference(x: jax.Array, scale: jax.Array, offset: jax.Array,
                                   mean: jax.Array, var: jax.Array, *, axis: int = -1,
                                   eps: float = 1e-5) -> jax.Array:
  """Autodiff twin of :func:`batch_norm_inference`."""
  x, axis, eps, v = _config("batch_norm_inference", x, axis, eps, None, scale=scale,
                            offset=offset, mean=mean, var=var)
  return _inference_forward(axis, eps, x, v["scale"], v["offset"], v["mean"], v["var"])[0]


batch_norm_op = _ops.declare("batch_norm", batch_norm, batch_norm_reference)
batch_norm_inference_op = _ops.declare("batch_norm_inference", batch_norm_inference,
                                       batch_norm_inference_reference)
