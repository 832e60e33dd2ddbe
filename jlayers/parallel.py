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
