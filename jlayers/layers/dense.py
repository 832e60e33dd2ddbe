"""Dense and convolution layers: :class:`Linear`, :class:`GatedMLP` and :class:`Conv2d`."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.nn import initializers

from jlayers import _checks
from jlayers.conv import conv2d_op
from jlayers.gated import geglu_op, swiglu_op
from jlayers.layers import base
from jlayers.layers.base import Initializer, Layer
from jlayers.linear import linear_op

default_kernel_init = initializers.lecun_normal()


@dataclasses.dataclass(frozen=True)
class Linear(Layer):
  """Fully connected layer ``y = x @ kernel + bias`` over the last axis.

  Params: ``{"kernel": float[in, features], "bias": float[features]}`` (no ``"bias"`` when
  ``use_bias=False``) in ``param_dtype``; no state. ``in`` is ``input_shape[-1]``. With
  ``dtype`` set, ``x`` is cast to it and the product runs in it (the params are cast inside
  :func:`jlayers.linear`, their gradients come back in ``param_dtype``); ``None`` computes in
  ``x``'s dtype. ``precision`` goes to :func:`jlayers.linear`.
  """

  kind: ClassVar[str] = "linear"
  features: int
  _: dataclasses.KW_ONLY
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = initializers.zeros

  def __post_init__(self):
    _checks.positive_int("Linear", "features", self.features)
    base.check_dtypes(self)
    base.set_field(self, "precision", _checks.precision("Linear", self.precision))
    _checks.flag("Linear", "use_bias", self.use_bias)
    _checks.initializer("Linear", "kernel_init", self.kernel_init)
    _checks.initializer("Linear", "bias_init", self.bias_init)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    shape = _checks.shape_of("Linear", input_shape, min_rank=1)
    k_key, b_key = jax.random.split(key)
    params = {"kernel": self.kernel_init(k_key, (shape[-1], self.features), self.param_dtype)}
    if self.use_bias:
      params["bias"] = self.bias_init(b_key, (self.features,), self.param_dtype)
    return params, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("Linear", train, impl)
    kernel, *bias = base.entries(self, params, "params",
                                 ("kernel", "bias") if self.use_bias else ("kernel",))
    y = linear_op.select(impl)(base.compute_dtype(self, x), kernel, *bias,
                                 precision=self.precision)
    return y, state


_GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class GatedMLP(Layer):
  r"""The gated feed-forward block of Llama-class transformers, over the last axis:

  .. math::
    y = \big(\mathrm{act}(x W_{gate} + b_{gate}) ⊙ (x W_{up} + b_{up})\big)\, W_{down}
        + b_{down}

  ``activation`` names ``act``: ``"silu"`` (SwiGLU: Llama, Mistral, Qwen), ``"gelu"`` (the
  exact erf GELU) or ``"gelu_tanh"`` (its tanh form: Gemma). The three projections run
  through :func:`jlayers.linear` and the gate through :func:`jlayers.swiglu` or
  :func:`jlayers.geglu`, so every backward pass is manual under ``impl="manual"`` (and autodiff
  of the twins under ``impl="autodiff"``, the argument of ``apply``).

  Params: ``{"gate", "up", "down"}``, each ``{"kernel": float[in, out], "bias": float[out]}``
  (no ``"bias"`` with ``use_bias=False``, the default): gate and up ``[F, hidden_features]``,
  down ``[hidden_features, out_features]``, with ``F = input_shape[-1]`` and
  ``out_features`` defaulting to ``F``. No state. ``dtype``, ``param_dtype``, ``precision``
  and the initialisers work as for :class:`Linear`.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> mlp = jlayers.GatedMLP(8)
    >>> params, state = mlp.init(jax.random.key(0), (2, 5, 4))
    >>> jax.tree_util.tree_map(jnp.shape, params)
    {'down': {'kernel': (8, 4)}, 'gate': {'kernel': (4, 8)}, 'up': {'kernel': (4, 8)}}
    >>> mlp.apply(params, state, jnp.ones((2, 5, 4)))[0].shape
    (2, 5, 4)
  """

  kind: ClassVar[str] = "gated_mlp"
  hidden_features: int
  _: dataclasses.KW_ONLY
  out_features: int | None = None
  activation: str = "silu"
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = initializers.zeros

  def __post_init__(self):
    where = "GatedMLP"
    _checks.positive_int(where, "hidden_features", self.hidden_features)
    if self.out_features is not None:
      _checks.positive_int(where, "out_features", self.out_features)
    if not isinstance(self.activation, str) or self.activation not in _GATED_ACTIVATIONS:
      raise ValueError(f"{where}: activation must be one of {_GATED_ACTIVATIONS}, got "
                       f"{self.activation!r}")
    _checks.flag(where, "use_bias", self.use_bias)
    base.check_dtypes(self)
    base.set_field(self, "precision", _checks.precision(where, self.precision))
    _checks.initializer(where, "kernel_init", self.kernel_init)
    _checks.initializer(where, "bias_init", self.bias_init)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    features = _checks.shape_of("GatedMLP", input_shape, min_rank=1)[-1]
    sizes = {"gate": (features, self.hidden_features), "up": (features, self.hidden_features),
             "down": (self.hidden_features, self.out_features or features)}
    params = {}
    for k, (name, (n_in, n_out)) in zip(jax.random.split(key, 3), sizes.items()):
      k_key, b_key = jax.random.split(k)
      params[name] = {"kernel": self.kernel_init(k_key, (n_in, n_out), self.param_dtype)}
      if self.use_bias:
        params[name]["bias"] = self.bias_init(b_key, (n_out,), self.param_dtype)
    return params, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("GatedMLP", train, impl)
    projections = base.entries(self, params, "params", ("gate", "up", "down"))
    names = ("kernel", "bias") if self.use_bias else ("kernel",)
    linear = linear_op.select(impl)

    def project(name, weights, h):
      return linear(h, *base.entries(self, weights, f"params[{name!r}]", names),
                    precision=self.precision)

    x = base.compute_dtype(self, x)
    gate, up = (project(n, w, x) for n, w in zip(("gate", "up"), projections[:2]))
    if self.activation == "silu":
      h = swiglu_op.select(impl)(gate, up)
    else:
      h = geglu_op.select(impl)(gate, up, approximate=self.activation == "gelu_tanh")
    return project("down", projections[2], h), state

@dataclasses.dataclass(frozen=True)
class Conv2d(Layer):
  """2-D convolution, see :func:`jlayers.conv2d` for ``stride``, ``padding``, ``dilation``,
  ``groups`` and ``layout``.

  Params: ``{"kernel": float[kh, kw, in/groups, features] (HWIO) for NHWC or
  float[features, in/groups, kh, kw] (OIHW) for NCHW, "bias": float[features]}``; no state.
  ``kernel_init`` is always called with the HWIO shape (so that its fan-in is
  ``kh·kw·in/groups``) and the result is transposed for NCHW. Params are in ``param_dtype``;
  ``dtype`` and ``precision`` work as for :class:`Linear`.
  """

  kind: ClassVar[str] = "conv2d"
  features: int
  kernel_size: int | tuple[int, int]
  _: dataclasses.KW_ONLY
  stride: int | tuple[int, int] = 1
  padding: Any = "SAME"
  dilation: int | tuple[int, int] = 1
  groups: int = 1
  use_bias: bool = True
  layout: str = "NHWC"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = initializers.zeros

  def __post_init__(self):
    _checks.positive_int("Conv2d", "features", self.features)
    base.check_dtypes(self)
    base.set_field(self, "precision", _checks.precision("Conv2d", self.precision))
    for name in ("kernel_size", "stride", "dilation"):
      base.set_field(self, name, _checks.positive_ints("Conv2d", name, getattr(self, name), 2))
    base.set_field(self, "padding", _checks.padding("Conv2d", self.padding))
    _checks.positive_int("Conv2d", "groups", self.groups)
    if self.features % self.groups:
      raise ValueError(f"Conv2d: groups={self.groups} must divide features={self.features}")
    _checks.flag("Conv2d", "use_bias", self.use_bias)
    _checks.layout("Conv2d", self.layout)
    _checks.initializer("Conv2d", "kernel_init", self.kernel_init)
    _checks.initializer("Conv2d", "bias_init", self.bias_init)

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    shape = _checks.shape_of("Conv2d", input_shape, rank=4)
    channels = shape[-1] if self.layout == "NHWC" else shape[1]
    if channels % self.groups:
      raise ValueError(f"Conv2d: groups={self.groups} must divide the input channels "
                       f"({channels}) of input_shape {shape} ({self.layout})")
    k_key, b_key = jax.random.split(key)
    kernel = self.kernel_init(
        k_key, (*self.kernel_size, channels // self.groups, self.features), self.param_dtype)
    if self.layout == "NCHW":
      kernel = jnp.transpose(kernel, (3, 2, 0, 1))
    params = {"kernel": kernel}
    if self.use_bias:
      params["bias"] = self.bias_init(b_key, (self.features,), self.param_dtype)
    return params, {}

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    _checks.static_call("Conv2d", train, impl)
    kernel, *bias = base.entries(self, params, "params",
                                 ("kernel", "bias") if self.use_bias else ("kernel",))
    y = conv2d_op.select(impl)(
        base.compute_dtype(self, x), kernel, *bias, stride=self.stride,
        padding=self.padding, dilation=self.dilation, groups=self.groups, layout=self.layout,
        precision=self.precision)
    return y, state
