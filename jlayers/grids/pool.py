"""Grids for ``max_pool2d`` and ``avg_pool2d``: window × stride × padding (27 cases each), plus
``int`` padding and strides beyond the window; for the average also ``count_include_pad=False``
on cases whose windows reach into the padding; ``ceil_mode`` with and without padding (for the
average with both divisors) and, for the maximum, dilated windows: overlapping, disjoint, with
one phase or several per axis (see ``jlayers.pool._max_by_phases``) (38 and 42 cases).

Tiny shapes: batch 2, 3 channels, spatial sizes cycling through 5×6, 6×7, 7×5 (odd and even),
layout alternating NHWC / NCHW. Max-pool inputs are distinct values at least ``2 / size``
apart, so no window holds a tie and finite differences stay off the kinks; ties have their
own tests.
"""

import itertools

import jax.numpy as jnp
import numpy as np

from jlayers.pool import avg_pool2d_op, max_pool2d_op
from jlayers.testing import MESH_BATCH, Case, Grid, normal

_C = 3
_WINDOWS = (("w2", 2), ("w3", 3), ("w2x3", (2, 3)))
_STRIDES = (("sw", None), ("s1", 1), ("s2", 2))
_PADDINGS = (("valid", "VALID"), ("same", "SAME"), ("asym", ((1, 0), (0, 1))))
_SIZES = ((5, 6), (6, 7), (7, 5))
_LAYOUTS = ("NHWC", "NCHW")


def distinct(rng: np.random.Generator, shape, dtype):
  """A random permutation of evenly spaced values in [-2, 2), jittered by under half a step."""
  size = int(np.prod(shape))
  v = (rng.permutation(size) + rng.uniform(0.25, 0.75, size)) * (4.0 / size) - 2.0
  return jnp.asarray(v.reshape(shape), dtype=dtype)


def _case(draw, window, stride, padding, size, layout, batch=2, **extra):
  (w_id, w), (s_id, s), (p_id, p), (h, wd) = window, stride, padding, size
  shape = (batch, h, wd, _C) if layout == "NHWC" else (batch, _C, h, wd)
  dilation = extra.get("dilation", 1)
  suffix = "".join((
      f"-d{'x'.join(map(str, dilation)) if isinstance(dilation, tuple) else dilation}"
      if dilation != 1 else "",
      "-ceil" if extra.get("ceil_mode") else "",
      "-nopadcount" if extra.get("count_include_pad") is False else ""))
  case_id = f"{w_id}-{s_id}-{p_id}-{layout.lower()}-{h}x{wd}{suffix}"
  if batch != 2:
    case_id = f"batch{batch}-{case_id}"
  return Case(case_id, lambda rng, dtype: (draw(rng, shape, dtype),),
              dict(window=w, stride=s, padding=p, layout=layout, **extra))


def _grid(draw):
  for i, (w, s, p) in enumerate(itertools.product(_WINDOWS, _STRIDES, _PADDINGS)):
    yield _case(draw, w, s, p, _SIZES[i % 3], _LAYOUTS[i % 2])
  # int padding (both sides), and strides larger than the window (rows no window reaches)
  yield _case(draw, _WINDOWS[1], _STRIDES[2], ("pad1", 1), (6, 6), "NHWC")
  yield _case(draw, _WINDOWS[2], _STRIDES[1], ("pad1", 1), (5, 7), "NCHW")
  yield _case(draw, _WINDOWS[0], ("s3", 3), _PADDINGS[2], (7, 7), "NCHW")
  yield _case(draw, _WINDOWS[2], ("s3x4", (3, 4)), _PADDINGS[0], (6, 7), "NHWC")


