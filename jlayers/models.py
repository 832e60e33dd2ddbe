"""Composition of layers, and the model-level check of manual against autodiff gradients."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlayers import _layer_base as base
from jlayers import _verify
from jlayers._layer_base import Layer

__all__ = ["Sequential", "grad_differences", "max_grad_difference"]


@dataclasses.dataclass(frozen=True)
class Sequential(Layer):
  """Layers applied one after another; itself a layer, so models nest.

  Child ``i`` is named ``f"{layer.kind}_{i}"`` (``"conv2d_0"``, ``"batch_norm_1"``, ...);
  ``params`` and ``state`` are dicts from those names to the children's dicts, holding only
  the children that have any. ``init`` threads the shape through the children with
  :func:`jax.eval_shape`, so no layer needs its input size spelled out.

  ``apply`` passes ``train`` and ``impl`` to every child, and gives child ``i`` the key
  ``jax.random.fold_in(key, i)``: two dropout layers never share a mask.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.Sequential([jlayers.Linear(8), jlayers.ReLU(), jlayers.Linear(2)])
    >>> params, state = model.init(jax.random.key(0), (4, 3))
    >>> sorted(params), state
    (['linear_0', 'linear_2'], {})
    >>> model.apply(params, state, jnp.ones((4, 3)))[0].shape
    (4, 2)
  """

  kind: ClassVar[str] = "sequential"
  layers: Sequence[Layer]

  def __post_init__(self):
    if isinstance(self.layers, Layer) or not isinstance(self.layers, Sequence):
      raise TypeError(f"Sequential: layers must be a list or tuple of layers, "
                      f"got {type(self.layers).__name__}")
    for i, layer in enumerate(self.layers):
      if not isinstance(layer, Layer):
        raise TypeError(f"Sequential: layers[{i}] must be a jlayers layer, "
                        f"got {type(layer).__name__}")
    base.set_field(self, "layers", tuple(self.layers))

  @property
  def names(self) -> tuple[str, ...]:
    """The children's names, in order."""
    return tuple(f"{layer.kind}_{i}" for i, layer in enumerate(self.layers))

  def init(self, key, input_shape, *, dtype=jnp.float32):
    shape = base.shape_of("Sequential", input_shape)
    x = jax.ShapeDtypeStruct(shape, dtype)
    params, state = {}, {}
    for i, (name, layer) in enumerate(zip(self.names, self.layers)):
      p, s = layer.init(jax.random.fold_in(key, i), x.shape, dtype=dtype)
      if p:
        params[name] = p
      if s:
        state[name] = s
      x, _ = jax.eval_shape(functools.partial(layer.apply, train=False), p, s, x)
    return params, state

  def apply(self, params, state, x, *, key=None, train=False, impl="manual"):
    base.check_call("Sequential", train, impl)
    for what, tree in (("params", params), ("state", state)):
      if not isinstance(tree, dict):
        raise TypeError(f"Sequential: {what} must be a dict, got {type(tree).__name__}")
      unknown = sorted(set(tree) - set(self.names))
      if unknown:
        raise ValueError(f"Sequential: {what} has entries {unknown} that match no layer "
                         f"(layers: {list(self.names)})")
    new_state = {}
    for i, (name, layer) in enumerate(zip(self.names, self.layers)):
      child_key = None if key is None else jax.random.fold_in(key, i)
      x, s = layer.apply(params.get(name, {}), state.get(name, {}), x, key=child_key,
                         train=train, impl=impl)
      if s:
        new_state[name] = s
    return x, new_state


def grad_differences(loss_fn: Callable[..., jax.Array], params: Any, *args,
                     **kwargs) -> dict[str, float]:
  """Relative difference of the manual and autodiff gradients, per param leaf.

  Computes ``g_m = grad(loss_fn)(params, *args, impl="manual", **kwargs)`` and ``g_a`` with
  ``impl="autodiff"``, both under ``jax.jit`` (``args`` are traced, ``kwargs`` are static),
  and for every leaf ``max|g_m − g_a| / max|g_a|`` (see :func:`jlayers._verify.rel_err`).
  Inside ``jax.enable_x64(True)`` with float64 params and inputs the two agree to ~1e-13.

  A leaf whose gradient is zero in exact arithmetic (the bias of a convolution that feeds
  batch norm) compares rounding noise with rounding noise and reads as a large relative
  difference; leave such redundant params out (``use_bias=False``), as is usual anyway.

  Args:
    loss_fn: ``loss_fn(params, *args, impl=..., **kwargs) -> float[]``.
    params: pytree of float arrays, the point where the gradients are taken.
    *args: arrays (pytrees) passed on to ``loss_fn``, e.g. state, batch, key.
    **kwargs: static configuration passed on to ``loss_fn``.

  Returns:
    ``{jax.tree_util.keystr(path): relative difference}`` over the leaves of ``params``.
  """
  grads = {}
  for impl in ("manual", "autodiff"):
    grads[impl] = jax.jit(jax.grad(functools.partial(loss_fn, impl=impl, **kwargs)))(
        params, *args)
  manual = jax.tree_util.tree_leaves_with_path(grads["manual"])
  autodiff = jax.tree_util.tree_leaves(grads["autodiff"])
  return {jax.tree_util.keystr(path): _verify.rel_err(a, b)[1]
          for (path, a), b in zip(manual, autodiff)}


def max_grad_difference(loss_fn: Callable[..., jax.Array], params: Any, *args,
                        **kwargs) -> float:
  """The worst leaf of :func:`grad_differences`: one number for a whole model.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.Sequential([jlayers.Linear(4), jlayers.ReLU(), jlayers.Linear(1)])
    >>> params, state = model.init(jax.random.key(0), (8, 3))
    >>> def loss(params, x, *, impl):
    ...   return jnp.sum(model.apply(params, state, x, impl=impl)[0] ** 2)
    >>> jlayers.max_grad_difference(loss, params, jnp.ones((8, 3))) < 1e-6
    True
  """
  return max(grad_differences(loss_fn, params, *args, **kwargs).values(), default=0.0)
