"""2-D convolution with a hand-derived backward pass (any stride, padding, dilation, groups).

On GPUs and TPUs the rule takes the native formulation (:mod:`jlayers._platform`): three
convolutions (forward, input gradient, weight gradient), which XLA hands to cuDNN or the
TPU's convolution emitter; no Pallas kernel would beat those.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jlayers import _checks, _conv_cpu, _ops, _platform, _sharding

_OP = "conv2d"
# (x, w, y) dimension numbers of the forward, and where the spatial axes of x and w sit.
_DNUMS = {"NHWC": ("NHWC", "HWIO", "NHWC"), "NCHW": ("NCHW", "OIHW", "NCHW")}
_X_SPATIAL = {"NHWC": (1, 2), "NCHW": (2, 3)}
_W_SPATIAL = {"NHWC": (0, 1), "NCHW": (2, 3)}
_W_NAMES = {"NHWC": "(H, W, in/groups, out)", "NCHW": "(out, in/groups, H, W)"}
_X_NAMES = {"NHWC": "(N, H, W, C)", "NCHW": "(N, C, H, W)"}


class _Config(NamedTuple):
  """Normalised static configuration (hashable; goes in ``nondiff_argnums``)."""

  stride: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  dilation: tuple[int, int]
  groups: int
  layout: str
  bias: Any  # the bias dtype, None without a bias
  precision: Any = None
  bias_layout: Any = None  # b's sharding where the types carry one (db is laid out so)


def _validate(x, w, b, stride, padding, dilation, groups, layout, precision):
  x = _checks.floating(_OP, "x", x)
  w = _checks.floating(_OP, "w", w)
  layout = _checks.layout(_OP, layout)
  _checks.rank(_OP, "x", x, 4, _X_NAMES[layout])
  _checks.rank(_OP, "w", w, 4, _W_NAMES[layout])
  stride = _checks.positive_ints(_OP, "stride", stride, 2)
  dilation = _checks.positive_ints(_OP, "dilation", dilation, 2)
  groups = _checks.positive_int(_OP, "groups", groups)
  c_in = x.shape[-1] if layout == "NHWC" else x.shape[1]
  w_in, c_out = (w.shape[2], w.shape[3]) if layout == "NHWC" else (w.shape[1], w.shape[0])
  if c_in % groups or c_out % groups:
    raise ValueError(f"{_OP}: groups={groups} must divide the input channels ({c_in}) and the "
                     f"output channels ({c_out})")
  if w_in * groups != c_in:
    raise ValueError(f"{_OP}: x has {c_in} channels but w expects in/groups * groups = "
                     f"{w_in} * {groups} = {w_in * groups}; got x {tuple(x.shape)} and w "
                     f"{tuple(w.shape)}")
  if b is not None:
    b = _checks.floating(_OP, "b", b)
    _checks.shape(_OP, "b", b, (c_out,), "(out,)")
  size = tuple(x.shape[a] for a in _X_SPATIAL[layout])
  if any(w.shape[a] == 0 for a in _W_SPATIAL[layout]):
    raise ValueError(f"{_OP}: w's window {tuple(w.shape[a] for a in _W_SPATIAL[layout])} "
                     f"must be at least 1 × 1 (w {_W_NAMES[layout]} = {tuple(w.shape)})")
  k_eff = tuple((w.shape[a] - 1) * d + 1 for a, d in zip(_W_SPATIAL[layout], dilation))
  pads = _checks.explicit_padding(_OP, padding, size, k_eff, stride)
  if any(n + lo + hi < k for n, (lo, hi), k in zip(size, pads, k_eff)):
    raise ValueError(f"{_OP}: the dilated kernel {k_eff} is larger than the padded input "
                     f"{tuple(n + lo + hi for n, (lo, hi) in zip(size, pads))}")
  return x, w, b, _Config(stride, pads, dilation, groups, layout,
                          None if b is None else b.dtype,
                          _checks.precision(_OP, precision),
                          None if b is None else _sharding.like(b))


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, stride=1, padding="SAME",
           dilation=1, groups=1, layout: str = "NHWC", precision=None) -> jax.Array:
  r"""2-D cross-correlation (the deep-learning "convolution"), with a manual VJP.

  With ``x`` zero-padded to :math:`\bar x`, stride :math:`s`, dilation :math:`d`, ``groups``
  :math:`G`, :math:`C_g = C/G` input and :math:`O_g = O/G` output channels per group, and
  :math:`\gamma(o) = \lfloor o / O_g \rfloor` the group of output channel :math:`o`:

  .. math::
    y_{n,i,j,o} = b_o + \sum_{p,q} \sum_{c<C_g}
      \bar x_{n,\, s_h i + d_h p,\, s_w j + d_w q,\, \gamma(o) C_g + c}\; w_{p,q,c,o}

  Args:
    x: float[N, H, W, C] (``layout="NHWC"``) or float[N, C, H, W] (``"NCHW"``).
    w: float[KH, KW, C/groups, O] (HWIO, with NHWC) or float[O, C/groups, KH, KW] (OIHW, with
      NCHW), any float dtype.
    b: optional float[O], any float dtype.
    stride: int or (int, int), positive.
    padding: ``"SAME"``, ``"VALID"`` (as in :func:`jax.lax.conv_general_dilated`), an int
      (both sides of both spatial dims), or ``((lo_h, hi_h), (lo_w, hi_w))``, non-negative.
    dilation: int or (int, int), positive (kernel, "atrous", dilation).
    groups: positive int dividing C and O; ``groups == C`` is a depthwise convolution.
    layout: ``"NHWC"`` or ``"NCHW"``.
    precision: ``None``, a :class:`jax.lax.Precision` (or its name) or a pair of them, for
      every convolution and product of the forward and backward passes.

  The computation runs in ``x``'s dtype: ``w`` and ``b`` may have another float dtype and are
  cast to it; products accumulate in at least float32, the bias is added before the one
  rounding to ``x``'s dtype, and each gradient comes back in its own input's dtype.

  Returns:
    float[N, H', W', O] (or float[N, O, H', W']) in the dtype of ``x``, with
    :math:`H' = \lfloor (H + lo_h + hi_h - d_h (KH-1) - 1) / s_h \rfloor + 1`.

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> jlayers.conv2d(jnp.ones((2, 5, 5, 4)), jnp.ones((3, 3, 4, 6)), stride=2).shape
    (2, 3, 3, 6)
  """
  x, w, b, config = _validate(x, w, b, stride, padding, dilation, groups, layout, precision)
  return _conv2d(config, x, w, b)


def _out_layout(layout, x, w):
  """Where the types carry shardings, the output's: the batch as ``x``'s, the output channels
  as ``w``'s (unless the batch uses that mesh axis, as FSDP's kernels do), space unsplit."""
  if not _sharding.explicit(x):
    return None
  batch = _sharding.entry(x, 0)
  channels = _sharding.free(_sharding.entry(w, 3 if layout == "NHWC" else 0), (batch,))
  return P(batch, None, None, channels) if layout == "NHWC" else P(batch, channels, None, None)


def _forward(config: _Config, x, w, b):
  acc = _checks.at_least_float32(x.dtype)
  y = lax.conv_general_dilated(x, w.astype(x.dtype), config.stride, config.padding,
                               rhs_dilation=config.dilation,
                               dimension_numbers=_DNUMS[config.layout],
                               feature_group_count=config.groups, precision=config.precision,
                               preferred_element_type=acc,
                               out_sharding=_out_layout(config.layout, x, w))
  if b is not None:
    channel = 3 if config.layout == "NHWC" else 1
    b = _sharding.reshard_like(b.astype(acc), y, axes=(channel,))
    y = y + b.reshape((1, 1, 1, -1) if config.layout == "NHWC" else (1, -1, 1, 1))
  return y.astype(x.dtype)


def _local_forward(config: _Config, x, w, b):
  """:func:`_forward`, per device for grouped convolutions of a batch split over devices
  (XLA's partitioner gathers the whole batch for ``feature_group_count > 1``)."""
  if config.groups == 1:
    return _forward(config, x, w, b)
  return _sharding.batch_local(functools.partial(_forward, config), (x,), (w, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv2d(config, x, w, b):
  return _local_forward(config, x, w, b)


def _conv2d_fwd(config, x, w, b):
  """Saves ``x`` and ``w`` only: dW is linear in ``x`` and dX in ``w``, both are inputs (no
  extra memory), and db needs nothing but the cotangent. The output is not needed."""
  return _local_forward(config, x, w, b), (x, w)


def _conv2d_bwd(config, res, g):
  r"""Backward of the convolution for the cotangent :math:`G = ∂L/∂y`.

  **Index form.** The two spatial axes are independent, so one is shown: input size :math:`H`,
  kernel :math:`K`, effective kernel :math:`K_e = d(K-1)+1`, padding :math:`(lo, hi)`, output
  :math:`O = \lfloor (H + lo + hi - K_e)/s \rfloor + 1`, and :math:`x_h = 0` outside
  :math:`[0, H)`:

  .. math::
    y_{n,i,o} = b_o + \sum_{p<K} \sum_{c<C_g} x_{n,\, s i + d p - lo,\, \gamma(o) C_g + c}\,
      w_{p,c,o}

  Let :math:`G^s` be :math:`G` dilated by :math:`s` (:math:`G^s_{s i} = G_i`, zeros between,
  length :math:`(O-1)s+1`) and :math:`\tilde w_{p} = w_{K-1-p}` the flipped kernel.

  **dX.** :math:`x_{n,h,\gamma C_g + c}` meets :math:`w_{p,c,o}` exactly when
  :math:`s i = h + lo - d p`, for the :math:`o` of group :math:`\gamma`, so with
  :math:`p' = K-1-p`:

  .. math::
    dX_{n,h,\gamma C_g + c} = \sum_{p} \sum_{o'<O_g} G^s_{n,\, h + lo - d p,\, \gamma O_g + o'}\,
      w_{p,c,\gamma O_g + o'}
    = \sum_{p'} \sum_{o'} \hat G_{n,\, h + d p',\, \gamma O_g + o'}\,
      \tilde w_{p',c,\gamma O_g + o'}

  where :math:`\hat G` is :math:`G^s` padded by :math:`lo' = K_e - 1 - lo` below. That is a
  stride-1 convolution (``lhs_dilation=s``, ``rhs_dilation=d``, ``feature_group_count=G``) of
  the cotangent with the flipped kernel whose in/out channels are swapped within each group,
  i.e. :math:`[K, O_g, G C_g]`. The high pad makes the output :math:`H` long:
  :math:`lo' + (O-1)s + 1 + hi' - K_e + 1 = H`, so :math:`hi' = H + K_e - 1 - (O-1)s - 1 - lo'`.
  It absorbs the stride remainder (rows no window reached get 0) and is negative when padding
  beyond the last window is cropped.

  **dW.** Summing the same products over :math:`n, i` instead, with :math:`\bar x` padded by
  :math:`lo` below,

  .. math::
    dW_{p,c,o} = \sum_n \sum_i \bar x_{n,\, s i + d p,\, \gamma(o) C_g + c}\, G_{n,i,o}
    = \sum_n \sum_{i'} \bar x_{n,\, d p + i',\, \gamma(o) C_g + c}\, G^s_{n,i',o}

  a convolution of :math:`\bar x` (window stride :math:`d`) with :math:`G` as the kernel
  (``rhs_dilation=s``) that contracts the batch :math:`n`: x's batch is the conv's feature axis
  and x's channels are its batch. :math:`K` outputs need
  :math:`\bar x` of length :math:`(K-1)d + (O-1)s + 1`, so the high pad is
  :math:`K_e + (O-1)s - H - lo \le hi`. Output channel :math:`o` reads only channel group
  :math:`\gamma(o)`: ``batch_group_count=G`` pairs the g-th block of x's channels with the g-th
  block of output channels.

  **db** :math:`= \sum_{n,i,j} G_{n,i,j,o}`.

  With :math:`s = d = G = 1` and VALID padding this is the textbook stride-1 rule:
  :math:`lo' = hi' = K-1`, so dX is the *full* correlation of dY with the flipped kernel,
  summed over output channels (:math:`∂L/∂X_{n,c} = \sum_f W_{f,c} * ∂L/∂Y_{n,f}`, over the
  padded length :math:`H - K + 1 + 2(K-1) = H + K - 1`), and dW is the valid correlation
  :math:`\sum_n X_{n,c} \star ∂L/∂Y_{n,f}`.

  **Evaluation of dW.** On GPU and TPU (any platform but CPU) dW is the convolution above,
  XLA's native backward-filter convolution. XLA:CPU runs it badly: it is canonicalised with
  transposed copies of x and :math:`G` (temporaries as large as both) into a convolution with
  an :math:`H' \times W'` kernel and a :math:`KH \times KW` output, which runs several times
  slower than the forward of the same FLOPs, and batch-grouped ones slower still (the bench's
  conv2d rows measure it). So on CPU dW is evaluated from the second
  form directly, as the product :math:`P^T G` of the patches :math:`P_{(n,i,j),(p,q,c)} =
  \bar x_{n,\, s i + d p,\, s j + d q,\, c}` with the cotangent (batched over groups),
  accumulated in a loop over chunks of the batch whose patches fit in cache
  (:mod:`jlayers._conv_cpu`). The convolution remains only for an image whose patches exceed
  both that budget and all of x.
  :func:`jax.lax.platform_dependent` picks the formulation when lowering (see
  :func:`jlayers.formulation`).

  **On a mesh.** dX is a convolution of each device's slice of :math:`G` with the (replicated)
  kernel: local. dW sums over the batch: where the batch is split over devices, the loop keeps
  a separate accumulator per slice (the slice index is a batch dimension of the products, so
  each device contracts its own images) and adds the weight-sized accumulators at the end;
  the native convolution is told to lay its result out as ``w`` and does the same.
    """
  x, w = res
  stride, pads, dilation, groups, layout, bias_dtype, precision, bias_layout = config
  acc = _checks.at_least_float32(x.dtype)
  g = g.astype(x.dtype)
  xs, ws = _X_SPATIAL[layout], _W_SPATIAL[layout]
  size = [x.shape[a] for a in xs]
  kernel = [w.shape[a] for a in ws]
  k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
  out_dil = [(g.shape[a] - 1) * s + 1 for a, s in zip(xs, stride)]
  lo_x = [k - 1 - lo for k, (lo, _) in zip(k_eff, pads)]
  dx_pads = [(lo, n + k - 1 - od - lo) for lo, n, k, od in zip(lo_x, size, k_eff, out_dil)]
  dx = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding=dx_pads,
                         lhs_dilation=stride, rhs_dilation=dilation,
                         dimension_numbers=_DNUMS[layout], feature_group_count=groups,
                         precision=precision, preferred_element_type=acc)
  w_dx = _swap_groups(w.astype(x.dtype), groups, layout)
  if groups == 1:  # laid out as x (contracting output channels split as w's: summed)
    dx = dx(g, w_dx, out_sharding=_sharding.like(x))
  else:
    dx = _sharding.batch_local(dx, (g,), (w_dx,))
  dw_pads = [(lo, k + od - 1 - n - lo) for (lo, _), n, k, od in zip(pads, size, k_eff, out_dil)]
  native = functools.partial(_dw_native, pads=dw_pads, config=config,
                             out_sharding=_sharding.like(w))
  chunk = _conv_cpu.loop_chunk(x, g, kernel, layout)
  if chunk:
    loop = functools.partial(_conv_cpu.weight_grad, kernel=kernel, pads=dw_pads, chunk=chunk,
                             config=config)

    def cpu(x, g):  # laid out as w, as the native branch's result is
      return _sharding.reshard_as(loop(x, g), w)

    dw = _platform.by_platform(x, g, cpu=cpu, native=native)
  else:
    dw = native(x, g)
  db = None
  if bias_dtype is not None:
    db = jnp.sum(g.astype(acc), axis=(0, 1, 2) if layout == "NHWC" else (0, 2, 3))
    db = _sharding.reshard_to(db, bias_layout).astype(bias_dtype)
  return dx.astype(x.dtype), dw.astype(w.dtype), db


def _swap_groups(w, groups, layout):
  """The dX kernel: spatially flipped, in/out channels swapped within each group.

  HWIO ``[KH, KW, C_g, G·O_g]`` becomes ``[KH, KW, O_g, G·C_g]``; OIHW ``[G·O_g, C_g, KH, KW]``
  becomes ``[G·C_g, O_g, KH, KW]``.
  """
  if layout == "NHWC":
    kh, kw, cg, o = w.shape
    w = w.reshape(kh, kw, cg, groups, o // groups).transpose(0, 1, 4, 3, 2)
    w = w.reshape(kh, kw, o // groups, groups * cg)
  else:
    o, cg, kh, kw = w.shape
    w = w.reshape(groups, o // groups, cg, kh, kw).transpose(0, 2, 1, 3, 4)
    w = w.reshape(groups * cg, o // groups, kh, kw)
  return lax.rev(w, _W_SPATIAL[layout])


def _dw_native(x, g, pads, config, out_sharding):
  """dW by XLA's convolution (:func:`_dw_conv`); for grouped convolutions of a batch split over
  devices, per device and summed (XLA's partitioner would gather the batch)."""
  if config.groups == 1:
    return _dw_conv(x, g, pads, config, out_sharding)
  local = functools.partial(_dw_conv, pads=pads, config=config, out_sharding=None)
  return _sharding.batch_local(local, (x, g), summed=True)


def _dw_conv(x, g, pads, config, out_sharding):
  """dW as the convolution of the padded ``x`` with the dilated ``G`` (see the bwd), laid out
  as ``w`` (``out_sharding``) where the batch it contracts is split over devices."""
  dnums = ("CHWN", "IHWO", "HWNC") if config.layout == "NHWC" else ("CNHW", "IOHW", "CNHW")
  return lax.conv_general_dilated(x, g, config.dilation, pads, rhs_dilation=config.stride,
                                  dimension_numbers=dnums, batch_group_count=config.groups,
                                  precision=config.precision,
                                  preferred_element_type=_checks.at_least_float32(x.dtype),
                                  out_sharding=out_sharding)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d_reference(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, stride=1,
                     padding="SAME", dilation=1, groups=1, layout: str = "NHWC",
                     precision=None) -> jax.Array:
  """Autodiff twin of :func:`conv2d`: same signature, checks and forward, no custom rule."""
  x, w, b, config = _validate(x, w, b, stride, padding, dilation, groups, layout, precision)
  return _forward(config, x, w, b)


conv2d_op = _ops.declare(_OP, conv2d, conv2d_reference)
