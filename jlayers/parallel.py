"""Data parallelism on a device mesh: params replicated, each batch split over the devices.

Every jlayers rule is written for this layout (see the README's "Device meshes"): under
``jax.set_mesh`` with the batch split, forward and backward compute on each device's slice and
only weight-sized sums cross devices.
"""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


class DataParallel:
  """Placement on an ``devices``-device mesh with one ``batch`` axis (``jax.make_mesh``,
  explicit axes): :meth:`replicate` for params, state and optimizer state, :meth:`split` for a
  batch (its leading axis over the devices), :meth:`context` to trace and run under.
  ``devices=None`` places nothing (one device, no mesh), so one code path serves both.

  On a CPU, XLA makes ``N`` host devices when ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
  is set before JAX starts. On several hosts, call ``jax.distributed.initialize()`` first: the
  mesh then spans every host's devices (each host then feeds its own slice of a batch; the
  ``device_put`` of :meth:`split` is the single-host form).

  Examples:
    >>> import jax.numpy as jnp, jlayers
    >>> placement = jlayers.DataParallel(None)
    >>> placement.devices, placement.split(jnp.ones(3)).shape
    (1, (3,))
  """

  def __init__(self, devices: int | None):
    self.mesh = None
    if devices is not None:
      if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"DataParallel: devices must be None or a positive int, got {devices!r}")
      if devices > jax.device_count():
        raise ValueError(
            f"DataParallel: {devices} devices asked for, but only {jax.device_count()} "
            f"{jax.default_backend()} device(s) are visible; on a CPU set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={devices} before starting Python")
      self.mesh = jax.make_mesh((devices,), ("batch",))

  @property
  def devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  def replicate(self, tree):
    """``tree`` with every array on every device (no mesh: as it is)."""
    if self.mesh is None:
      return tree
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def split(self, tree):
    """``tree`` with every array's leading axis split over the devices."""
    if self.mesh is None:
      return tree
    return jax.device_put(tree, NamedSharding(self.mesh, P("batch")))

  def context(self):
    """``jax.set_mesh`` of the mesh (the sharding-in-types context), or nothing."""
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


class ModelParallel:
  """Placement on a ``data`` × ``model`` mesh (``jax.make_mesh``, explicit axes): params laid
  out by logical axis rules (:mod:`jlayers.partitioning`: FSDP over ``data``, tensor
  parallelism over ``model``, or both), each batch split over ``data``. The interface of
  :class:`DataParallel`: :meth:`place` for params (and what is laid out as them),
  :meth:`replicate`, :meth:`split`, :meth:`context`.

  Args:
    data: devices along ``data`` (the batch, and FSDP's weight slices).
    model: devices along ``model`` (tensor parallelism's heads, MLP features, vocabulary).
    rules: the logical rules, e.g. :data:`jlayers.partitioning.FSDP`,
      :data:`jlayers.partitioning.TENSOR` or their concatenation.

  The optimizer state is made from placed params (``jax.jit(optimizer.init)(params)`` under
  :meth:`context`), so that it is laid out as they are.
  """

  def __init__(self, data: int, model: int, rules):
    for name, n in (("data", data), ("model", model)):
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"ModelParallel: {name} must be a positive int, got {n!r}")
    if data * model > jax.device_count():
      raise ValueError(
          f"ModelParallel: a {data} x {model} mesh needs {data * model} devices, but only "
          f"{jax.device_count()} {jax.default_backend()} device(s) are visible; on a CPU set "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={data * model} before starting "
          "Python")
    self.mesh = jax.make_mesh((data, model), ("data", "model"))
    self.rules = tuple(rules)

  @property
  def devices(self) -> int:
    return self.mesh.size

  def place(self, params):
    """``params`` laid out on the mesh as the rules say (:func:`~jlayers.partitioning.
    param_specs`; an axis the mesh axes do not divide stays whole)."""
    from jlayers import partitioning  # noqa: PLC0415  (partitioning imports nothing of ours)

    return jax.device_put(params, partitioning.param_specs(params, self.rules, mesh=self.mesh))

  def replicate(self, tree):
    """``tree`` with every array on every device."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def split(self, tree):
    """``tree`` with every array's leading axis split over ``data``."""
    return jax.device_put(tree, NamedSharding(self.mesh, P("data")))

  def context(self):
    """``jax.set_mesh`` of the mesh."""
    return jax.set_mesh(self.mesh)
