"""DDIM: the non-Markovian sampler over any sub-sequence of timesteps ([DDIM] eq. 12).

eta = 0 is the deterministic DDIM ODE sampler; eta = 1 matches ancestral sampling's
variance on the chosen sub-sequence.

References:
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models, 2021, eqs. 12 and 16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff import diffusion
from jdiff.samplers.driver import batch_t, sample_loop
from jdiff.samplers.grids import timestep_grid
from jdiff.schedules import Schedule

Array = jax.Array


def alpha_bar_or_one(schedule: Schedule, t: Array) -> Array:
  """alpha_bar_t as float32, with t = -1 meaning the clean data (alpha_bar = 1)."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def ddim_step(schedule: Schedule, model_fn, x_t: Array, t: Array, t_prev: Array,
              noise: Array, *, eta: float = 0.0, cond: Array | None = None,
              prediction: str = "eps", clip_x0: float | None = None
              ) -> tuple[Array, Array]:
  """One DDIM step x_t -> x_{t_prev} with explicit noise.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_t: [B, ...] current sample.
    t: scalar integer timestep.
    t_prev: scalar integer target timestep, < t; -1 means x_0.
    noise: [B, ...] standard normal noise (used when eta > 0).
    eta: stochasticity in [0, 1] ([DDIM] eq. 16).
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    clip_x0: clip predicted x0 to [-clip_x0, clip_x0] (eps is then recomputed from it).

  Returns:
    (x_{t_prev} [B, ...], x0_hat [B, ...]), dtype of x_t.
  """
  tb = batch_t(t, x_t)
  x0, eps = diffusion.to_x0_eps(schedule, x_t, tb, model_fn(x_t, tb, cond), prediction=prediction)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    eps = diffusion.eps_from_x0(schedule, x_t, tb, x0)
  ab_t = alpha_bar_or_one(schedule, t)
  ab_prev = alpha_bar_or_one(schedule, t_prev)
  sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
  dir_coef = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0))
  dt = x_t.dtype
  x_prev = (jnp.sqrt(ab_prev).astype(dt) * x0 + dir_coef.astype(dt) * eps
            + sigma.astype(dt) * noise.astype(dt))
  return x_prev.astype(dt), x0


def ddim_sample(schedule: Schedule, model_fn, x_T: Array, rng: Array, *, num_steps: int = 50,
                eta: float = 0.0, spacing: str = "leading", cond: Array | None = None,
                prediction: str = "eps", clip_x0: float | None = None,
                grid: Array | None = None) -> Array:
  """DDIM sampling from x_T over `num_steps` timesteps chosen by `spacing`.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_T: [B, ...] starting noise.
    rng: PRNG key; step i uses fold_in(rng, i).
    num_steps: number of model evaluations.
    eta: 0 (deterministic) to 1 (ancestral-like).
    spacing: 'leading', 'trailing', 'linspace' or 'quadratic' (see `timestep_grid`).
    cond, prediction, clip_x0: see `ddim_step`.
    grid: optional explicit decreasing int timesteps ending with -1 (overrides the above).

  Returns:
    x_0 samples [B, ...].
  """
  if grid is None:
    grid = timestep_grid(schedule.num_steps, num_steps, spacing=spacing)

  def step(x, i, t, t_prev, key):
    del i
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddim_step(schedule, model_fn, x, t, t_prev, noise, eta=eta, cond=cond,
                     prediction=prediction, clip_x0=clip_x0)[0]

  return sample_loop(step, x_T, grid, rng)[0]
