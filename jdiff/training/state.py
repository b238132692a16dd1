"""Training states: everything a step reads and writes, as one pytree per kind of model."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  """Step counter, parameters, their EMA and the optimiser state.

  The step is the only clock: the learning rate, the EMA decay and every random
  stream of step s are functions of `step` (rng = fold_in(base, step)).
  """

  step: Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState


def init_train_state(
  module,
  optimizer: optax.GradientTransformation,
  rng: Array,
  sample_x: Array,
  *,
  num_classes: int | None = None,
  sample_cond: Array | None = None,
) -> TrainState:
  """Initialises the parameters of `module` on a sample input and wraps them.

  Args:
    module: a flax module called as `module(x, t, y, *, train)`.
    optimizer: the optax transformation.
    rng: PRNG key for the parameter init.
    sample_x: [b, H, W, C] example input (values are irrelevant, only the shape).
    num_classes: if set, a sample label array is passed as `y`.
    sample_cond: an example conditioning image passed as `y` (image-conditioned U-Nets).

  Returns:
    A `TrainState` at step 0 with ema_params equal to params.
  """
  b = sample_x.shape[0]
  t = jnp.zeros((b,), jnp.int32)
  y = jnp.zeros((b,), jnp.int32) if num_classes else None
  if sample_cond is not None:
    y = sample_cond
  params = module.init({"params": rng}, sample_x, t, y, train=False)["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=jax.tree.map(jnp.copy, params),
    opt_state=optimizer.init(params),
  )


@flax.struct.dataclass
class AutoencoderState:
  """The stage-1 autoencoder's state: no EMA; the step is the only clock, as in TrainState."""

  step: Array
  params: Any
  opt_state: optax.OptState


def init_autoencoder_state(
  module, optimizer: optax.GradientTransformation, rng: Array, sample_x: Array
) -> AutoencoderState:
  """Initialises an `AutoencoderKL` on `sample_x` [b, H, W, C] (only its shape matters)."""
  params = module.init(rng, sample_x, sample_posterior=False)["params"]
  return AutoencoderState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
  )


def param_count(params: Any) -> int:
  """The number of scalars in a parameter pytree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))
