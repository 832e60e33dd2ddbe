"""2-D max and average pooling with hand-derived backward passes (any window, stride, padding;
dilation for the maximum; PyTorch's ``ceil_mode``).

Two formulations of each rule, chosen by :func:`jax.lax.platform_dependent` when lowering (see
:func:`jlayers.formulation`):

* **CPU**: forwards reduce one strided slice of the input per window offset; backwards put
  output-shaped arrays back with ``lax.pad`` and reshapes (no scatter, no select-and-scatter).
  Max pooling saves one byte per output. Windows of more than ``MAX_VIEWS`` offsets (global
  pooling) take the native formulation on CPU too: one slice per offset grows with the window.
* **native** (GPU, TPU): ``lax.reduce_window`` forwards, and the backwards XLA's vendors tune:
  select-and-scatter for the maximum, a window sum of the dilated cotangent for the average.
  Select-and-scatter has no window dilation: a dilated maximum is scattered per phase, as
  undilated windows over strided slices of the input
  (:func:`jlayers._pool_windows.max_by_phases`).

``ceil_mode`` is extra high padding (``ceil_extra`` of :mod:`jlayers._pool_windows`): minus
infinity for the maximum, where it never wins, and counted in no average's divisor. The window
arithmetic (configuration, views, placements, divisors) lives in :mod:`jlayers._pool_windows`.

On GPUs and TPUs the rules take the native formulation (:mod:`jlayers._platform`):
``reduce_window`` and, for the maximum's backward, ``select_and_scatter``, which XLA compiles
to kernels of their own with the elementwise work fused in; no Pallas kernel is needed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlayers import _ops, _platform
from jlayers import _pool_windows as _windows


def max_pool2d(x: jax.Array, window, *, stride=None, padding="VALID", dilation=1,
               ceil_mode: bool = False, layout: str = "NHWC") -> jax.Array:
  r"""2-D max pooling, with a manual VJP.

  With ``x`` padded by :math:`-\infty` to :math:`\bar x`, window :math:`(k_h, k_w)`, stride
  :math:`(s_h, s_w)` and dilation :math:`(d_h, d_w)`:

  .. math::
    y_{n,i,j,c} = \max_{0 \le p < k_h,\; 0 \le q < k_w}
      \bar x_{n,\, s_h i + d_h p,\, s_w j + d_w q,\, c}

  The gradient of each output goes to the FIRST maximum of its window in row-major
  ``(p, q)`` order, as XLA's select-and-scatter does (ties are not split, nor counted twice).

  Args:
    x: float[N, H, W, C] (``layout="NHWC"``) or float[N, C, H, W] (``"NCHW"``).
    window: int or (int, int), positive: :math:`(k_h, k_w)`.
    stride: ``None`` (the window: no overlap), int or (int, int), positive.
    padding: ``"VALID"``, ``"SAME"`` (as in :func:`jax.lax.reduce_window`), an int or
      ``((lo_h, hi_h), (lo_w, hi_w))``; non-negative, smaller than the (dilated) window span
      :math:`d (k - 1) + 1` on every side.
    dilation: int or (int, int), positive: the step :math:`(d_h, d_w)` between window elements.
      Every window must still cover an input element.
    ceil_mode: round the output size up, as PyTorch does: the last window may reach past the
      padding (minus infinity there too) but must start inside the input or its low padding.
    layout: ``"NHWC"`` or ``"NCHW"``.

  Returns:
    float[N, H', W', C] (or float[N, C, H', W']) in the dtype of ``x``, with
    :math:`H' = \lfloor (H + lo_h + hi_h - d_h (k_h - 1) - 1) / s_h \rfloor + 1`; with
    ``ceil_mode`` the ceiling instead, less one if :math:`(H' - 1) s_h \ge H + lo_h`.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.max_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 5.,  7.],
           [13., 15.]], dtype=float32)
    >>> jlayers.max_pool2d(jnp.arange(25.0).reshape(1, 5, 5, 1), 2, ceil_mode=True)[0, :, :, 0]
    Array([[ 6.,  8.,  9.],
           [16., 18., 19.],
           [21., 23., 24.]], dtype=float32)
    >>> x = jnp.array([[4., 0., 1., 0.], [0., 0., 0., 0.], [2., 0., 3., 5.], [0., 6., 0., 0.]])
    >>> jlayers.max_pool2d(x.reshape(1, 4, 4, 1), 2, stride=1, dilation=2)[0, :, :, 0]
    Array([[4., 5.],
           [0., 6.]], dtype=float32)
  """
  x, config = _windows.validate("max_pool2d", x, window, stride, padding, layout, dilation=dilation,
                        ceil_mode=ceil_mode)
  native = functools.partial(_max_pool2d_native, config)
  if len(config.offsets) > _windows.MAX_VIEWS:
    return native(x)
  return _platform.by_platform(x, cpu=functools.partial(_max_pool2d, config), native=native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool2d(config, x):
  return functools.reduce(jnp.maximum, _windows.views(config, x, -jnp.inf))


def _max_pool2d_fwd(config, x):
  r"""Saves :math:`\kappa`, the number of the first arg-max offset of every window, as int8.

  The backward must know which element of each window won: :math:`\log_2(k_h k_w)` bits, one
  byte per OUTPUT element (at most ``MAX_VIEWS`` < 128 offsets); autodiff keeps ``x``, a
  float per INPUT element. The padded input is built once (XLA fuses this into the backward,
  where padding per view made it keep every view).
  """
  xp = lax.pad(x, jnp.full((), -jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in config.pads])
  views = _windows.views(config._replace(shape=xp.shape, pads=((0, 0),) * 4), xp, -jnp.inf)
  y = functools.reduce(jnp.maximum, views)
  kappa = jnp.zeros_like(y, jnp.int8)
  for k in range(len(views) - 1, -1, -1):
    kappa = jnp.where(views[k] == y, jnp.full((), k, kappa.dtype), kappa)
  return y, kappa


def _max_pool2d_bwd(config, kappa, g):
  r"""Backward of max pooling for the cotangent ``g``.

  Write a padded-input position as :math:`s j + o` with :math:`j` an output position and
  :math:`o` a window offset. Locally :math:`y_j = \bar x_{s j + o_{\kappa(j)}}`, so

  .. math::
    \frac{∂y_j}{∂\bar x_i} = [\, i = s j + o_{\kappa(j)} \,]
    \;\Rightarrow\;
    \frac{∂L}{∂\bar x_i} = \sum_j g_j \, [\, i = s j + o_{\kappa(j)} \,]
      = \sum_k \sum_j [\kappa(j) = k]\, g_j \, [\, i = s j + o_k \,]

  At a tie, :math:`\kappa(j)` is the first maximum: that is the convention. For a fixed
  :math:`k` the inner sum puts :math:`[\kappa = k]\, g` at the positions :math:`s j + o_k`;
  cropping the padding (:math:`-\infty`, it never wins) gives :math:`∂L/∂x`: that is
  ``place_offsets``, or ``place_blocks`` on the blocks :math:`[\kappa(j) = k]\, g_j`
  for disjoint windows. The rule is linear in ``g`` and :math:`\kappa` is piecewise constant
  in ``x``: the derivative in ``x`` is 0 almost everywhere, as autodiff's (second order).
  """
  zero, size, split = jnp.zeros((), g.dtype), len(config.offsets), _windows.blocked(config, g.shape,
                                                                          (1,) * 4)
  if config.disjoint:
    ks = jnp.asarray(np.arange(size).reshape(_windows.blocked(config, (1,) * 4, config.window)),
                     kappa.dtype)
    dx = _windows.place_blocks(config, jnp.where(kappa.reshape(split) == ks, g.reshape(split),
                                                 zero))
  else:
    dx = _windows.place_offsets(config, [jnp.where(kappa == jnp.full((), k, kappa.dtype), g, zero)
                                 for k in range(size)])
  return (dx.astype(config.dtype),)


_max_pool2d.defvjp(_max_pool2d_fwd, _max_pool2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _max_pool2d_native(config, x):
  return _windows.reduce_window(config, x, -np.inf, lax.max)


def _max_pool2d_native_fwd(config, x):
  """Saves ``x`` (an input): select-and-scatter finds each window's first maximum in it."""
  return _windows.reduce_window(config, x, -np.inf, lax.max), x


