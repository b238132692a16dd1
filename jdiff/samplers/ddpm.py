"""Ancestral sampling from p(x_{t-1} | x_t) ([DDPM] Algorithm 2).

References:
  [DDPM] Ho et al. 2020. [IDDPM] Nichol & Dhariwal 2021 (fixed-large / learned variances).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff import diffusion
from jdiff.samplers.driver import batch_t, sample_loop
from jdiff.schedules import Schedule

Array = jax.Array


def ddpm_step(
  schedule: Schedule,
  model_fn,
  x_t: Array,
  t: Array,
  noise: Array,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> tuple[Array, Array]:
  """One ancestral step x_t -> x_{t-1} with explicit noise.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_t: [B, ...] current sample.
    t: scalar or [B] integer timestep.
    noise: [B, ...] standard normal noise (unused at t = 0, where the mean is returned).
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    variance: 'fixed_small' (beta_tilde), 'fixed_large' (beta) or 'learned_range'.
    clip_x0, dynamic_percentile: static clipping (1.0 for images in [-1, 1]) / dynamic
      thresholding of the predicted x0 before forming the posterior mean
      (`diffusion.threshold_x0`); None disables.

  Returns:
    (x_{t-1} [B, ...], x0_hat [B, ...]), dtype of x_t.
  """
  t = batch_t(t, x_t)
  p, x0 = diffusion.p_mean_variance(
    schedule, model_fn(x_t, t, cond), x_t, t, prediction=prediction, variance=variance
  )
  mean = p.mean
  if clip_x0 is not None or dynamic_percentile is not None:
    x0 = diffusion.threshold_x0(x0, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
    mean = diffusion.q_posterior(schedule, x0, x_t, t).mean
  nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  x_prev = mean + nonzero * jnp.exp(0.5 * p.log_variance) * noise.astype(x_t.dtype)
  return x_prev.astype(x_t.dtype), x0


def ddpm_sample(
  schedule: Schedule,
  model_fn,
  x_T: Array,
  rng: Array,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  variance: str = "fixed_small",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
  grid: Array | None = None,
  inpaint=None,
) -> Array:
  """Ancestral sampling over all T steps, from x_T to x_0.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_T: [B, ...] starting noise (explicit).
    rng: PRNG key; step i uses fold_in(rng, i).
    cond, prediction, variance, clip_x0, dynamic_percentile: see `ddpm_step`.
    grid: optional consecutive decreasing timesteps ending with -1 (e.g. the tail
      [k, k - 1, ..., -1] of the full grid, for SDEdit); default all T.
    inpaint: optional `editing.Inpaint` (replacement / RePaint; see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...], dtype of x_T.
  """
  if grid is None:
    grid = jnp.arange(schedule.num_steps - 1, -2, -1, dtype=jnp.int32)

  def step(x, i, t, t_next, key):
    del i, t_next
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddpm_step(
      schedule,
      model_fn,
      x,
      t,
      noise,
      cond=cond,
      prediction=prediction,
      variance=variance,
      clip_x0=clip_x0,
      dynamic_percentile=dynamic_percentile,
    )[0]

  return sample_loop(step, x_T, grid, rng, inpaint=inpaint, schedule=schedule)[0]
