"""Data parallelism and FSDP with `jax.jit` + `NamedSharding` over a device `Mesh`.

`make_mesh` gives the one-axis mesh 'data' (the layout `pmap` gives, written the modern
way): the batch is split over every device of every process, parameters and optimiser
state are replicated. `make_mesh_2d` gives the mesh ('data', 'fsdp'): the batch is split
over both axes and `fsdp_shardings` splits parameters, optimiser state and EMA over
'fsdp' (ZeRO-3 / FSDP); the compiler inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Arrays with fewer elements than this stay replicated under FSDP (biases, norms, counts):
# sharding them saves little memory and costs one collective each.
FSDP_MIN_SIZE = 2**14


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes) named 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def local_mesh() -> Mesh:
  """A 1-D 'data' mesh over this process's devices only (process-local work, e.g. encoding
  a dataset once per process)."""
  return make_mesh(jax.local_devices())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: those of ('data', 'fsdp') the mesh has."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data' (and 'fsdp' on a 2-D mesh)."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


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


# ----------------------------------------------------------------------------- 2-D mesh, FSDP


def mesh_shape(num_devices: int, *, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """Resolves the (data, fsdp) sizes of a mesh over `num_devices`; -1 means "the rest".

  Raises:
    ValueError: naming the sizes when they are not positive (or -1), when both are -1, or
      when their product is not the device count.
  """
  sizes = {"data": data, "fsdp": fsdp}
  for name, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ValueError(f"config.mesh.{name} must be a positive integer or -1, got {size!r}")
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f"at most one of config.mesh.data/fsdp may be -1, got {sizes}")
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if rest:
    if num_devices % fixed:
      raise ValueError(
        f"config.mesh {sizes}: the fixed sizes multiply to {fixed}, which does not divide "
        f"the device count {num_devices}"
      )
    sizes[rest[0]] = num_devices // fixed
  if sizes["data"] * sizes["fsdp"] != num_devices:
    raise ValueError(
      f"config.mesh data={sizes['data']} x fsdp={sizes['fsdp']} = "
      f"{sizes['data'] * sizes['fsdp']} devices, but there are {num_devices}; set one "
      "of them to -1 (the rest)"
    )
  return sizes["data"], sizes["fsdp"]


def make_mesh_2d(devices=None, *, data: int = -1, fsdp: int = 1) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (all devices of all processes by default).

  'fsdp' is the minor axis: with jax.devices()'s process-major order, an fsdp group lies
  within one host whenever fsdp <= local device count, so the parameter all-gathers stay
  on the fast intra-host links and only gradients cross hosts (over 'data').
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(len(devices), data=data, fsdp=fsdp)
  return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, *, min_size: int = FSDP_MIN_SIZE) -> P:
  """The FSDP rule for one array: its largest dimension divisible by the 'fsdp' size.

  Ties go to the last such dimension (a conv kernel [kh, kw, in, out] is split along
  `out`). Arrays with fewer than `min_size` elements, scalars, and arrays with no
  divisible dimension are replicated (P()).
  """
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for i, n in enumerate(shape):
    if n % fsdp_size == 0 and (best is None or n >= shape[best]):
      best = i
  if best is None:
    return P()
  return P(*([None] * best), FSDP_AXIS)


def fsdp_shardings(tree: Any, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> Any:
  """`NamedSharding`s of a pytree of arrays or shapes by the FSDP rule (`fsdp_spec`).

  Pure: it reads only each leaf's `.shape` (arrays, `jax.ShapeDtypeStruct`s). On a mesh
  without an 'fsdp' axis, or with fsdp = 1, everything is replicated.

  Args:
    tree: e.g. `jax.eval_shape(init_state)` (a whole `TrainState`: params, EMA and the
      optimiser's moments get the same layout, since they have the same shapes).
    mesh: the device mesh.
    min_size: arrays with fewer elements stay replicated.
  """
  size = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)
  return jax.tree.map(
    lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), size, min_size=min_size)), tree
  )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A replicated copy of a (possibly FSDP-sharded) pytree: one compiled all-gather.

  Works across processes, where `device_get` of a sharded global array cannot.
  """
  return jax.jit(lambda x: x, out_shardings=replicated(mesh))(tree)