def _max_pool2d_native_bwd(config, x, g):
  r"""The rule of :func:`_max_pool2d_bwd`, evaluated by XLA's select-and-scatter.

  With :math:`\kappa(j)` the first maximum of window :math:`j` (row-major offsets):

  .. math::
    \frac{∂L}{∂\bar x_i} = \sum_j g_j \, [\, i = s j + o_{\kappa(j)} \,]

  Select-and-scatter scans each window of ``x`` in row-major order, keeps the first element
  that no later one exceeds (``ge``) and adds :math:`g_j` there: exactly this sum, the same
  tie convention. JAX emits it as the transpose of ``reduce_window`` max, which is what this
  calls; the padding (:math:`-\infty`) never wins. Select-and-scatter has no window dilation:
  dilated windows are scattered per phase, by the transpose of
  :func:`jlayers._pool_windows.max_by_phases`, whose undilated windows hold the same elements
  in the same order (so the same first maximum).
  """
  undilated = all(d == 1 for d in config.dilation)
  if undilated:
    forward = functools.partial(_windows.reduce_window, config, init=-np.inf, op=lax.max)
  else:
    forward = functools.partial(_windows.max_by_phases, config)
  return jax.vjp(forward, x)[1](g)


_max_pool2d_native.defvjp(_max_pool2d_native_fwd, _max_pool2d_native_bwd)


