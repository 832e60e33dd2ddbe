"""Property-based fuzzing of every public op against its autodiff twin, with valid and invalid
calls drawn by Hypothesis.

For every op of ``jlayers.registered_ops()`` a strategy draws calls ``op(*arrays, **config)``
the way a new user writes them: random ranks and shapes (size-0 and size-1 dimensions
included), every float dtype, integer and bool arrays where floats belong, mismatched shapes,
and out-of-range or wrongly typed configuration (zero, negative and huge ints, floats, bools,
strings, ``inf`` and ``nan``, tuples of the wrong length, unknown layouts and paddings, bad
masks, labels and ids out of range...). About half of the draws carry no mistake, so that the
rules also run on tiny and degenerate configurations. Each drawn call is checked for:

1. Eagerly, the manual op and its twin either both raise, each a ``ValueError`` or
   ``TypeError`` whose message starts with ``"<op>:"``, or both return.
2. Nothing else escapes: no other exception (``IndexError``, ``ZeroDivisionError``, errors of
   JAX or XLA from inside a rule...) and no warning.
3. Under ``jax.jit`` (configuration closed over, arrays as arguments) the same outcome: the
   same kind of error if and only if the eager call raised.
4. A valid call gives the same forward outputs from the manual op and the twin, and the same
   ``jax.vjp`` with respect to every floating positional array (random cotangent): the same
   shapes and dtypes (each gradient in its input's dtype), NaN and infinity at the same
   places, and finite values within a relative error of 1e-9 in float64, 1e-4 in float32 and
   four epsilons of bfloat16 or float16 (the coarsest float dtype among the array and the
   call's positional arrays: a float64 weight of a bfloat16 layer is computed in bfloat16).
   Errors are relative to the largest finite entry of the twin's array, floored at the largest
   entry of its other outputs (of its other gradients and of the cotangent, for gradients),
   and below float64 they may also reach twice the twin's own rounding error (the twin run in
   float64 on the same values): where the exact value is 0 or cancels, both sides hold
   rounding noise that is small only against the terms that cancel.
5. Forward outputs and VJPs under ``jax.jit`` equal the eager ones within the same tolerance.

The manual op runs eagerly and under jit; the twin (plain ``jnp``, the reference) runs its
forward eagerly and its forward and VJP under jit (its eager VJP would only test JAX, at one
compile per primitive).

Profiles. By default every op gets a few deterministic examples (``derandomize``, no example
database), so the module fits in a CI budget, and the calls that exposed a defect when the
module was written (``REGRESSIONS``) run every time. The deep profile draws N examples per op:

  JLAYERS_FUZZ_EXAMPLES=100 .venv/bin/python -m pytest -q tests/test_fuzz.py -p no:cacheprovider

(add ``-k conv2d`` for one op). Hypothesis stops an op at its first failing call and does not
shrink it (every example compiles programs). The session ends with a count of the calls
checked per op: valid (compared with the twin), rejected (raised as they should) and failed.

A failure prints the call, e.g. ``conv2d(x=float32[1, 3, 3, 2], w=float32[0, 2, 2, 4], b=None,
*) [seed 0]``: the arrays are drawn in argument order from ``np.random.default_rng(seed)``,
standard normal unless their recipe follows the shape (see :class:`Arr`), and the cotangent
from ``np.random.default_rng(seed + 1)``; ``check_call(call)`` runs it again.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import traceback
import warnings
from typing import Any

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import jlayers

DEFAULT_EXAMPLES = 3
EXAMPLES = int(os.environ.get("JLAYERS_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
PROFILE = hypothesis.settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
    phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate), print_blob=False,
    suppress_health_check=(hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large))

CALLS_CHECKED: collections.Counter = collections.Counter()
"""``(op, "valid" | "rejected" | "failed")``: the calls checked in this session."""

FLOATS = ("float32", "bfloat16", "float16", "float64")
NOT_FLOATS = ("int32", "bool", "int8", "uint8", "complex64", "int64")
INTS = ("int32", "int8", "uint8", "int16", "uint32", "int64")
WIDE = ("float64", "int64", "uint64", "complex128")

HALF_PRECISION_EPS = 4
TOLERANCES = {"float64": 1e-9, "float32": 1e-4,
              "bfloat16": HALF_PRECISION_EPS * float(jnp.finfo(jnp.bfloat16).eps),
              "float16": HALF_PRECISION_EPS * float(jnp.finfo(jnp.float16).eps)}
COARSEST_FIRST = ("bfloat16", "float16", "float32", "float64")

# Configuration values a careless user passes. Each op adds the ones that depend on the call.
BAD_COUNTS = (0, -1, 1.5, 2.0, True, "2", None, float("inf"), float("nan"), np.float32(2.0),
              (2,), 10**6)
BAD_PAIRS = (0, -1, (1,), (1, 1, 1), (1, 0), (2, -1), (1.0, 1), ("1", 1), 1.5, True, "2",
             None, (True, 1), float("nan"))
BAD_LAYOUTS = ("nhwc", "NCWH", "HWC", "", None, 1, "NHWC ")
BAD_PADDINGS = ("same", "valid", "FULL", -1, 1.5, None, True, ((1,), (1,)), ((1, 1),),
                ((1, 1), (1, 1), (1, 1)), ((-1, 0), (0, 0)), ((1.0, 1), (1, 1)),
                ((1, 1), "SAME"), float("inf"))
BAD_FLAGS = (1, 0, "True", None, 1.0, np.int64(1))
BAD_EPS = (0, 0.0, -1e-5, float("nan"), float("inf"), -float("inf"), "1e-5", None, True, (1e-5,),
           np.float32(0.0))
POSITIVE_EPS = (1e-5, 1e-3, 1.0, 1e-12, 1, float("inf"), 1e30, np.float32(1e-3))
PRECISIONS = (None, "highest", "default", "HIGH", jax.lax.Precision.HIGHEST,
              ("highest", "default"), ["fastest", jax.lax.Precision.DEFAULT])
BAD_PRECISIONS = ("ultra", 3, True, ("high",), ("high", "ultra"), ("high", "high", "high"),
                  (None, None), jnp.float32)
NOT_ARRAYS = ([1.0, 2.0], "x", None, object())


# --------------------------------------------------------------------------------------------
# Drawn calls: array recipes (materialised from the call's seed) and configuration.


NORMAL = ("normal", 1.0)


@dataclasses.dataclass(frozen=True)
class Arr:
  """An array argument: its dtype, shape and how its values are drawn.

  ``values``: ``("normal", scale)``; ``("ties",)`` small integers, so maxima tie; ``("fill",
  v)`` every entry ``v``; ``("abs", scale)`` non-negative; ``("int", lo, hi)`` integers in
  ``[lo, hi]`` (wrapped into unsigned dtypes); ``("bool", p)`` True with probability ``p``;
  ``("bits",)`` random uint32 words.
  """

  dtype: str
  shape: tuple[int, ...]
  values: tuple = NORMAL

  def __repr__(self):
    text = f"{self.dtype}{list(self.shape)}"
    return text if self.values == NORMAL else f"{text}{list(self.values)}"

  def host(self, rng: np.random.Generator) -> np.ndarray:
    kind, *params = self.values
    if kind == "normal":
      v = params[0] * rng.standard_normal(self.shape)
    elif kind == "abs":
      v = params[0] * np.abs(rng.standard_normal(self.shape))
    elif kind == "ties":
      v = rng.integers(-2, 3, self.shape)
    elif kind == "fill":
      v = np.full(self.shape, params[0])
    elif kind == "int":
      v = rng.integers(params[0], params[1] + 1, self.shape)
    elif kind == "bool":
      v = rng.random(self.shape) < params[0]
    else:
      v = rng.integers(0, 2**32, self.shape, dtype=np.uint32)
    with np.errstate(all="ignore"):
      return np.asarray(v).astype(jnp.dtype(self.dtype))


@dataclasses.dataclass(frozen=True)
class Key:
  """A typed PRNG key (``jax.random.key``), or an array of ``count`` of them."""

  seed: int
  impl: str | None = None
  count: int | None = None

  def __repr__(self):
    impl = f", impl={self.impl!r}" if self.impl else ""
    return (f"key({self.seed}{impl})" if self.count is None
            else f"split(key({self.seed}{impl}), {self.count})")

  def device(self) -> jax.Array:
    key = jax.random.key(self.seed, impl=self.impl)
    return key if self.count is None else jax.random.split(key, self.count)


@dataclasses.dataclass(frozen=True)
class Call:
  """``op(*args, **config)`` with the arrays described by :class:`Arr` and :class:`Key`."""

  op: str
  args: tuple[tuple[str, Any], ...]
  config: tuple[tuple[str, Any], ...]
  seed: int

  def _repr_pretty_(self, printer, cycle):
    printer.text(repr(self))

  def __repr__(self):
    args = ", ".join(f"{name}={value!r}" for name, value in self.args)
    config = "".join(f", {name}={value!r}" for name, value in self.config)
    return f"{self.op}({args}, *{config}) [seed {self.seed}]"

  @property
  def x64(self) -> bool:
    return any(isinstance(v, Arr) and v.dtype in WIDE for _, v in (*self.args, *self.config))

  def host_arrays(self) -> list:
    """The array arguments, positional first, then keyword: NumPy arrays, and :class:`Key`s."""
    rng = np.random.default_rng(self.seed)
    return [v.host(rng) if isinstance(v, Arr) else v
            for _, v in (*self.args, *self.config) if isinstance(v, (Arr, Key))]

  def differentiable(self) -> list[int]:
    """Positions in :meth:`host_arrays` of the floating positional arrays."""
    arrays = [v for _, v in (*self.args, *self.config) if isinstance(v, (Arr, Key))]
    return [i for i, v in enumerate(arrays[:self.positional_arrays])
            if isinstance(v, Arr) and jnp.issubdtype(jnp.dtype(v.dtype), jnp.floating)]

  @property
  def positional_arrays(self) -> int:
    return sum(isinstance(v, (Arr, Key)) for _, v in self.args)

  def apply(self, fn, arrays):
    """``fn`` on the call's arguments, with ``arrays`` (concrete or traced) for its arrays."""
    it = iter(arrays)
    args = [next(it) if isinstance(v, (Arr, Key)) else v for _, v in self.args]
    config = {k: next(it) if isinstance(v, (Arr, Key)) else v for k, v in self.config}
    return fn(*args, **config)

  def float_dtypes(self) -> set[str]:
    return {v.dtype for _, v in self.args
            if isinstance(v, Arr) and v.dtype in TOLERANCES}


