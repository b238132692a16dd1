"""Bridge from a flax network to the ``model_fn(x_t, t, cond)`` the library calls.

The diffusion primitives, losses and samplers only ever see a pure function
``model_fn(x_t, t, cond) -> Array`` (``jdiff.diffusion.ModelFn``); this module
binds the variables, the dropout rng and the train/eval switch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax

from jdiff.diffusion import ModelFn

Array = jax.Array


def make_model_fn(
  module: nn.Module, params: Any, *, train: bool = False, rng: Array | None = None
) -> ModelFn:
  """Binds ``params`` (and the dropout ``rng``) to a network's ``apply``.

  Example::

    net = make_unet("ddpm_cifar10")
    model_fn = make_model_fn(net, params, train=True,
                             rng=jax.random.fold_in(dropout_rng, step))
    eps_hat = model_fn(x_t, t, None)  # [B, H, W, C]

  Args:
    module: a flax module called as ``module(x, t, y, *, train)`` (e.g. ``UNet``).
    params: the parameter pytree (``variables["params"]``) or the whole
      variables dict ``{"params": ..., ...}``.
    train: training mode (dropout active); requires ``rng``.
    rng: PRNG key for dropout; the same key gives the same masks, so fold the
      step into it per call site (``jax.random.fold_in(base, step)``).

  Returns:
    A pure function ``model_fn(x_t [B, H, W, C], t [B], cond [B] int or None)
    -> [B, H, W, out]``, safe to close over inside ``jax.jit`` / ``grad``.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"module must be a flax.linen Module, got {type(module).__name__}")
  if not isinstance(train, bool):
    raise TypeError(f"train must be a bool, got {train!r}")
  if train and rng is None:
    raise ValueError(
      "make_model_fn(train=True) needs a dropout rng=jax.random.key(...); got rng=None"
    )
  if isinstance(params, Mapping) and "params" in params:
    variables = params
  else:
    variables = {"params": params}
  rngs = {"dropout": rng} if train else None

  def model_fn(x_t: Array, t: Array, cond: Array | None) -> Array:
    return module.apply(variables, x_t, t, cond, train=train, rngs=rngs)

  return model_fn
