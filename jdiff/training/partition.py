"""How the train step lays out its work on a device mesh (used by `jdiff.training.step`).

`data_axis` and `fsdp_size` read a batch sharding's mesh; `make_param_cast` casts the
FSDP-split parameters to the compute dtype on their shards (the all-gathers then move
bfloat16); `batch_sharded_activations` keeps activations split over the batch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from jdiff.training.sharding import DATA_AXIS, FSDP_AXIS

Array = jax.Array


def data_axis(micro_sharding) -> str | None:
  """The mesh axis named 'data' of a batch sharding, or None (no mesh, or no such axis)."""
  if isinstance(micro_sharding, NamedSharding) and DATA_AXIS in micro_sharding.mesh.axis_names:
    return DATA_AXIS
  return None


def _cast_sharded(x: Array, dtype, sharding) -> Array:
  """`x` cast to `dtype` on its own shard (so that FSDP all-gathers `dtype`, not float32);
  the gradient comes back in x's dtype before it is reduced to the shard."""

  @jax.custom_vjp
  def cast(x):
    return jax.lax.with_sharding_constraint(x.astype(dtype), sharding)

  def bwd(_, g):
    return (jax.lax.with_sharding_constraint(g.astype(x.dtype), sharding),)

  cast.defvjp(lambda x: (cast(x), None), bwd)
  return cast(x)


def make_param_cast(module, grad_shardings) -> Callable:
  """`cast(params) -> params`: the FSDP-split float parameters in the module's compute dtype.

  Under FSDP each such parameter is all-gathered before use; cast first, the gathers move
  half the bytes in bfloat16. The cast is the one the layers apply anyway (flax's
  `promote_dtype`), so the forward and the gradients are unchanged. Identity when nothing
  is split or the compute dtype is the parameters' own.
  """
  dtype = getattr(module, "dtype", None)
  if grad_shardings is None or dtype is None or jnp.dtype(dtype) == jnp.float32:
    return lambda params: params
  dtype = jnp.dtype(dtype)

  def split(sh) -> bool:
    return isinstance(sh, NamedSharding) and any(a is not None for a in sh.spec)

  def cast_leaf(x, sh):
    if split(sh) and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return _cast_sharded(x, dtype, sh)
    return x

  return lambda params: jax.tree.map(cast_leaf, params, grad_shardings)


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