def max_pool2d_reference(x: jax.Array, window, *, stride=None, padding="VALID", dilation=1,
                         ceil_mode: bool = False, layout: str = "NHWC") -> jax.Array:
  """Autodiff twin of :func:`max_pool2d`: a ``lax.reduce_window`` max, no custom rule.

  JAX has no VJP of ``reduce_window`` max with a dilated window: dilated windows are a running
  maximum over one strided slice of the padded input per window offset, in row-major order,
  that only a strictly larger element replaces (so the first maximum wins, as in the op)."""
  x, config = _windows.validate("max_pool2d", x, window, stride, padding, layout, dilation=dilation,
                        ceil_mode=ceil_mode)
  if all(d == 1 for d in config.dilation):
    return _windows.reduce_window(config, x, -np.inf, lax.max)
  xp = jnp.pad(x, config.pads, constant_values=-jnp.inf)
  y = None
  for o in config.offsets:
    view = lax.slice(xp, o, [oi + s * (m - 1) + 1 for oi, s, m in zip(
        o, config.strides, config.out_shape)], config.strides)
    y = view if y is None else jnp.where(view > y, view, y)
  return y


def avg_pool2d(x: jax.Array, window, *, stride=None, padding="VALID", ceil_mode: bool = False,
               layout: str = "NHWC", count_include_pad: bool = True) -> jax.Array:
  r"""2-D average pooling, with a manual VJP.

  With ``x`` zero-padded to :math:`\bar x`, window :math:`(k_h, k_w)` and stride
  :math:`(s_h, s_w)`:

  .. math::
    y_{n,i,j,c} = \frac{1}{c_{ij}} \sum_{0 \le p < k_h,\; 0 \le q < k_w}
      \bar x_{n,\, s_h i + p,\, s_w j + q,\, c}

  where :math:`c_{ij}` counts the elements of window :math:`(i, j)` in the input and its
  padding if ``count_include_pad`` (:math:`k_h k_w` unless ``ceil_mode`` takes the last window
  past the padding), else those in the input only, as PyTorch counts.

  Args:
    x: float[N, H, W, C] (``layout="NHWC"``) or float[N, C, H, W] (``"NCHW"``).
    window, stride, padding, ceil_mode, layout: as in :func:`max_pool2d` (the padding is zeros
      here; no dilation).
    count_include_pad: whether padding elements count in the divisor (never those that
      ``ceil_mode`` adds past the padding).

  Returns:
    float[N, H', W', C] (or float[N, C, H', W']) in the dtype of ``x``, as for max pooling.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.avg_pool2d(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)[0, :, :, 0]
    Array([[ 2.5,  4.5],
           [10.5, 12.5]], dtype=float32)
    >>> jlayers.avg_pool2d(jnp.arange(9.0).reshape(1, 3, 3, 1), 2, ceil_mode=True)[0, :, :, 0]
    Array([[2. , 3.5],
           [6.5, 8. ]], dtype=float32)
  """
  x, config = _windows.validate("avg_pool2d", x, window, stride, padding, layout, count_include_pad,
                        ceil_mode=ceil_mode)
  native = functools.partial(_avg_pool2d_native, config)
  if len(config.offsets) > _windows.MAX_VIEWS:
    return native(x)
  return _platform.by_platform(x, cpu=functools.partial(_avg_pool2d, config), native=native)


def _avg_forward(config: _windows.Config, x):
  total = functools.reduce(jnp.add, _windows.views(config, x, 0.0))
  return total / jnp.asarray(_windows.counts(config), x.dtype)


_avg_pool2d = jax.custom_vjp(_avg_forward, nondiff_argnums=(0,))


def _avg_pool2d_fwd(config, x):
  """Saves nothing: ``y`` is linear in ``x``, with static coefficients (the divisors)."""
  return _avg_forward(config, x), None


