"""Data parallelism with `jax.jit` + `NamedSharding` over a one-axis device `Mesh`.

The batch is split over every device of every process along the mesh axis 'data';
parameters and optimiser state are replicated. This is the layout `pmap` gives,
written the modern way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes) named 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """A 1-D 'data' mesh over this process's devices only (process-local work, e.g. encoding
  a dataset once per process)."""
  return make_mesh(jax.local_devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device of `mesh` holds the whole array."""
  return NamedSharding(mesh, P())


def check_global_batch(global_batch_size: int, mesh: Mesh) -> int:
  """Validates the global batch against the device and process counts.

  Returns:
    The per-process batch size.

  Raises:
    ValueError: naming the batch size and the counts when they do not divide.
  """
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n_dev:
    raise ValueError(
      f"global batch size {global_batch_size} must be a positive multiple of the device "
      f"count {n_dev} ({n_proc} process(es) x {n_dev // n_proc} local device(s)); e.g. use "
      f"{max(n_dev, global_batch_size // n_dev * n_dev)}"
    )
  return global_batch_size // n_proc


def to_global(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's local batch [b_local, ...] into global arrays [B, ...].

  Every process passes its own shard (b_local = B / process_count rows); the result
  is sharded along 'data' over all devices.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
