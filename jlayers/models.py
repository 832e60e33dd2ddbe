"""Composition of layers: :class:`Composite` (and its :class:`Scope`), :class:`Sequential`,
:class:`Residual` and :class:`Remat`."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jlayers import _checks
from jlayers.layers import base
from jlayers.layers.base import Layer

__all__ = ["Composite", "Remat", "Residual", "Scope", "Sequential"]


def _child_key(key, name: str):
  """The key of child ``name``: ``key`` folded with a hash of the name (stable under edits)."""
  return None if key is None else jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


class Scope:
  """Calls a layer's children inside its ``apply``, threading params, state, keys, ``train``
  and ``impl``.

  ``scope(name, child, x, **inputs)`` runs ``child.apply(params[name], state[name], x,
  **inputs, ...)`` (``inputs``: further arrays the child's ``apply`` takes by name, such as
  attention's ``positions``) with the key ``fold_in(key, hash(name))``, so no two children share a key, records the child's new
  state under ``name`` (:attr:`state`) and returns its output. Calling the same name again
  with the same child reuses its params (weight sharing). :class:`Composite` creates it; any
  ``Layer`` subclass may use it in its own ``apply``.

  Args:
    where: the owner's name, for error messages.
    params, state: the owner's dicts of the children's params and state, by name.
    key, train, impl: as passed to the owner's ``apply``.
  """

  def __init__(self, where: str, params, state, *, key=None, train=False, impl="manual"):
    for what, tree in (("params", params), ("state", state)):
      if not isinstance(tree, dict):
        raise TypeError(f"{where}: {what} must be a dict, got {type(tree).__name__}")
    self.where, self.params, self.old_state = where, params, state
    self.key, self.train, self.impl = key, train, impl
    self.state: dict[str, Any] = {}
    self.called: dict[str, Layer] = {}

  def __call__(self, name: str, child: Layer, x, **inputs):
    _check_child(self.where, name, child, self.called)
    state = self.state.get(name, self.old_state.get(name, {}))
    try:
      y, s = child.apply(self.params.get(name, {}), state, x, key=_child_key(self.key, name),
                         train=self.train, impl=self.impl, **inputs)
    except KeyError:
      for what, tree in (("params", self.params), ("state", self.old_state)):
        if name not in tree and tree:  # the child's entry is missing, or under another name
          raise KeyError(f"{self.where}: {what} has no entry {name!r} for child {name!r} "
                         f"(it has {sorted(tree)})") from None
      raise
    if s:
      self.state[name] = s
    return y

  def params_of(self, name: str):
    """The params of child ``name``, already called through this scope: for a child's other
    methods (``Embedding.attend`` of tied output logits)."""
    _check_called(self.where, name, self.called)
    return self.params.get(name, {})

  def skip(self, name: str, child: Layer) -> None:
    """Declares child ``name`` not called this time (its params stay unused without error):
    for a forward that stops early, such as a language model returning its hidden states."""
    _check_child(self.where, name, child, self.called)

  def check_unused(self) -> None:
    """Raises ``ValueError`` for params or state entries that no child was called for."""
    for what, tree in (("params", self.params), ("state", self.old_state)):
      unknown = sorted(set(tree) - set(self.called))
      if unknown:
        raise ValueError(f"{self.where}: {what} has entries {unknown} that match no child "
                         f"(children: {list(self.called)})")


class _Recorder:
  """The :class:`Scope` of ``init``: records each child and the shape it is called with, and
  returns its output shape (under ``jax.eval_shape``, no FLOPs)."""

  def __init__(self, where: str):
    self.where = where
    self.called: dict[str, Layer] = {}
    self.inputs: dict[str, jax.ShapeDtypeStruct] = {}
    self.train, self.impl = False, "manual"

  def params_of(self, name: str):
    _check_called(self.where, name, self.called)
    struct = self.inputs[name]
    return self.called[name].init(jax.random.key(0), struct.shape,
                                  input_dtype=struct.dtype)[0]

  def skip(self, name: str, child: Layer) -> None:
    _check_child(self.where, name, child, self.called)

  def __call__(self, name: str, child: Layer, x, **inputs):
    _check_child(self.where, name, child, self.called)
    self.inputs.setdefault(name, jax.ShapeDtypeStruct(x.shape, x.dtype))
    params, state = child.init(jax.random.key(0), x.shape, input_dtype=x.dtype)
    return child.apply(params, state, x, train=False, **inputs)[0]


def _check_called(where: str, name, called: dict) -> None:
  if name not in called:
    raise KeyError(f"{where}: params_of({name!r}) before child {name!r} was called "
                   f"(called: {list(called)})")


def _check_child(where: str, name, child, called: dict) -> None:
  if not isinstance(name, str) or not name:
    raise TypeError(f"{where}: a child's name must be a non-empty string, got {name!r}")
  if not isinstance(child, Layer):
    raise TypeError(f"{where}: child {name!r} must be a jlayers layer, got "
                    f"{type(child).__name__}")
  if name in called and called[name] is not child:
    raise ValueError(f"{where}: two different children are named {name!r}")
  called[name] = child


class Composite(Layer):
  """A layer made of named children, written as one ``forward(scope, x)``.

  Subclasses define ``forward``, calling each child as ``scope(name, child, x)`` and combining
  the results with any jnp code; :meth:`init` and :meth:`apply` come from it. Arrays passed to
  ``apply`` by name (``apply(params, state, x, positions=p)``) reach ``forward`` as keywords
  (``forward(scope, x, positions=p)``); ``init`` calls ``forward`` without them. ``params`` and
  ``state`` are dicts from the children's names to their dicts (only children that have any).

  Examples:
    A ResNet-style block with a projection shortcut:

    >>> import dataclasses, jax, jax.numpy as jnp, jlayers
    >>> @dataclasses.dataclass(frozen=True)
    ... class Block(jlayers.Composite):
    ...   features: int
    ...   def forward(self, scope, x):
    ...     h = scope("conv1", jlayers.Conv2d(self.features, 3, use_bias=False), x)
    ...     h = scope("relu1", jlayers.ReLU(), scope("bn1", jlayers.BatchNorm(), h))
    ...     h = scope("bn2", jlayers.BatchNorm(),
    ...               scope("conv2", jlayers.Conv2d(self.features, 3, use_bias=False), h))
    ...     s = scope("proj", jlayers.Conv2d(self.features, 1, use_bias=False), x)
    ...     return scope("relu2", jlayers.ReLU(), h + s)
    >>> block = Block(8)
    >>> params, state = block.init(jax.random.key(0), (2, 6, 6, 3))
    >>> sorted(params)
    ['bn1', 'bn2', 'conv1', 'conv2', 'proj']
    >>> y, state = block.apply(params, state, jnp.ones((2, 6, 6, 3)), train=True)
    >>> y.shape
    (2, 6, 6, 8)
  """

  kind: ClassVar[str] = "composite"

  def forward(self, scope, x, **inputs):
    """The computation: ``scope(name, child, x)`` calls a child (see :class:`Scope`)."""
    raise NotImplementedError

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    where = type(self).__name__
    shape = _checks.shape_of(where, input_shape)
    recorder = _Recorder(where)
    jax.eval_shape(lambda x: self.forward(recorder, x), jax.ShapeDtypeStruct(shape, input_dtype))
    params, state = {}, {}
    for name, child in recorder.called.items():
      struct = recorder.inputs[name]
      p, s = child.init(_child_key(key, name), struct.shape, input_dtype=struct.dtype)
      if p:
        params[name] = p
      if s:
        state[name] = s
    return params, state

  def apply(self, params, state, x, *, key=None, train=False, impl="manual", **inputs):
    where = type(self).__name__
    _checks.static_call(where, train, impl)
    scope = Scope(where, params, state, key=key, train=train, impl=impl)
    y = self.forward(scope, x, **inputs)
    scope.check_unused()
    return y, scope.state


@dataclasses.dataclass(frozen=True)
class Residual(Composite):
  """``y = body(x) + shortcut(x)``: the identity shortcut by default, or any layer (a
  projection: a 1×1 ``Conv2d``, a ``Linear``, a ``Sequential``).

  Children are named ``"body"`` and ``"shortcut"``. The two outputs must have one shape; the
  sum is in the body's output dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> block = jlayers.Residual(jlayers.Sequential([jlayers.Linear(4), jlayers.ReLU()]))
    >>> params, state = block.init(jax.random.key(0), (2, 4))
    >>> block.apply(params, state, jnp.ones((2, 4)))[0].shape
    (2, 4)
  """

  kind: ClassVar[str] = "residual"
  body: Layer
  _: dataclasses.KW_ONLY
  shortcut: Layer | None = None

  def __post_init__(self):
    if not isinstance(self.body, Layer):
      raise TypeError(f"Residual: body must be a jlayers layer, got {type(self.body).__name__}")
    if self.shortcut is not None and not isinstance(self.shortcut, Layer):
      raise TypeError(f"Residual: shortcut must be None or a jlayers layer, got "
                      f"{type(self.shortcut).__name__}")

  def forward(self, scope, x):
    h = scope("body", self.body, x)
    s = x if self.shortcut is None else scope("shortcut", self.shortcut, x)
    if h.shape != s.shape:
      what = "x (the identity shortcut)" if self.shortcut is None else "the shortcut's output"
      raise ValueError(f"Residual: the body's output has shape {tuple(h.shape)} but {what} has "
                       f"{tuple(s.shape)}; pass a projection as shortcut=")
    return h + s.astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class Remat(Layer):
  """``layer`` with its activations recomputed in the backward pass (:func:`jax.checkpoint`).

  The params, state and output are ``layer``'s own (``init`` and ``apply`` pass them
  through), so wrapping a block changes memory, not numbers: the forward of ``layer`` runs
  again during the backward pass instead of keeping what its rules save (or, with
  ``policy``, a :data:`jax.checkpoint_policies` policy, keeping only what that allows).

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> block = jlayers.Remat(jlayers.Sequential([jlayers.Linear(4), jlayers.GELU()]))
    >>> params, state = block.init(jax.random.key(0), (2, 3))
    >>> block.apply(params, state, jnp.ones((2, 3)))[0].shape
    (2, 4)
  """

  kind: ClassVar[str] = "remat"
  layer: Layer
  _: dataclasses.KW_ONLY
  policy: Any = None

  def __post_init__(self):
    if not isinstance(self.layer, Layer):
      raise TypeError(f"Remat: layer must be a jlayers layer, got {type(self.layer).__name__}")
    if self.policy is not None and not callable(self.policy):
      raise TypeError(f"Remat: policy must be None or a jax.checkpoint_policies policy, got "
                      f"{type(self.policy).__name__}")

  def init(self, key, input_shape, *, input_dtype=jnp.float32):
    return self.layer.init(key, input_shape, input_dtype=input_dtype)

  def apply(self, params, state, x, *, key=None, train=False, impl="manual", **inputs):
    _checks.static_call("Remat", train, impl)

    def run(params, state, x, key, inputs):
      return self.layer.apply(params, state, x, key=key, train=train, impl=impl, **inputs)

    return jax.checkpoint(run, policy=self.policy)(params, state, x, key, inputs)


@dataclasses.dataclass(frozen=True)
class Sequential(Composite):
  """Layers applied one after another; itself a layer (a :class:`Composite`), so models nest.

  ``layers`` is a list of layers, a mapping from names to layers, or a list of
  ``(name, layer)`` pairs. Unnamed, child ``i`` is named ``f"{layer.kind}_{i}"``
  (``"conv2d_0"``, ``"batch_norm_1"``, ...); named children keep their names when layers are
  inserted or removed, so saved params still match. ``params`` and ``state`` are dicts from
  those names to the children's dicts, holding only the children that have any. ``init``
  threads the shape through the children with :func:`jax.eval_shape`, so no layer needs its
  input size spelled out.

  As in every :class:`Composite`, ``apply`` passes ``train`` and ``impl`` to every child and
  gives each its own key, derived from its name (:class:`Scope`): two dropout layers never
  share a mask, and a child keeps its key when others are inserted before it.

  Examples:
    >>> import jax, jax.numpy as jnp, jlayers
    >>> model = jlayers.Sequential([jlayers.Linear(8), jlayers.ReLU(), jlayers.Linear(2)])
    >>> params, state = model.init(jax.random.key(0), (4, 3))
    >>> sorted(params), state
    (['linear_0', 'linear_2'], {})
    >>> model.apply(params, state, jnp.ones((4, 3)))[0].shape
    (4, 2)
    >>> named = jlayers.Sequential({"hidden": jlayers.Linear(8), "act": jlayers.ReLU(),
    ...                             "out": jlayers.Linear(2)})
    >>> sorted(named.init(jax.random.key(0), (4, 3))[0])
    ['hidden', 'out']
  """

  kind: ClassVar[str] = "sequential"
  layers: Any
  _names: tuple[str, ...] = dataclasses.field(default=(), init=False, repr=False)

  def __post_init__(self):
    layers = self.layers
    if isinstance(layers, Mapping):
      pairs = list(layers.items())
    elif isinstance(layers, Sequence) and not isinstance(layers, (str, Layer)):
      pairs = [item if isinstance(item, tuple) else (None, item) for item in layers]
    else:
      raise TypeError(f"Sequential: layers must be a list of layers, a mapping from names to "
                      f"layers or a list of (name, layer) pairs, got {type(layers).__name__}")
    names = []
    for i, pair in enumerate(pairs):
      if len(pair) != 2:
        raise TypeError(f"Sequential: layers[{i}] must be a layer or a (name, layer) pair, "
                        f"got {pair!r}")
      name, layer = pair
      if not isinstance(layer, Layer):
        raise TypeError(f"Sequential: layers[{i}] must be a jlayers layer, "
                        f"got {type(layer).__name__}")
      if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"Sequential: the name of layers[{i}] must be a non-empty string, "
                        f"got {name!r}")
      names.append(f"{layer.kind}_{i}" if name is None else name)
    if len(set(names)) != len(names):
      raise ValueError(f"Sequential: names must be unique, got {names}")
    base.set_field(self, "layers", tuple(layer for _, layer in pairs))
    base.set_field(self, "_names", tuple(names))

  @property
  def names(self) -> tuple[str, ...]:
    """The children's names, in order."""
    return self._names

  def forward(self, scope, x):
    for name, layer in zip(self.names, self.layers):
      x = scope(name, layer, x)
    return x