def _avg_pool2d_bwd(config, _, g):
  r"""Backward of average pooling for the cotangent ``g``.

  With padded-input positions written :math:`s j + o_k` as for max pooling,
  :math:`y_j = c_j^{-1} \sum_k \bar x_{s j + o_k}`, so

  .. math::
    \frac{∂y_j}{∂\bar x_i} = c_j^{-1} \sum_k [\, i = s j + o_k \,]
    \;\Rightarrow\;
    \frac{∂L}{∂\bar x_i} = \sum_k \sum_j \frac{g_j}{c_j} \, [\, i = s j + o_k \,]

  Every offset puts the same :math:`g / c` at the positions :math:`s j + o_k`: each input
  element gets :math:`g_j / c_j` from every window holding it, and cropping the padding gives
  :math:`∂L/∂x` (``place_offsets``, or for disjoint windows ``place_blocks`` on
  :math:`g / c` broadcast over the offset axes). Linear in ``g``, independent of ``x``.
  """
  scaled = g / jnp.asarray(_windows.counts(config), g.dtype)
  if config.disjoint:
    dx = _windows.place_blocks(config, scaled.reshape(_windows.blocked(config, g.shape, (1,) * 4)))
  else:
    dx = _windows.place_offsets(config, [scaled] * len(config.offsets))
  return (dx.astype(config.dtype),)


_avg_pool2d.defvjp(_avg_pool2d_fwd, _avg_pool2d_bwd)


def _avg_native_forward(config: _windows.Config, x):
  total = _windows.reduce_window(config, x, 0, lax.add)
  return total / jnp.asarray(_windows.counts(config), x.dtype)


_avg_pool2d_native = jax.custom_vjp(_avg_native_forward, nondiff_argnums=(0,))


def _avg_pool2d_native_fwd(config, x):
  """Saves nothing, as :func:`_avg_pool2d_fwd`."""
  return _avg_native_forward(config, x), None


def _avg_pool2d_native_bwd(config, _, g):
  r"""The rule of :func:`_avg_pool2d_bwd`,

  .. math::
    \frac{∂L}{∂\bar x_i} = \sum_k \sum_j \frac{g_j}{c_j} \, [\, i = s j + o_k \,]
      = \sum_{o < k} \Big(\frac{g}{c}\Big)^s_{i - o}

  evaluated as one stride-1 window sum of :math:`g / c` dilated by the stride
  (:func:`jlayers._pool_windows.window_sum_transpose`).
  """
  scaled = g / jnp.asarray(_windows.counts(config), g.dtype)
  return (_windows.window_sum_transpose(config, scaled).astype(config.dtype),)


_avg_pool2d_native.defvjp(_avg_pool2d_native_fwd, _avg_pool2d_native_bwd)


def avg_pool2d_reference(x: jax.Array, window, *, stride=None, padding="VALID",
                         ceil_mode: bool = False, layout: str = "NHWC",
                         count_include_pad: bool = True) -> jax.Array:
  """Autodiff twin of :func:`avg_pool2d`: window sums over divisors, no custom rule. The
  divisors are ``reduce_window`` sums over padded ones, not the manual op's closed form: ones
  over the input and its padding (``count_include_pad``) or over the input alone, padded with
  zeros for the rest (``ceil_mode``'s extra padding included)."""
  x, config = _windows.validate("avg_pool2d", x, window, stride, padding, layout, count_include_pad,
                        ceil_mode=ceil_mode)
  total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, config.window, config.strides,
                            config.pads)
  if count_include_pad and not any(config.ceil_extra):
    return total / jnp.asarray(np.prod(config.window), x.dtype)
  if count_include_pad:
    shape = [n + lo + hi - e for n, (lo, hi), e in zip(x.shape, config.pads, config.ceil_extra)]
    pads = [(0, e) for e in config.ceil_extra]
  else:
    shape, pads = list(x.shape), config.pads
  ones = jnp.ones([n if a in config.spatial else 1 for a, n in enumerate(shape)], x.dtype)
  return total / lax.reduce_window(ones, np.array(0, x.dtype), lax.add, config.window,
                                   config.strides, [p if a in config.spatial else (0, 0)
                                                    for a, p in enumerate(pads)])


max_pool2d_op = _ops.declare("max_pool2d", max_pool2d, max_pool2d_reference)
avg_pool2d_op = _ops.declare("avg_pool2d", avg_pool2d, avg_pool2d_reference)
