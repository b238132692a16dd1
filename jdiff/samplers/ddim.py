"""DDIM: the non-Markovian sampler over any sub-sequence of timesteps ([DDIM] eq. 12).

eta = 0 is the deterministic DDIM ODE sampler; eta = 1 matches ancestral sampling's
variance on the chosen sub-sequence (the DDPM posterior on the respaced grid). `ddim_step`
takes integer timesteps (the schedule's exact alpha_bar) or fractional ones (alpha_bar from
`jdiff.continuous`); the predictor-corrector sampler uses it as its predictor.

References:
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models, 2021, eqs. 12 and 16.
  [Imagen] Saharia et al. 2022, Sec. 2.3 (dynamic thresholding of x0_hat).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff import continuous, diffusion
from jdiff.samplers.driver import batch_t, sample_loop
from jdiff.samplers.grids import timestep_grid
from jdiff.schedules import Schedule

Array = jax.Array


def _is_int(t: Array) -> bool:
  return jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer)


def alpha_bar_or_one(schedule: Schedule, t: Array) -> Array:
  """alpha_bar_t as float32, with t < 0 meaning the clean data (alpha_bar = 1).

  Integer t reads the schedule; fractional t interpolates (`continuous.alpha_bar_at`).
  """
  if not _is_int(t):
    return continuous.alpha_bar_at(schedule, t)
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def predict_x0_eps(
  schedule: Schedule,
  model_fn,
  x_t: Array,
  t: Array,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> tuple[Array, Array]:
  """(x0_hat, eps_hat) from one model call at integer or fractional t >= 0.

  x0_hat is clipped / dynamically thresholded (`diffusion.threshold_x0`) and eps_hat is then
  recomputed from it, so the pair stays consistent with x_t = sqrt(ab) x0 + sqrt(1 - ab) eps.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_t: [B, ...] noisy sample.
    t: scalar or [B] timestep, int (exact schedule values) or float (`jdiff.continuous`).
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    clip_x0, dynamic_percentile: see `diffusion.threshold_x0` (None: off).

  Returns:
    (x0_hat, eps_hat), each [B, ...].
  """
  tb = batch_t(t, x_t)
  to_x0_eps = diffusion.to_x0_eps if _is_int(tb) else continuous.to_x0_eps
  x0, eps = to_x0_eps(schedule, x_t, tb, model_fn(x_t, tb, cond), prediction=prediction)
  if clip_x0 is None and dynamic_percentile is None:
    return x0, eps
  x0 = diffusion.threshold_x0(x0, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
  if _is_int(tb):
    return x0, diffusion.eps_from_x0(schedule, x_t, tb, x0)
  ab = continuous.alpha_bar_at(schedule, tb).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return x0, (x_t.astype(jnp.float32) - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def ddim_step(
  schedule: Schedule,
  model_fn,
  x_t: Array,
  t: Array,
  t_prev: Array,
  noise: Array,
  *,
  eta: float = 0.0,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> tuple[Array, Array]:
  """One DDIM step x_t -> x_{t_prev} with explicit noise ([DDIM] eqs. 12, 16). NFE 1.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_t: [B, ...] current sample.
    t: scalar timestep, integer or fractional (see `predict_x0_eps`).
    t_prev: scalar target timestep, < t; negative means x_0 (x0_hat is returned).
    noise: [B, ...] standard normal noise (used when eta > 0).
    eta: stochasticity in [0, 1]; 1 is the ancestral (DDPM posterior) step.
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    clip_x0, dynamic_percentile: thresholding of x0_hat (eps is then recomputed from it).

  Returns:
    (x_{t_prev} [B, ...], x0_hat [B, ...]), dtype of x_t.
  """
  x0, eps = predict_x0_eps(
    schedule,
    model_fn,
    x_t,
    t,
    cond=cond,
    prediction=prediction,
    clip_x0=clip_x0,
    dynamic_percentile=dynamic_percentile,
  )
  ab_t = alpha_bar_or_one(schedule, t)
  ab_prev = alpha_bar_or_one(schedule, t_prev)
  sigma = eta * jnp.sqrt(jnp.maximum((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev), 0.0))
  dir_coef = jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0))
  dt = x_t.dtype
  x_prev = (
    jnp.sqrt(ab_prev).astype(dt) * x0.astype(dt)
    + dir_coef.astype(dt) * eps.astype(dt)
    + sigma.astype(dt) * noise.astype(dt)
  )
  return x_prev.astype(dt), x0.astype(dt)


def ddim_sample(
  schedule: Schedule,
  model_fn,
  x_T: Array,
  rng: Array,
  *,
  num_steps: int = 50,
  eta: float = 0.0,
  spacing: str = "leading",
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
  grid: Array | None = None,
  inpaint=None,
) -> Array:
  """DDIM sampling from x_T over `num_steps` timesteps chosen by `spacing`.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_T: [B, ...] starting noise.
    rng: PRNG key; step i uses fold_in(rng, i).
    num_steps: number of model evaluations.
    eta: 0 (deterministic) to 1 (ancestral-like).
    spacing: 'leading', 'trailing', 'linspace' or 'quadratic' (see `timestep_grid`).
    cond, prediction, clip_x0, dynamic_percentile: see `ddim_step`.
    grid: optional explicit decreasing int timesteps ending with -1 (overrides the above).
    inpaint: optional `editing.Inpaint` (replacement / RePaint; see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...].
  """
  if grid is None:
    grid = timestep_grid(schedule.num_steps, num_steps, spacing=spacing)

  def step(x, i, t, t_prev, key):
    del i
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddim_step(
      schedule,
      model_fn,
      x,
      t,
      t_prev,
      noise,
      eta=eta,
      cond=cond,
      prediction=prediction,
      clip_x0=clip_x0,
      dynamic_percentile=dynamic_percentile,
    )[0]

  return sample_loop(step, x_T, grid, rng, inpaint=inpaint, schedule=schedule)[0]