_NO_PAD_COUNT = (  # count_include_pad=False on cases whose windows reach into the padding
    (_WINDOWS[1], _STRIDES[1], _PADDINGS[1], (5, 6), "NHWC"),
    (_WINDOWS[1], _STRIDES[2], _PADDINGS[1], (6, 7), "NCHW"),
    (_WINDOWS[2], _STRIDES[0], _PADDINGS[2], (7, 5), "NHWC"),
    (_WINDOWS[0], _STRIDES[1], _PADDINGS[2], (6, 6), "NCHW"),
    (_WINDOWS[2], _STRIDES[2], ("pad1", 1), (5, 7), "NHWC"),
    (_WINDOWS[0], _STRIDES[0], _PADDINGS[1], (7, 7), "NCHW"),
)


_CEIL = (  # ceil_mode: sizes where rounding up adds a window, with and without padding
    (_WINDOWS[0], _STRIDES[0], _PADDINGS[0], (5, 7), "NHWC"),
    (_WINDOWS[1], _STRIDES[2], ("pad1", 1), (6, 6), "NCHW"),
    (_WINDOWS[2], _STRIDES[2], _PADDINGS[2], (6, 6), "NHWC"),
)

_DILATED = (  # max_pool2d only: one phase or several per axis, overlapping or disjoint windows
    (_WINDOWS[0], _STRIDES[1], _PADDINGS[0], (6, 7), "NHWC", dict(dilation=2)),
    (_WINDOWS[1], _STRIDES[2], _PADDINGS[1], (7, 6), "NCHW", dict(dilation=(2, 3))),
    (_WINDOWS[0], ("s3", 3), _PADDINGS[2], (7, 8), "NCHW", dict(dilation=2)),  # disjoint
    (_WINDOWS[2], _STRIDES[0], _PADDINGS[2], (7, 8), "NHWC", dict(dilation=(3, 2),
                                                                  ceil_mode=True)),
)


def _ceil_and_dilated(draw, *, dilated: bool, **extra):
  for window, stride, padding, size, layout in _CEIL:
    if padding[1] == "VALID" and extra.get("count_include_pad") is False:
      continue  # without padding, both divisors count the same elements
    yield _case(draw, window, stride, padding, size, layout, ceil_mode=True, **extra)
  if dilated:
    for *c, kwargs in _DILATED:
      yield _case(draw, *c, **kwargs)


def _mesh(draw):
  return (_case(draw, _WINDOWS[0], _STRIDES[0], _PADDINGS[0], (6, 6), "NHWC", batch=MESH_BATCH),
          _case(draw, _WINDOWS[1], _STRIDES[1], _PADDINGS[1], (5, 6), "NCHW", batch=MESH_BATCH))


def _bench(draw):
  return (*(Case(f"{'x'.join(map(str, s))}-w2", lambda rng, dtype, s=s: (draw(rng, s, dtype),),
                 dict(window=2)) for s in ((128, 28, 28, 32), (128, 14, 14, 64))),
          Case("128x28x28x32-global", lambda rng, dtype: (draw(rng, (128, 28, 28, 32), dtype),),
               dict(window=28)))


GRIDS = [
    Grid(
        max_pool2d_op,
        (*_grid(distinct), *_ceil_and_dilated(distinct, dilated=True)),
        representative=("w3-s1-same-nchw-6x7", "w2x3-sw-asym-nhwc-7x5",
                        "w2x3-sw-asym-nhwc-7x8-d3x2-ceil"),
        bench=_bench(distinct),
        mesh=(*_mesh(distinct),  # and dilated in several phases per axis, with ceil_mode
              _case(distinct, *_DILATED[-1][:-1], batch=MESH_BATCH, **_DILATED[-1][-1])),
        platform_dependent=True,
    ),
    Grid(
        avg_pool2d_op,
        (*_grid(normal),
         *(_case(normal, *c, count_include_pad=False) for c in _NO_PAD_COUNT),
         *_ceil_and_dilated(normal, dilated=False),
         *_ceil_and_dilated(normal, dilated=False, count_include_pad=False)),
        representative=("w3-s2-same-nchw-6x7-nopadcount", "w2x3-sw-asym-nhwc-7x5",
                        "w3-s2-pad1-nchw-6x6-ceil"),
        bench=_bench(normal),
        mesh=_mesh(normal),
        platform_dependent=True,
    ),
]
