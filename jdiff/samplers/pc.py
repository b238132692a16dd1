"""Predictor-corrector sampling for the VP SDE with a Langevin corrector ([ScoreSDE] Alg. 3, 5).

Each step at timestep t first runs `n_corrector` Langevin MCMC steps targeting q_t (the
corrector, [ScoreSDE] Alg. 5 with the snr-based step size), then one predictor step
t -> t_next: `ddim_step` with eta = 1, the ancestral (reverse-diffusion) step, i.e. the
DDPM posterior q(x_{t_next} | x_t, x0_hat) on the (possibly respaced) grid, or the
deterministic DDIM step (eta = 0). Timesteps may be integers (`timestep_grid`) or
fractional floats; alpha_bar at fractional t comes from `continuous.alpha_bar_at`.

NFE per step = 1 + n_corrector; total NFE = num_steps (1 + n_corrector).

References:
  [ScoreSDE] Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative
    Modeling through Stochastic Differential Equations, 2021, Algorithms 3-5 (VP), and
    `score_sde/sampling.py` (LangevinCorrector: eps = 2 alpha_i (r ||z|| / ||s||)^2).
  [DDIM] Song, Meng, Ermon 2021, eq. 12 (the respaced ancestral step with eta = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.samplers.ddim import alpha_bar_or_one, ddim_step, predict_x0_eps
from jdiff.samplers.driver import sample_loop
from jdiff.samplers.grids import timestep_grid
from jdiff.schedules import Schedule

Array = jax.Array


def _mean_norm(a: Array) -> Array:
  """Batch mean of the per-example L2 norms, as score_sde's LangevinCorrector."""
  return jnp.mean(
    jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1))
  )


def langevin_corrector_step(
  schedule: Schedule,
  model_fn,
  x: Array,
  t: Array,
  t_next: Array,
  noise: Array,
  *,
  snr: float = 0.16,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Array:
  """One Langevin step x <- x + e s(x, t) + sqrt(2 e) z targeting q_t ([ScoreSDE] Alg. 5). NFE 1.

  The step size e = 2 alpha (snr ||z|| / ||s||)^2 uses the batch means of the per-example
  norms, as score_sde does (per-example norms make e unbounded in low dimensions, where
  ||s|| can be ~0); so e is shared by the batch. alpha = alpha_bar_t / alpha_bar_{t_next} is
  the grid step's alpha (for the full T-step grid this is 1 - beta_t, as in [ScoreSDE]).
  The score s = -eps_hat / sqrt(1 - alpha_bar_t) uses the thresholded x0_hat's eps, as the
  predictor does.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x: [B, ...] sample at t.
    t: scalar timestep (int or float) of x; t_next: the grid's next timestep (-1: data).
    noise: [B, ...] standard normal noise.
    snr: the signal-to-noise ratio r of the corrector (0.16 for CIFAR-10 in [ScoreSDE]).
    cond, prediction, clip_x0, dynamic_percentile: see `ddim.predict_x0_eps`.

  Returns:
    the corrected sample [B, ...].
  """
  _, eps = predict_x0_eps(
    schedule,
    model_fn,
    x,
    t,
    cond=cond,
    prediction=prediction,
    clip_x0=clip_x0,
    dynamic_percentile=dynamic_percentile,
  )
  ab = alpha_bar_or_one(schedule, t)
  score = -eps.astype(jnp.float32) / jnp.sqrt(1.0 - ab)
  alpha = ab / alpha_bar_or_one(schedule, t_next)
  step = 2.0 * alpha * (snr * _mean_norm(noise) / _mean_norm(score)) ** 2
  out = x.astype(jnp.float32) + step * score + jnp.sqrt(2.0 * step) * noise.astype(jnp.float32)
  return out.astype(x.dtype)


def pc_step(
  schedule: Schedule,
  model_fn,
  x: Array,
  t: Array,
  t_next: Array,
  noise: Array,
  *,
  n_corrector: int = 1,
  snr: float = 0.16,
  eta: float = 1.0,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Array:
  """Corrector (n_corrector Langevin steps at t) then predictor (t -> t_next). NFE 1 + n_corrector.

  Args:
    noise: [n_corrector + 1, B, ...] standard normal noise: one slice per corrector step,
      the last for the predictor.
    eta: predictor stochasticity (1: ancestral, 0: DDIM), see `ddim_step`.
    Other args: see `langevin_corrector_step` and `ddim_step`.
  """
  if noise.shape[0] != n_corrector + 1:
    raise ValueError(
      f"noise must have leading dimension n_corrector + 1 = {n_corrector + 1}, "
      f"got shape {noise.shape}"
    )

  kw = dict(
    cond=cond, prediction=prediction, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile
  )

  def correct(x, z):
    return langevin_corrector_step(schedule, model_fn, x, t, t_next, z, snr=snr, **kw), None

  if n_corrector:
    x, _ = jax.lax.scan(correct, x, noise[:-1])
  return ddim_step(schedule, model_fn, x, t, t_next, noise[-1], eta=eta, **kw)[0]


def pc_sample(
  schedule: Schedule,
  model_fn,
  x_T: Array,
  rng: Array,
  *,
  num_steps: int = 100,
  n_corrector: int = 1,
  snr: float = 0.16,
  eta: float = 1.0,
  spacing: str = "trailing",
  grid: Array | None = None,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
  inpaint=None,
) -> Array:
  """Predictor-corrector sampling ([ScoreSDE] Alg. 3). NFE = num_steps (1 + n_corrector).

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x_T: [B, ...] standard normal starting noise (x at the first grid timestep).
    rng: PRNG key; step i uses fold_in(rng, i).
    num_steps: predictor steps N.
    n_corrector: Langevin corrector steps per predictor step (0: plain ancestral sampling).
    snr: corrector signal-to-noise ratio.
    eta: predictor stochasticity (1 ancestral, 0 DDIM).
    spacing: timestep spacing for `timestep_grid` ('trailing' starts at T-1, where x_T is
      standard normal).
    grid: explicit decreasing timesteps (int or float) ending with -1 (overrides the above).
    cond, prediction, clip_x0, dynamic_percentile: see `ddim_step`.

  Returns:
    x_0 samples [B, ...].
  """
  if not isinstance(n_corrector, int) or n_corrector < 0:
    raise ValueError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
  if snr <= 0:
    raise ValueError(f"snr must be positive, got {snr}")
  if grid is None:
    grid = timestep_grid(schedule.num_steps, num_steps, spacing=spacing)

  def step(x, i, t, t_next, key):
    del i
    noise = jax.random.normal(key, (n_corrector + 1,) + x.shape, x.dtype)
    return pc_step(
      schedule,
      model_fn,
      x,
      t,
      t_next,
      noise,
      n_corrector=n_corrector,
      snr=snr,
      eta=eta,
      cond=cond,
      prediction=prediction,
      clip_x0=clip_x0,
      dynamic_percentile=dynamic_percentile,
    )

  return sample_loop(step, x_T, grid, rng, inpaint=inpaint, schedule=schedule)[0]
