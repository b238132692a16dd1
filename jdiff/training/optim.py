"""Optimiser and EMA, both functions of the step count."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine")
MU_DTYPES = ("float32", "bfloat16")


def learning_rate_schedule(
  *,
  lr: float,
  warmup_steps: int = 0,
  schedule: str = "constant",
  total_steps: int | None = None,
  end_factor: float = 0.0,
) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant or cosine decay.

  DDPM's recipe is constant with 5000 warm-up steps.
  """
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
  if lr <= 0:
    raise ValueError(f"lr must be positive, got {lr}")
  if schedule == "constant":
    if warmup_steps <= 0:
      return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup_steps)
  if not total_steps or total_steps <= warmup_steps:
    raise ValueError(
      f"a cosine lr schedule needs total_steps (train.num_steps={total_steps}) > "
      f"warmup_steps={warmup_steps}"
    )
  return optax.warmup_cosine_decay_schedule(
    0.0, lr, max(warmup_steps, 0), total_steps, end_value=lr * end_factor
  )


def make_optimizer(
  *,
  optimizer: str = "adam",
  lr: float = 2e-4,
  warmup_steps: int = 0,
  schedule: str = "constant",
  total_steps: int | None = None,
  grad_clip: float | None = 1.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  mu_dtype: str = "float32",
) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then Adam/AdamW on the warm-up schedule.

  `mu_dtype` is the dtype of Adam's first moment (optax's `mu_dtype`): 'bfloat16' halves
  its memory; the second moment, the update arithmetic and the parameters stay float32.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}")
  if mu_dtype not in MU_DTYPES:
    raise ValueError(f"config.optim.mu_dtype must be one of {MU_DTYPES}, got {mu_dtype!r}")
  mu = None if mu_dtype == "float32" else jnp.dtype(mu_dtype)
  lr_fn = learning_rate_schedule(
    lr=lr, warmup_steps=warmup_steps, schedule=schedule, total_steps=total_steps
  )
  if optimizer == "adam":
    if weight_decay:
      raise ValueError("weight_decay needs optimizer='adamw'")
    opt = optax.adam(lr_fn, b1=b1, b2=b2, eps=eps, mu_dtype=mu)
  else:
    opt = optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu)
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  return optax.chain(*parts, opt)


def ema_decay_at(step: Array, *, decay: float, warmup: bool = False) -> Array:
  """EMA decay at `step`: constant, or min(decay, (1 + step) / (10 + step)) with warm-up."""
  step = jnp.asarray(step, jnp.float32)
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, decay: Array) -> Any:
  """ema <- decay * ema + (1 - decay) * params (`optax.incremental_update`), in the params' dtype.

  The weights stay in the params' dtype so that bfloat16 params keep a bfloat16 EMA.
  """
  ema = optax.incremental_update(params, ema_params, 1.0 - decay)
  return jax.tree.map(lambda e, p: e.astype(p.dtype), ema, params)
