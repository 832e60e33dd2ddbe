"""Grid for ``conv2d``: stride × padding × dilation × groups × layout × spatial size (144 cases).

Tiny shapes: batch 2, 4 input channels; odd cases are 5×5 with a 3×3 kernel, even cases 6×4
with a non-square 3×2 kernel. Bias is on for half of the grid, spread over every axis.
"""

import itertools

from jlayers.conv import conv2d_op
from jlayers.testing import MESH_BATCH, Case, Grid, Layout, normal

_C = 4
_STRIDES = (1, 2)
_PADDINGS = (("same", "SAME"), ("valid", "VALID"), ("asym", ((1, 0), (0, 2))))
_DILATIONS = (1, 2)
_GROUPS = (("g1", 1), ("g2", 2), ("dw", _C))
_LAYOUTS = ("NHWC", "NCHW")
_SIZES = (("odd", (5, 5), (3, 3)), ("even", (6, 4), (3, 2)))


def _case(stride, pad, dilation, group, layout, size, bias):
  (pad_id, padding), (group_id, groups), (size_id, (h, w), (kh, kw)) = pad, group, size
  out = 4 if group_id == "dw" and size_id == "odd" else (8 if group_id == "dw" else 6)

  def make(rng, dtype):
    if layout == "NHWC":
      x_shape, w_shape = (2, h, w, _C), (kh, kw, _C // groups, out)
    else:
      x_shape, w_shape = (2, _C, h, w), (out, _C // groups, kh, kw)
    args = (normal(rng, x_shape, dtype), normal(rng, w_shape, dtype, scale=0.5))
    return (*args, normal(rng, (out,), dtype)) if bias else args

  case_id = (f"s{stride}-{pad_id}-d{dilation}-{group_id}-{layout.lower()}-{size_id}-"
             f"{'bias' if bias else 'nobias'}")
  kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, layout=layout)
  return Case(case_id, make, kwargs, diff=(0, 1, 2) if bias else (0, 1))


def _grid():
  axes = (_STRIDES, _PADDINGS, _DILATIONS, _GROUPS, _LAYOUTS, _SIZES)
  for index in itertools.product(*(range(len(a)) for a in axes)):
    values = [a[i] for a, i in zip(axes, index)]
    yield _case(*values, bias=sum(index) % 2 == 0)


def _sized(name, batch, size, layout, groups, stride, w_scale, out=6):
  """Batch ``batch`` of ``size``×``size``×4 images, a 3×3 kernel to ``out`` channels, with
  bias."""
  def make(rng, dtype):
    x_shape = (batch, size, size, 4) if layout == "NHWC" else (batch, 4, size, size)
    w_shape = (3, 3, 4 // groups, out) if layout == "NHWC" else (out, 4 // groups, 3, 3)
    return (normal(rng, x_shape, dtype), normal(rng, w_shape, dtype, scale=w_scale),
            normal(rng, (out,), dtype))
  return Case(f"{name}-g{groups}-s{stride}-{layout.lower()}", make,
              dict(stride=stride, groups=groups, layout=layout), diff=(0, 1, 2))


def _large(batch, layout, groups):
  """Images large enough that the CPU patch loop runs several chunks of several images (about
  330 KiB of float32 patches per image against a 2 MiB budget; twice that in float64), with a
  batch that is no multiple of the chunk."""
  return _sized(f"chunked-{batch}x48x48", batch, 48, layout, groups, 1, 0.2)


def _mesh(layout, groups, stride):
  return _sized("mesh", MESH_BATCH, 6, layout, groups, stride, 0.5)


def _bench(size, batch=128):
  def make(rng, dtype):
    return (normal(rng, (batch, size, size, 32), dtype),
            normal(rng, (3, 3, 32, 64), dtype, scale=0.1), normal(rng, (64,), dtype))
  return Case(f"{batch}x{size}x{size}x32-3x3to64-same", make, dict(padding="SAME"),
              diff=(0, 1, 2))


GRIDS = [
    Grid(
        conv2d_op,
        (*_grid(), _large(7, "NHWC", 1), _large(9, "NCHW", 2)),
        representative=("s2-asym-d2-g2-nhwc-odd-nobias", "s1-same-d1-g1-nchw-even-bias",
                        "s2-valid-d1-dw-nchw-even-bias"),
        bench=(_bench(28), _bench(28, batch=127), _bench(14)),
        mesh=(_mesh("NHWC", 1, 1), _mesh("NCHW", 2, 2)),
        layouts=(  # FSDP: the kernel's output channels over data; column: over model
            Layout("fsdp", _sized("mesh", MESH_BATCH, 6, "NHWC", 1, 1, 0.5, out=8),
                   (("data",), (None, None, None, "data"), ("data",)), gathered=(1,),
                   out=("data",)),
            Layout("column", _sized("mesh", MESH_BATCH, 6, "NCHW", 1, 2, 0.5, out=8),
                   (("data",), ("model",), ("model",)), out=("data", "model")),
        ),
        platform_dependent=True,
    ),
]
