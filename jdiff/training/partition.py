"""How the train step lays out its work on a device mesh (used by `jdiff.training.step`).

`data_axis` and `fsdp_size` read a batch sharding's mesh; `batch_sharded_activations`
keeps activations split over the batch only.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from jax.sharding import NamedSharding

from jdiff.training.sharding import DATA_AXIS, FSDP_AXIS

Array = jax.Array


def data_axis(micro_sharding) -> str | None:
  """The mesh axis named 'data' of a batch sharding, or None (no mesh, or no such axis)."""
  if isinstance(micro_sharding, NamedSharding) and DATA_AXIS in micro_sharding.mesh.axis_names:
    return DATA_AXIS
  return None


def fsdp_size(sharding) -> int:
  """The size of the batch sharding's 'fsdp' mesh axis (1 without a mesh or such an axis)."""
  if not isinstance(sharding, NamedSharding):
    return 1
  return dict(sharding.mesh.shape).get(FSDP_AXIS, 1)


def batch_sharded_activations(sharding, batch: int):
  """A context in which every flax module's [batch, ...] outputs (3-D or more) are
  constrained to the batch `sharding` (None: no constraint).

  Under FSDP the kernels are split along their output channels; left alone, the compiler
  may split an activation the same way and reshuffle it back with all-to-alls. The
  constraint keeps activations split over the batch only (values unchanged).
  """
  if sharding is None:
    return contextlib.nullcontext()

  def constrain(a):
    if isinstance(a, jax.Array) and a.ndim >= 3 and a.shape[0] == batch:
      return jax.lax.with_sharding_constraint(a, sharding)
    return a

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    return jax.tree.map(constrain, out) if context.method_name == "__call__" else out

  return nn.intercept_methods(interceptor)