def on_device(host: list, widen: bool = False) -> list:
  """:meth:`Call.host_arrays` on the device; with ``widen``, floating arrays in float64 (the
  same values: a bfloat16 array's values are exact in float64)."""
  out = []
  for a in host:
    if isinstance(a, Key):
      out.append(a.device())
    else:
      wide = widen and jnp.issubdtype(a.dtype, jnp.floating)
      out.append(jax.device_put(a.astype(np.float64) if wide else a))
  return out


class Draft:
  """A call under construction: positional arguments in order, then keyword configuration."""

  def __init__(self, op: str, args: dict[str, Any], config: dict[str, Any] | None = None):
    self.op, self.args, self.config = op, dict(args), dict(config or {})

  def get(self, name):
    return self.args[name] if name in self.args else self.config.get(name)

  def set(self, name, value):
    (self.args if name in self.args else self.config)[name] = value

  def call(self, seed: int) -> Call:
    return Call(self.op, tuple(self.args.items()), tuple(self.config.items()), seed)


def weighted_dim(low: int = 0, high: int = 3):
  """A dimension size in ``[low, high]``; 0 (when allowed) one time in ``2 (high - low) + 1``."""
  sizes = [n for n in range(max(low, 1), high + 1)] * 2
  if low == 0:
    sizes.insert(len(sizes) // 2, 0)
  return st.sampled_from(sizes)


def shapes(min_rank: int, max_rank: int, high: int = 3):
  return st.lists(weighted_dim(0, high), min_size=min_rank, max_size=max_rank).map(tuple)


FLOAT = st.sampled_from(FLOATS)
VALUES = st.sampled_from((NORMAL, NORMAL, ("ties",), ("normal", 100.0), ("normal", 0.01),
                          ("fill", 1.0)))


def floats(draw, shape) -> Arr:
  return Arr(draw(FLOAT), tuple(shape), draw(VALUES))


def rarely(draw) -> bool:
  """True about one draw in eight (not for the simplest example)."""
  return draw(st.integers(0, 7)) == 7


def int_or_pair(low: int, high: int):
  n = st.integers(low, high)
  return st.one_of(n, st.tuples(n, n), st.tuples(n, n).map(list))


def pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


# Mistakes: functions ``mistake(draw, draft)`` that break one thing of a valid draft.


def replace(name: str, values):
  """Sets ``name`` (an argument or keyword) to one of ``values``."""
  def mistake(draw, draft):
    draft.set(name, draw(st.sampled_from(values)))
  return mistake


def retype(name: str, dtypes=NOT_FLOATS):
  """Gives the array ``name`` another dtype."""
  def mistake(draw, draft):
    arr = draft.get(name)
    if isinstance(arr, Arr):
      draft.set(name, dataclasses.replace(arr, dtype=draw(st.sampled_from(dtypes))))
  return mistake


def reshape(name: str):
  """Drops, adds or resizes one dimension of the array ``name``."""
  def mistake(draw, draft):
    arr = draft.get(name)
    if not isinstance(arr, Arr):
      return
    shape = list(arr.shape)
    how = draw(st.sampled_from(("add", "drop", "grow")))
    if how == "add" or not shape:
      shape.insert(draw(st.integers(0, len(shape))), draw(st.integers(1, 2)))
    elif how == "drop":
      del shape[draw(st.integers(0, len(shape) - 1))]
    else:
      shape[draw(st.integers(0, len(shape) - 1))] += 1
    draft.set(name, dataclasses.replace(arr, shape=tuple(shape)))
  return mistake


def bad_axes(name: str, ndim: int, tuples: bool = False):
  values = (ndim, -ndim - 1, 100, 1.0, None, "0", True)
  if tuples:
    values += ((), (0, 0), (0, ndim), (0.0,), [0, None], (-1, ndim - 1))
  return replace(name, values)


def finish(draw, draft: Draft, mistakes) -> Call:
  """About half the drafts get one mistake (drawn from ``mistakes``); then the values' seed."""
  if draw(st.booleans()):
    draw(st.sampled_from(mistakes))(draw, draft)
  return draft.call(draw(st.integers(0, 2**16)))


# --------------------------------------------------------------------------------------------
# One strategy per op.


@st.composite
def linear_calls(draw):
  lead, n_in, n_out = draw(shapes(0, 3)), draw(weighted_dim(0, 4)), draw(weighted_dim(0, 4))
  b = floats(draw, (n_out,)) if draw(st.booleans()) else None
  draft = Draft("linear", {"x": floats(draw, (*lead, n_in)), "w": floats(draw, (n_in, n_out)),
                           "b": b})
  if draw(st.booleans()):
    draft.config["precision"] = draw(st.sampled_from(PRECISIONS))
  return finish(draw, draft, (
      retype("x"), retype("w"), retype("b"), reshape("x"), reshape("w"), reshape("b"),
      replace("x", NOT_ARRAYS), replace("w", NOT_ARRAYS), replace("precision", BAD_PRECISIONS),
      replace("x", (Arr("float32", ()),))))


def elementwise_calls(op: str, flag: str | None = None):
  @st.composite
  def calls(draw):
    x = draw(st.sampled_from((2.0, -0.5))) if rarely(draw) else floats(draw, draw(shapes(0, 4)))
    draft = Draft(op, {"x": x})
    mistakes = [retype("x"), replace("x", NOT_ARRAYS)]
    if flag is not None:
      if draw(st.booleans()):
        draft.config[flag] = draw(st.sampled_from((True, False, np.bool_(False))))
      mistakes.append(replace(flag, BAD_FLAGS))
    return finish(draw, draft, mistakes)
  return calls()


@st.composite
def dropout_calls(draw):
  shape = draw(shapes(0, 4))
  key = draw(st.one_of(st.builds(Key, st.integers(0, 9), st.sampled_from((None, "rbg"))),
                       st.just(Arr("uint32", (2,), ("bits",))),
                       st.just(Arr("uint32", (4,), ("bits",)))))
  if draw(st.booleans()):
    rate = draw(st.sampled_from((0.5, 0.0, 1.0, 0.1, 0.99, 1, 0, np.float32(0.25))))
  else:
    # A traced rate is not checked: outside [0, 1] the op documents NaN outputs.
    value = draw(st.sampled_from((0.5, 0.0, 1.0, 0.25, 1.5, -0.5, float("nan"), float("inf"),
                                  1.0 + 2**-20)))
    rate = Arr(draw(FLOAT), (), ("fill", value))
  draft = Draft("dropout", {"x": floats(draw, shape), "key": key}, {"rate": rate})
  if shape and draw(st.booleans()):
    dims = draw(st.lists(st.integers(-len(shape), len(shape) - 1), max_size=len(shape)))
    draft.config["broadcast_dims"] = draw(st.sampled_from((tuple(dims), list(dims))))
  ndim = len(shape)
  return finish(draw, draft, (
      retype("x"), replace("x", NOT_ARRAYS),
      replace("rate", (-0.1, 1.5, float("nan"), float("inf"), -float("inf"), 2, -1, True,
                       "0.5", None, (0.5,))),
      replace("rate", (Arr("float32", (1,), ("fill", 0.5)), Arr("int32", (), ("fill", 0)),
                       Arr("bool", (), ("fill", 0)), Arr("float32", (2, 2), ("fill", 0.5)))),
      replace("key", (Arr("float32", (2,)), Arr("uint32", (3,), ("bits",)),
                      Arr("uint32", (2, 2), ("bits",)), Arr("int32", (2,), ("bits",)),
                      Key(0, count=2), None, 0)),
      replace("broadcast_dims", ((ndim,), (-ndim - 1,), 0, "0", (0.0,), None, [None]))))


@st.composite
def batch_norm_calls(draw, inference: bool):
  op = "batch_norm_inference" if inference else "batch_norm"
  shape = draw(shapes(1, 4))
  ndim = len(shape)
  axis = draw(st.integers(-ndim, ndim - 1))
  c = shape[axis]
  args = {"x": floats(draw, shape), "scale": floats(draw, (c,)), "offset": floats(draw, (c,))}
  if inference:
    var_values = ("abs", 1.0) if not rarely(draw) else draw(
        st.sampled_from((("fill", 0.0), NORMAL, ("fill", float("inf")))))
    args.update(mean=floats(draw, (c,)), var=Arr(draw(FLOAT), (c,), var_values))
  draft = Draft(op, args)
  if axis != -1 or draw(st.booleans()):
    draft.config["axis"] = axis
  if draw(st.booleans()):
    draft.config["eps"] = draw(st.sampled_from(POSITIVE_EPS))
  mistakes = [retype("x"), retype("scale"), retype("offset"), reshape("x"), reshape("scale"),
              reshape("offset"), replace("x", NOT_ARRAYS + (Arr("float32", ()),)),
              bad_axes("axis", ndim), replace("eps", BAD_EPS),
              replace("scale", (None, 1.0))]
  if inference:
    mistakes += [retype("mean"), reshape("var")]
  else:
    mistakes.append(replace("axis_name", ("batch", ["batch"])))
  return finish(draw, draft, mistakes)


def explicit_pads(padding, axis: int) -> tuple[int, int]:
  """``(lo, hi)`` of one spatial axis for ``"VALID"``, an int or pairs (not ``"SAME"``)."""
  if padding == "VALID":
    return (0, 0)
  return (padding, padding) if isinstance(padding, int) else padding[axis]


@st.composite
def conv2d_calls(draw):
  layout = draw(st.sampled_from(("NHWC", "NCHW")))
  groups = draw(st.integers(1, 3))
  c_in, c_out = groups * draw(weighted_dim(0, 2)), groups * draw(weighted_dim(0, 2))
  kernel = (draw(weighted_dim(0, 3)), draw(weighted_dim(0, 3)))
  stride, dilation = draw(int_or_pair(1, 3)), draw(int_or_pair(1, 2))
  pad = st.integers(0, 2)
  padding = draw(st.one_of(st.sampled_from(("SAME", "VALID")), pad,
                           st.tuples(st.tuples(pad, pad), st.tuples(pad, pad))))
  size = []
  for axis, (k, d) in enumerate(zip(kernel, pair(dilation))):
    k_eff = (k - 1) * d + 1
    # The smallest input the padded kernel fits (SAME pads any input of at least 1).
    need = int(k_eff > 0) if padding == "SAME" else k_eff - sum(explicit_pads(padding, axis))
    size.append(max(draw(weighted_dim(0, 4)), need))
  n = draw(weighted_dim(0, 2))
  x_shape = (n, *size, c_in) if layout == "NHWC" else (n, c_in, *size)
  w_shape = ((*kernel, c_in // groups, c_out) if layout == "NHWC"
             else (c_out, c_in // groups, *kernel))
  b = floats(draw, (c_out,)) if draw(st.booleans()) else None
  draft = Draft("conv2d", {"x": floats(draw, x_shape), "w": floats(draw, w_shape), "b": b},
                {"padding": padding})
  for name, value in (("stride", stride), ("dilation", dilation), ("groups", groups)):
    if value != 1 or draw(st.booleans()):
      draft.config[name] = value
  if layout == "NCHW" or draw(st.booleans()):
    draft.config["layout"] = layout
  if rarely(draw):
    draft.config["precision"] = draw(st.sampled_from(PRECISIONS))

  def kernel_too_large(draw, draft):
    k = (size[0] + 1, kernel[1])
    shape = (*k, c_in // groups, c_out) if layout == "NHWC" else (c_out, c_in // groups, *k)
    draft.args["w"] = dataclasses.replace(draft.args["w"], shape=shape)
    draft.config["padding"] = "VALID"

  def other_layout(draw, draft):
    draft.config["layout"] = "NCHW" if layout == "NHWC" else "NHWC"

  return finish(draw, draft, (
      retype("x"), retype("w"), retype("b"), reshape("x"), reshape("w"), reshape("b"),
      replace("x", NOT_ARRAYS), replace("groups", BAD_COUNTS + (groups + 1,)),
      replace("stride", BAD_PAIRS), replace("dilation", BAD_PAIRS),
      replace("padding", BAD_PADDINGS), replace("layout", BAD_LAYOUTS),
      replace("precision", BAD_PRECISIONS), kernel_too_large, other_layout))


@st.composite
def pool_calls(draw, op: str):
  layout = draw(st.sampled_from(("NHWC", "NCHW")))
  # Windows of more than 100 offsets (global pooling) take XLA's native formulation on CPU.
  large = rarely(draw)
  window = (draw(st.integers(10, 12)), 11) if large else draw(int_or_pair(1, 3))
  dilation = draw(int_or_pair(1, 2)) if op == "max_pool2d" and not large else 1
  span = [(k - 1) * d + 1 for k, d in zip(pair(window), pair(dilation))]
  pad = [st.integers(0, s - 1) for s in span]
  padding = draw(st.one_of(st.sampled_from(("VALID", "SAME")), st.integers(0, min(span) - 1),
                           st.tuples(st.tuples(pad[0], pad[0]), st.tuples(pad[1], pad[1]))))
  size = [max(draw(weighted_dim(1, 5)), s) for s in span]
  n, c = draw(weighted_dim(0, 2)), draw(weighted_dim(0, 3))
  if large:
    n, c = min(n, 1), min(c, 2)
  shape = (n, *size, c) if layout == "NHWC" else (n, c, *size)
  draft = Draft(op, {"x": floats(draw, shape), "window": window})
  if draw(st.booleans()):
    draft.config["stride"] = draw(st.one_of(st.none(), int_or_pair(1, 3)))
  if padding != "VALID" or draw(st.booleans()):
    draft.config["padding"] = padding
  if dilation != 1:
    draft.config["dilation"] = dilation
  if draw(st.booleans()):
    draft.config["ceil_mode"] = draw(st.booleans())
  if layout == "NCHW" or draw(st.booleans()):
    draft.config["layout"] = layout
  mistakes = [retype("x"), reshape("x"), replace("x", NOT_ARRAYS),
              replace("window", BAD_PAIRS + (10**6,)), replace("stride", BAD_PAIRS),
              replace("padding", BAD_PADDINGS + (max(span), ((0, 0), (0, span[1])))),
              replace("ceil_mode", BAD_FLAGS), replace("layout", BAD_LAYOUTS)]
  if op == "max_pool2d":
    mistakes.append(replace("dilation", BAD_PAIRS))
  else:
    if draw(st.booleans()):
      draft.config["count_include_pad"] = draw(st.booleans())
    mistakes.append(replace("count_include_pad", BAD_FLAGS))

  def window_larger_than_input(draw, draft):
    draft.args["window"] = (size[0] + 1, pair(window)[1])
    draft.config["padding"] = "VALID"
    draft.config.pop("dilation", None)

  def zero_spatial(draw, draft):
    spatial = draw(st.sampled_from((1, 2) if layout == "NHWC" else (2, 3)))
    shape = list(draft.args["x"].shape)
    shape[spatial] = 0
    draft.args["x"] = dataclasses.replace(draft.args["x"], shape=tuple(shape))

  mistakes += [window_larger_than_input, zero_spatial]
  return finish(draw, draft, mistakes)


def _class_axis(draw, max_rank: int = 3):
  """``(shape, axis value, axis index)`` of logits with ``C >= 1`` classes on the axis."""
  shape = list(draw(shapes(1, max_rank)))
  index = draw(st.integers(0, len(shape) - 1))
  shape[index] = draw(weighted_dim(1, 4))
  axis = draw(st.sampled_from((index, index - len(shape))))
  return tuple(shape), axis, index


def _loss_mask(draw, shape, index):
  examples = shape[:index] + shape[index + 1:]
  return Arr("bool", draw(st.sampled_from((examples, shape))),
             ("bool", draw(st.sampled_from((0.7, 0.0, 1.0)))))


@st.composite
def integer_label_calls(draw):
  op = "softmax_cross_entropy_with_integer_labels"
  shape, axis, index = _class_axis(draw)
  c = shape[index]
  examples = shape[:index] + shape[index + 1:]
  labels = (0, c - 1) if not rarely(draw) else (-1, c)
  draft = Draft(op, {"logits": floats(draw, shape),
                     "labels": Arr(draw(st.sampled_from(INTS)), examples, ("int", *labels))})
  if axis != -1 or draw(st.booleans()):
    draft.config["axis"] = axis
  if draw(st.booleans()):
    draft.config["where"] = _loss_mask(draw, shape, index)
  if draw(st.booleans()):
    draft.config["label_smoothing"] = draw(st.sampled_from((0.1, 0.0, 1.0, 1, 0.5,
                                                            np.float32(0.2))))

  def zero_classes(draw, draft):
    bad = list(shape)
    bad[index] = 0
    draft.args["logits"] = dataclasses.replace(draft.args["logits"], shape=tuple(bad))

  return finish(draw, draft, (
      retype("logits"), retype("labels", FLOATS + ("bool",)), reshape("labels"),
      reshape("logits"), replace("labels", (Arr("int32", shape, ("int", 0, c - 1)), None,
                                            [0, 1])),
      replace("logits", NOT_ARRAYS + (Arr("float32", ()),)), zero_classes,
      bad_axes("axis", len(shape)), retype("where", ("int32", "float32")), reshape("where"),
      replace("label_smoothing", (-0.1, 1.5, float("nan"), float("inf"), "0.1", True, None,
                                  (0.1,)))))


@st.composite
def probability_label_calls(draw):
  shape, axis, index = _class_axis(draw)
  draft = Draft("softmax_cross_entropy",
                {"logits": floats(draw, shape), "labels": floats(draw, shape)})
  if axis != -1 or draw(st.booleans()):
    draft.config["axis"] = axis
  if draw(st.booleans()):
    draft.config["where"] = _loss_mask(draw, shape, index)
  examples = shape[:index] + shape[index + 1:]
  return finish(draw, draft, (
      retype("logits"), retype("labels", NOT_FLOATS), reshape("labels"), reshape("logits"),
      replace("labels", (Arr("int32", examples, ("int", 0, 1)), None)),
      replace("logits", NOT_ARRAYS), bad_axes("axis", len(shape)),
      retype("where", ("int32", "float32")), reshape("where"),
      replace("logits", (Arr("float32", shape[:index] + (0,) + shape[index + 1:]),))))


def _normalised_axes(draw, ndim):
  """An axis or a tuple of distinct axes (negative ones too), and the sorted indices."""
  if draw(st.booleans()):
    index = draw(st.integers(0, ndim - 1))
    return draw(st.sampled_from((index, index - ndim))), (index,)
  indices = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
  axis = [draw(st.sampled_from((i, i - ndim))) for i in indices]
  return draw(st.sampled_from((tuple(axis), list(axis)))), tuple(sorted(indices))


@st.composite
def layer_norm_calls(draw, op: str):
  shape = draw(shapes(1, 4))
  axis, indices = _normalised_axes(draw, len(shape))
  params = tuple(shape[i] for i in indices)
  names = ("scale", "offset") if op == "layer_norm" else ("scale",)
  args = {"x": floats(draw, shape)}
  for name in names:
    args[name] = floats(draw, params) if draw(st.booleans()) else None
  draft = Draft(op, args)
  if axis != -1 or draw(st.booleans()):
    draft.config["axis"] = axis
  if draw(st.booleans()):
    draft.config["eps"] = draw(st.sampled_from(POSITIVE_EPS))
  given_order = tuple(shape[a] for a in (axis if isinstance(axis, (tuple, list)) else (axis,)))
  mistakes = [retype("x"), reshape("x"), replace("x", NOT_ARRAYS + (Arr("float32", ()),)),
              bad_axes("axis", len(shape), tuples=True), replace("eps", BAD_EPS),
              replace("scale", (Arr("float32", given_order), Arr("float32", params + (1,)),
                                Arr("int32", params), 1.0))]
  mistakes += [reshape(name) for name in names]
  return finish(draw, draft, mistakes)


@st.composite
def group_norm_calls(draw):
  shape = list(draw(shapes(1, 3)))
  shape.insert(0, draw(weighted_dim(0, 2)))
  index = draw(st.integers(1, len(shape) - 1))
  groups = draw(st.integers(1, 3))
  shape[index] = groups * draw(weighted_dim(0, 2))
  c, ndim = shape[index], len(shape)
  args = {"x": floats(draw, shape)}
  for name in ("scale", "offset"):
    args[name] = floats(draw, (c,)) if draw(st.booleans()) else None
  draft = Draft("group_norm", args, {"groups": groups})
  axis = draw(st.sampled_from((index, index - ndim)))
  if axis != -1 or draw(st.booleans()):
    draft.config["axis"] = axis
  if draw(st.booleans()):
    draft.config["eps"] = draw(st.sampled_from(POSITIVE_EPS))
  return finish(draw, draft, (
      retype("x"), reshape("x"), reshape("scale"), reshape("offset"), retype("offset"),
      replace("x", NOT_ARRAYS + (Arr("float32", (3,)),)),
      replace("axis", (0, -ndim, ndim, 1.0, None, (1,))),
      replace("groups", BAD_COUNTS + (groups + 1, c + 1)), replace("eps", BAD_EPS)))


@st.composite
def softmax_calls(draw, op: str):
  shape = draw(shapes(1, 4))
  axis, _ = _normalised_axes(draw, len(shape))
  draft = Draft(op, {"x": floats(draw, shape)})
  if axis != -1 or draw(st.booleans()):
    draft.config["axis"] = axis
  if draw(st.booleans()):
    mask_shape = tuple(n if draw(st.booleans()) else 1 for n in shape)
    draft.config["where"] = Arr("bool", mask_shape,
                                ("bool", draw(st.sampled_from((0.7, 0.0, 1.0)))))
  return finish(draw, draft, (
      retype("x"), replace("x", NOT_ARRAYS + (Arr("float32", ()),)),
      bad_axes("axis", len(shape), tuples=True), retype("where", ("int32", "float32")),
      reshape("where"), replace("where", (Arr("bool", shape[:-1]), [True, False]))))


@st.composite
def embedding_calls(draw):
  num, features = draw(weighted_dim(1, 4)), draw(weighted_dim(0, 3))
  bounds = (0, num - 1) if not rarely(draw) else (-2, num + 1)
  if rarely(draw):
    ids = draw(st.integers(-1, num))
  else:
    ids = Arr(draw(st.sampled_from(INTS)), draw(shapes(0, 3)), ("int", *bounds))
  draft = Draft("embedding", {"ids": ids, "table": floats(draw, (num, features))})

  def swapped(draw, draft):
    draft.args["ids"], draft.args["table"] = draft.args["table"], draft.args["ids"]

  return finish(draw, draft, (
      retype("ids", FLOATS + ("bool",)), retype("table"), reshape("table"),
      replace("table", (Arr("float32", (0, features)), Arr("float32", (num,)), None)),
      replace("ids", (None, [0, 1], 1.5)), swapped))


@st.composite
def attention_calls(draw):
  lengths = st.sampled_from((65, 64, 130)) if rarely(draw) else weighted_dim(0, 4)
  b, t, s = draw(weighted_dim(0, 2)), draw(lengths), draw(lengths)
  heads, group, h = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(weighted_dim(0, 3))
  if max(t, s) > 4:
    b, heads, group, h = min(b, 1), 1, draw(st.integers(1, 2)), min(h, 2)
  n = heads * group
  dtype = draw(FLOAT)
  draft = Draft("dot_product_attention", {
      "q": Arr(dtype, (b, t, n, h), draw(VALUES)), "k": Arr(dtype, (b, s, heads, h)),
      "v": Arr(dtype, (b, s, heads, h), draw(VALUES))})
  if draw(st.booleans()):
    full = (b, n, t, s)
    mask_shape = tuple(m if draw(st.booleans()) else 1 for m in full)
    draft.config["mask"] = Arr("bool", mask_shape,
                               ("bool", draw(st.sampled_from((0.7, 0.0, 1.0, 0.3)))))
  if draw(st.booleans()):
    draft.config["causal"] = draw(st.sampled_from((True, False, np.bool_(True))))
  if draw(st.booleans()):
    draft.config["scale"] = draw(st.sampled_from((None, 0.5, 1, 0.0, -1.0, 10.0,
                                                  np.float32(0.3))))
  if draw(st.booleans()):
    draft.config["local_window_size"] = draw(st.sampled_from((0, 1, 3, (2, 0), (0, 1), 200)))
  if draw(st.booleans()):
    draft.config["logits_soft_cap"] = draw(st.sampled_from((0.5, 2.0, 30.0)))
  if draw(st.booleans()):
    draft.config["q_segment_ids"] = Arr("int32", (b, t), ("int", 0, 2))
    if s != t or draw(st.booleans()):
      draft.config["kv_segment_ids"] = Arr("int32", (b, s), ("int", 0, 2))
  if draw(st.booleans()):
    draft.config["key_value_seq_lengths"] = Arr("int32", (b,), ("int", 0, s + 1))
  if draw(st.booleans()):
    draft.config["query_seq_lengths"] = Arr("int32", (b,), ("int", 0, t))
  if draw(st.booleans()):
    full = (b, n, t, s)
    draft.config["bias"] = Arr(dtype, tuple(m if draw(st.booleans()) else 1 for m in full))
  if draw(st.booleans()):
    draft.config["sinks"] = Arr(dtype, (n,))
  if draw(st.booleans()):
    draft.config["return_residual"] = True

  def other_dtype(draw, draft):
    name = draw(st.sampled_from(("k", "v")))
    others = tuple(f for f in FLOATS if f != dtype) + NOT_FLOATS
    draft.args[name] = dataclasses.replace(draft.args[name], dtype=draw(st.sampled_from(others)))

  def kv_heads(draw, draft):
    bad = draw(st.sampled_from((0, n + 1)))
    for name in ("k", "v"):
      shape = list(draft.args[name].shape)
      shape[2] = bad
      draft.args[name] = dataclasses.replace(draft.args[name], shape=tuple(shape))

  return finish(draw, draft, (
      retype("q"), other_dtype, kv_heads, reshape("q"), reshape("k"), reshape("v"),
      replace("q", NOT_ARRAYS), retype("mask", ("int32", "float32")), reshape("mask"),
      replace("causal", BAD_FLAGS), replace("scale", (float("inf"), float("nan"), "1", True,
                                                      (1.0,))),
      replace("local_window_size", (-1, (1,), (1, 2, 3), 1.5, (0, -2), "3")),
      replace("logits_soft_cap", (0.0, -1.0, float("nan"), float("inf"), "2")),
      reshape("q_segment_ids"), retype("q_segment_ids", FLOATS), reshape("kv_segment_ids"),
      reshape("key_value_seq_lengths"), retype("query_seq_lengths", FLOATS + ("bool",)),
      reshape("bias"), retype("bias", ("int32", "bool")), reshape("sinks"),
      replace("return_residual", BAD_FLAGS)))


@st.composite
def rotary_calls(draw):
  b, t, n = draw(weighted_dim(0, 2)), draw(weighted_dim(0, 3)), draw(weighted_dim(0, 2))
  config = {}
  if draw(st.booleans()):  # rotate the first 2·half features of a longer head
    half = draw(weighted_dim(1, 3))
    h = 2 * half + draw(st.integers(0, 3))
    config["rotary_dim"] = 2 * half
  else:
    half = draw(weighted_dim(0, 3))
    h = 2 * half
  lead = (b, t) if draw(st.booleans()) else (t,)
  bounds = (0, 300) if not rarely(draw) else (-2**20, 2**20)
  draft = Draft("rotary_embedding", {
      "x": floats(draw, (b, t, n, h)),
      "positions": Arr(draw(st.sampled_from(INTS)), lead, ("int", *bounds))}, config)
  if draw(st.booleans()):
    draft.config["interleaved"] = draw(st.sampled_from((True, False, np.bool_(True))))
  if draw(st.booleans()):
    draft.config["base"] = draw(st.sampled_from((10000.0, 500, 1.0, 0.5, 1e6, np.float32(10.0))))
  if draw(st.booleans()):
    draft.config["frequencies"] = Arr(draw(FLOAT), (half,), draw(VALUES))
  return finish(draw, draft, (
      retype("x"), reshape("x"), replace("x", NOT_ARRAYS + (Arr("float32", (t, n, h)),)),
      retype("positions", FLOATS + ("bool",)), reshape("positions"),
      replace("positions", ([0, 1], None, 1.5, 2, Arr("int32", (t, b)))),
      replace("rotary_dim", BAD_COUNTS + (h + 1, h + 2, 2 * half - 1)),
      replace("base", BAD_EPS), replace("interleaved", BAD_FLAGS),
      retype("frequencies", NOT_FLOATS), reshape("frequencies"),
      replace("frequencies", ([1.0], "f", Arr("float32", (half, 1))))))


def gated_calls(op: str, flag: str | None = None):
  @st.composite
  def calls(draw):
    if rarely(draw):
      gate, up = draw(st.sampled_from((2.0, -0.5))), draw(st.sampled_from((1.5, -3.0)))
    else:
      shape, dtype = draw(shapes(0, 4)), draw(FLOAT)
      gate, up = Arr(dtype, shape, draw(VALUES)), Arr(dtype, shape, draw(VALUES))
    draft = Draft(op, {"gate": gate, "up": up})
    mistakes = [retype("gate"), retype("up"), reshape("gate"), reshape("up"),
                retype("up", FLOATS), replace("up", NOT_ARRAYS), replace("gate", (1, True))]
    if flag is not None:
      if draw(st.booleans()):
        draft.config[flag] = draw(st.sampled_from((True, False, np.bool_(False))))
      mistakes.append(replace(flag, BAD_FLAGS))

    def broadcastable(draw, draft):
      if isinstance(draft.args["up"], Arr):
        draft.args["up"] = dataclasses.replace(draft.args["up"],
                                               shape=(1,) * len(draft.args["up"].shape))
    return finish(draw, draft, (*mistakes, broadcastable))
  return calls()


@st.composite
def linear_cross_entropy_calls(draw):
  lead, h, v = draw(shapes(0, 2)), draw(weighted_dim(0, 3)), draw(weighted_dim(1, 4))
  labels = (0, v - 1) if not rarely(draw) else (-1, v)
  draft = Draft("linear_cross_entropy", {
      "x": floats(draw, (*lead, h)), "w": floats(draw, (h, v)),
      "labels": Arr(draw(st.sampled_from(INTS)), lead, ("int", *labels))})
  if draw(st.booleans()):
    draft.config["where"] = Arr("bool", lead, ("bool", draw(st.sampled_from((0.7, 0.0, 1.0)))))
  options = (("label_smoothing", (0.1, 0.0, 1.0, 1, np.float32(0.5))),
             ("z_loss", (1e-4, 0.0, 0.5, 2)), ("logits_soft_cap", (None, 2.0, 30, 0.5)),
             ("reduction", ("none", "mean", "sum")))
  for name, values in options:
    if draw(st.booleans()):
      draft.config[name] = draw(st.sampled_from(values))
  return finish(draw, draft, (
      retype("x"), retype("w"), retype("labels", FLOATS + ("bool",)), reshape("x"),
      reshape("w"), reshape("labels"), replace("x", NOT_ARRAYS + (Arr("float32", ()),)),
      replace("w", (Arr("float32", (h, 0)), Arr("float32", (h,)), None)),
      replace("labels", (None, [0, 1], 1.5)), retype("where", ("int32", "float32")),
      reshape("where"), replace("label_smoothing", (-0.1, 1.5, float("nan"), "0.1", None)),
      replace("z_loss", (-1.0, float("inf"), float("nan"), "0", None, True)),
      replace("logits_soft_cap", (0, -1.0, float("inf"), float("nan"), "2", True)),
      replace("reduction", ("avg", None, "Mean", 0, "", ("mean",)))))


CALLS = {
    "linear": linear_calls(),
    "linear_cross_entropy": linear_cross_entropy_calls(),
    "relu": elementwise_calls("relu"),
    "gelu": elementwise_calls("gelu", "approximate"),
    "silu": elementwise_calls("silu"),
    "swiglu": gated_calls("swiglu"),
    "geglu": gated_calls("geglu", "approximate"),
    "rotary_embedding": rotary_calls(),
    "dropout": dropout_calls(),
    "batch_norm": batch_norm_calls(inference=False),
    "batch_norm_inference": batch_norm_calls(inference=True),
    "conv2d": conv2d_calls(),
    "max_pool2d": pool_calls("max_pool2d"),
    "avg_pool2d": pool_calls("avg_pool2d"),
    "softmax_cross_entropy_with_integer_labels": integer_label_calls(),
    "softmax_cross_entropy": probability_label_calls(),
    "layer_norm": layer_norm_calls("layer_norm"),
    "rms_norm": layer_norm_calls("rms_norm"),
    "group_norm": group_norm_calls(),
    "softmax": softmax_calls("softmax"),
    "log_softmax": softmax_calls("log_softmax"),
    "embedding": embedding_calls(),
    "dot_product_attention": attention_calls(),
}


# Calls that exposed a defect when this module was written, one per kind: checked in every
# profile, so that each stays fixed (a strategy finds them only now and then).
F32 = "float32"
REGRESSIONS = {
    "conv2d-empty-kernel": Call("conv2d", (("x", Arr(F32, (1, 3, 3, 2))),
                                           ("w", Arr(F32, (0, 2, 2, 4))), ("b", None)), (), 0),
    "avg_pool2d-empty-batch": Call("avg_pool2d", (("x", Arr(F32, (0, 4, 4, 3))), ("window", 2)),
                                   (), 0),
    "attention-head-size-0": Call("dot_product_attention", (
        ("q", Arr(F32, (1, 2, 1, 0))), ("k", Arr(F32, (1, 3, 1, 0))),
        ("v", Arr(F32, (1, 3, 1, 0)))), (), 0),
    "batch_norm-unbound-axis_name": Call("batch_norm", (
        ("x", Arr(F32, (2, 3))), ("scale", Arr(F32, (3,))), ("offset", Arr(F32, (3,)))),
        (("axis_name", "batch"),), 0),
    "batch_norm-eps-inf": Call("batch_norm", (
        ("x", Arr(F32, (4, 3))), ("scale", Arr(F32, (3,))), ("offset", Arr(F32, (3,)))),
        (("eps", float("inf")),), 0),
    "batch_norm-float16-huge-eps": Call("batch_norm", (
        ("x", Arr("float16", (4, 3))), ("scale", Arr(F32, (3,))), ("offset", Arr(F32, (3,)))),
        (("eps", 1e30),), 0),
    "dropout-array-rate-above-1": Call("dropout", (("x", Arr(F32, (3,))), ("key", Key(0))),
                                       (("rate", Arr(F32, (), ("fill", 1.5))),), 0),
    "attention-float16-large-scores": Call("dot_product_attention", (
        ("q", Arr("float16", (1, 4, 1, 2), ("normal", 100.0))),
        ("k", Arr("float16", (1, 4, 1, 2))),
        ("v", Arr("float16", (1, 4, 1, 2), ("normal", 100.0)))), (), 0),
    "group_norm-empty-spatial-axis": Call("group_norm", (
        ("x", Arr(F32, (1, 2, 0))), ("scale", Arr(F32, (2,))), ("offset", Arr(F32, (2,)))),
        (("groups", 1), ("axis", 1)), 0),
}


# --------------------------------------------------------------------------------------------
# Running a call and checking the properties.


@dataclasses.dataclass
class Outcome:
  """What a thunk returned, or the exception it raised."""

  value: Any = None
  error: Exception | None = None


def attempt(thunk) -> Outcome:
  try:
    return Outcome(value=jax.block_until_ready(thunk()))
  except Exception as error:  # noqa: BLE001 - every exception is judged by the properties
    return Outcome(error=error)


def describe(error: Exception) -> str:
  """The exception with the innermost frames of its traceback (where it came from)."""
  frames = traceback.extract_tb(error.__traceback__)[-4:]
  where = "".join(f"\n      {f.filename}:{f.lineno} in {f.name}" for f in frames)
  return f"{type(error).__name__}: {str(error)[:400]}{where}"


def rejection_problem(op: str, where: str, error: Exception) -> str | None:
  """None for the error a bad call must raise: ``ValueError``/``TypeError`` naming the op."""
  if isinstance(error, (ValueError, TypeError)) and str(error).startswith(f"{op}:"):
    return None
  return f"{where} raised {describe(error)}"


def vjp_of(fn, call: Call):
  """``(arrays, cotangent) -> (output, gradients)``: ``jax.vjp`` of ``fn`` for ``call`` with
  respect to its floating positional arrays."""
  diff = call.differentiable()

  def run(arrays, cot):
    def restricted(*primals):
      full = list(arrays)
      for i, p in zip(diff, primals):
        full[i] = p
      return call.apply(fn, full)
    out, pullback = jax.vjp(restricted, *(arrays[i] for i in diff))
    return out, pullback(cot)

  return run


def random_cotangent(seed: int, like):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype)), like)


def tolerance(dtype, call: Call) -> float:
  names = {str(jnp.dtype(dtype))} | call.float_dtypes()
  return TOLERANCES[next(d for d in COARSEST_FIRST if d in names)]


def largest_finite(tree) -> float:
  """The largest finite ``|entry|`` of the floating leaves of ``tree`` (0 if none)."""
  largest = 0.0
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.asarray(leaf)
    if jnp.issubdtype(a.dtype, jnp.floating) and a.size:
      a = np.abs(a.astype(np.float64))
      largest = max(largest, float(np.max(a, where=np.isfinite(a), initial=0.0)))
  return largest


def mismatch(label: str, got, want, call: Call, floor: float, noise: float) -> str | None:
  """None if ``got`` agrees with the reference ``want``, else what differs.

  Shapes, dtypes and the places of NaN, +inf and -inf must be equal, and the finite entries
  within ``tol · scale + 2 · noise``: ``tol`` that of the coarsest float dtype of the array and
  the call, ``scale`` the largest finite ``|want|`` entry floored at ``floor``, ``noise`` the
  twin's own rounding error.
  """
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape or got.dtype != want.dtype:
    return f"{label}: {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
  if not jnp.issubdtype(want.dtype, jnp.floating) or not want.size:
    return None if np.array_equal(got, want) else f"{label}: values differ"
  g, w = got.astype(np.float64), want.astype(np.float64)

  def kind(a):
    return np.select([np.isnan(a), a == np.inf, a == -np.inf], [1, 2, 3], 0)

  differs = kind(g) != kind(w)
  if differs.any():
    at = np.unravel_index(np.argmax(differs), g.shape)
    return (f"{label}: NaN/inf at {int(differs.sum())} of {g.size} entries differ, e.g. "
            f"at {tuple(map(int, at))}: {g[at]} where the reference has {w[at]}")
  scale = max(largest_finite(want), floor, float(jnp.finfo(want.dtype).tiny))
  tol = tolerance(want.dtype, call)
  with np.errstate(invalid="ignore", over="ignore"):
    error = np.where(kind(w) == 0, np.abs(g - w), 0.0)
  if np.max(error) <= tol * scale + 2 * noise:
    return None
  at = np.unravel_index(np.argmax(error), g.shape)
  return (f"{label}: relative error {np.max(error) / scale:.2e} > {tol:.1e} (of scale "
          f"{scale:.3g}; the twin's rounding error is {noise:.2g}), e.g. at "
          f"{tuple(map(int, at))}: {g[at]!r} where the reference has {w[at]!r}")


def tree_mismatches(label: str, got, want, call: Call, *, floor: float = 0.0,
                    noise=None) -> list[str]:
  """:func:`mismatch` leaf by leaf. Each leaf's scale is floored at the largest entry of all
  the reference's leaves and at ``floor``: where the exact answer is 0 (a gradient through a
  softmax over one key, a group of two elements) both sides hold rounding noise, small against
  the terms that cancel, not against 0. ``noise`` (see :func:`twin_rounding`) allows
  ill-conditioned values as much error as the twin's own rounding makes."""
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  if got_tree != want_tree:
    return [f"{label}: structure {got_tree}, expected {want_tree}"]
  noise = [0.0] * len(want_leaves) if noise is None else noise
  many, floor = len(want_leaves) > 1, max(floor, largest_finite(want_leaves))
  found = (mismatch(f"{label}[{i}]" if many else label, g, w, call, floor, n)
           for i, (g, w, n) in enumerate(zip(got_leaves, want_leaves, noise)))
  return [m for m in found if m]


def twin_rounding(twin, truth) -> list[float] | None:
  """Per leaf, the largest ``|twin - truth|`` where both are finite: the twin's own rounding
  error, with ``truth`` the twin in float64 on the same values (None: no such run)."""
  if truth is None:
    return None
  errors = []
  for v, t in zip(jax.tree_util.tree_leaves(twin), jax.tree_util.tree_leaves(truth)):
    v, t = np.asarray(v).astype(np.float64), np.asarray(t).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
      errors.append(float(np.max(np.abs(v - t), where=np.isfinite(v) & np.isfinite(t),
                                 initial=0.0)))
  return errors


def gradient_dtype_problems(label: str, grads, arrays, call: Call) -> list[str]:
  problems = []
  for i, g in zip(call.differentiable(), grads):
    a = arrays[i]
    if g.shape != a.shape or g.dtype != a.dtype:
      problems.append(f"{label} of array argument {i}: {g.dtype}{list(g.shape)} for an input "
                      f"{a.dtype}{list(a.shape)}")
  return problems


def rejection_problems(call: Call, impls, arrays, eager) -> list[str]:
  """Properties 1 to 3 for a call that raised eagerly (in one implementation at least)."""
  problems = [rejection_problem(call.op, f"{name} (eager)", o.error)
              for name, o in eager.items() if o.error is not None]
  problems = [p for p in problems if p]
  problems += [f"{name} (eager) returned where the other raised"
               for name, o in eager.items() if o.error is None]
  if problems:
    return problems
  if type(eager["manual"].error) is not type(eager["twin"].error):
    problems.append(f"manual and twin raise different errors: {eager['manual'].error!r} and "
                    f"{eager['twin'].error!r}")
  for name, fn in impls.items():
    jitted = attempt(lambda fn=fn: jax.jit(lambda a: call.apply(fn, a))(arrays))
    if jitted.error is None:
      problems.append(f"{name} under jit returned where the eager call raised")
    elif type(jitted.error) is not type(eager[name].error):
      problems.append(f"{name} under jit raised {describe(jitted.error)} where the eager call "
                      f"raised {type(eager[name].error).__name__}")
  return problems


def valid_call_problems(call: Call, impls, host, arrays, eager) -> list[str]:
  """Properties 2, 4 and 5 for a call that both implementations ran eagerly.

  The reference is the twin: its eager forward, and its VJP under jit (the twin is plain
  ``jnp``, so its own eager VJP would only test JAX, at the price of one compile per
  primitive). The manual op's forward and VJP run eagerly and under jit, the twin's forward
  under jit too, and all are compared with the reference. Gradient scales are floored at the
  cotangent's largest entry. Below float64, the twin also runs in float64 on the same values,
  which measures its own rounding error.
  """
  reference = eager["twin"].value
  cot = random_cotangent(call.seed + 1, reference)
  manual_vjp, twin_vjp = vjp_of(impls["manual"], call), vjp_of(impls["twin"], call)

  def jitted(fn, run, arrays, cot):
    return jax.jit(lambda a, c: (call.apply(fn, a), run(a, c)))(arrays, cot)

  runs = {
      "manual VJP (eager)": attempt(lambda: manual_vjp(arrays, cot)),
      "manual forward and VJP (jit)": attempt(
          lambda: jitted(impls["manual"], manual_vjp, arrays, cot)),
      "twin forward and VJP (jit)": attempt(
          lambda: jitted(impls["twin"], twin_vjp, arrays, cot)),
  }
  if any(jnp.dtype(a.dtype).itemsize < 8 for a in host
         if not isinstance(a, Key) and jnp.issubdtype(a.dtype, jnp.floating)):
    with jax.enable_x64(True):
      wide_cot = jax.tree_util.tree_map(lambda c: jax.device_put(np.asarray(c, np.float64)), cot)
      runs["twin forward and VJP in float64 (jit)"] = attempt(
          lambda: jitted(impls["twin"], twin_vjp, on_device(host, widen=True), wide_cot))
  problems = [f"{what} raised {describe(o.error)} on a call that runs eagerly"
              for what, o in runs.items() if o.error is not None]
  if any(o.error is not None for o in runs.values()):
    return problems + tree_mismatches("manual forward (eager)", eager["manual"].value,
                                      reference, call)
  out, manual_grads = runs["manual VJP (eager)"].value
  (manual_plain, (manual_out, manual_jit_grads)) = runs["manual forward and VJP (jit)"].value
  (twin_plain, (twin_out, twin_grads)) = runs["twin forward and VJP (jit)"].value
  truth_out = truth_grads = None
  if "twin forward and VJP in float64 (jit)" in runs:
    (truth_out, (_, truth_grads)) = runs["twin forward and VJP in float64 (jit)"].value
  noise = twin_rounding(reference, truth_out)
  for label, value in (("manual forward (eager)", eager["manual"].value),
                       ("manual forward in jax.vjp (eager)", out),
                       ("manual forward (jit)", manual_plain),
                       ("manual forward in jax.vjp (jit)", manual_out),
                       ("twin forward (jit)", twin_plain),
                       ("twin forward in jax.vjp (jit)", twin_out)):
    problems += tree_mismatches(label, value, reference, call, noise=noise)
  for label, grads in (("manual gradient (eager)", manual_grads),
                       ("manual gradient (jit)", manual_jit_grads),
                       ("twin gradient (jit)", twin_grads)):
    problems += gradient_dtype_problems(label, grads, arrays, call)
  floor, noise = largest_finite(cot), twin_rounding(twin_grads, truth_grads)
  problems += tree_mismatches("manual gradients (eager), against the twin's", manual_grads,
                              twin_grads, call, floor=floor, noise=noise)
  problems += tree_mismatches("manual gradients (jit), against eager", manual_jit_grads,
                              manual_grads, call, floor=floor, noise=noise)
  return problems


def check_call(call: Call) -> str:
  """Checks the five properties for one call; returns ``"valid"`` or ``"rejected"``."""
  entry = jlayers.registered_ops()[call.op]
  impls = {"manual": entry.manual, "twin": entry.reference}
  host = call.host_arrays()
  with warnings.catch_warnings(), jax.enable_x64(call.x64):
    warnings.simplefilter("error")
    arrays = on_device(host)
    eager = {name: attempt(lambda fn=fn: call.apply(fn, arrays)) for name, fn in impls.items()}
    if any(o.error is not None for o in eager.values()):
      problems = rejection_problems(call, impls, arrays, eager)
    else:
      problems = valid_call_problems(call, impls, host, arrays, eager)
  assert not problems, report(call, problems)
  return "valid" if all(o.error is None for o in eager.values()) else "rejected"


def report(call: Call, problems: list[str]) -> str:
  lines = "\n".join(f"  - {p}" for p in problems)
  return f"{call}\n{lines}"


# --------------------------------------------------------------------------------------------
# Tests.


def test_every_registered_op_has_a_strategy():
  assert set(CALLS) == set(jlayers.registered_ops()), (
      "ops without a strategy (or strategies without an op): "
      f"{sorted(set(CALLS) ^ set(jlayers.registered_ops()))}")


@pytest.fixture(scope="module", autouse=True)
def calls_checked_summary(request):
  """At the end of the module, one line per op with the calls checked (and a total)."""
  yield
  plugins = request.config.pluginmanager
  reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
  if reporter is None or capture is None or not CALLS_CHECKED:
    return
  lines = [""]
  for op in sorted({op for op, _ in CALLS_CHECKED}):
    counts = {kind: CALLS_CHECKED[op, kind] for kind in ("valid", "rejected", "failed")}
    lines.append(f"fuzz {op}: {sum(counts.values())} calls: "
                 + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
  lines.append(f"fuzz: {sum(CALLS_CHECKED.values())} calls checked in all, up to {EXAMPLES} "
               "per op")
  with capture.global_and_fixture_disabled():
    for line in lines:
      reporter.write_line(line)


def count_and_check(call: Call):
  try:
    outcome = check_call(call)
  except AssertionError:
    CALLS_CHECKED[call.op, "failed"] += 1
    raise
  CALLS_CHECKED[call.op, outcome] += 1


@pytest.mark.parametrize("op", sorted(CALLS))
@PROFILE
@hypothesis.given(data=st.data())
def test_op_agrees_with_its_twin(op, data):
  count_and_check(data.draw(CALLS[op], label="call"))


@pytest.mark.parametrize("call", REGRESSIONS.values(), ids=REGRESSIONS.keys())
def test_calls_that_exposed_defects(call):
  count_and_check(call)
