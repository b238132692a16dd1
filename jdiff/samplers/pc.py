"""Predictor-corrector sampling for the VP SDE with a Langevin corrector ([ScoreSDE] Alg. 3, 5).

Each step at timestep t first runs `n_corrector` Langevin MCMC steps targeting q_t (the
corrector, [ScoreSDE] Alg. 5 with the snr-based step size), then one predictor step
t -> t_next: the ancestral (reverse-diffusion) step, i.e. the DDPM posterior
q(x_{t_next} | x_t, x0_hat) on the (possibly respaced) grid (eta = 1), or the
deterministic DDIM step (eta = 0). Timesteps may be integers (`timestep_grid`) or
fractional floats; alpha_bar at fractional t comes from `sigma.alpha_bar_at`.

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

from jdiff import continuous
from jdiff.samplers.driver import batch_t, sample_loop
from jdiff.samplers.grids import timestep_grid
from jdiff.schedules import Schedule

Array = jax.Array


def _mean_norm(a: Array) -> Array:
  """Batch mean of the per-example L2 norms, as score_sde's LangevinCorrector."""
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32)).reshape(a.shape[0], -1),
                                   axis=1)))


def langevin_corrector_step(schedule: Schedule, model_fn, x: Array, t: Array, t_next: Array,
                            noise: Array, *, snr: float = 0.16, cond: Array | None = None,
                            prediction: str = "eps") -> Array:
  """One Langevin step x <- x + e s(x, t) + sqrt(2 e) z targeting q_t ([ScoreSDE] Alg. 5). NFE 1.

  The step size e = 2 alpha (snr ||z|| / ||s||)^2 uses the batch means of the per-example
  norms, as score_sde does (per-example norms make e unbounded in low dimensions, where
  ||s|| can be ~0); so e is shared by the batch. alpha = alpha_bar_t / alpha_bar_{t_next} is the grid step's alpha (for the full
  T-step grid this is 1 - beta_t, as in [ScoreSDE]).

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x: [B, ...] sample at t.
    t: scalar timestep (int or float) of x; t_next: the grid's next timestep (-1: data).
    noise: [B, ...] standard normal noise.
    snr: the signal-to-noise ratio r of the corrector (0.16 for CIFAR-10 in [ScoreSDE]).
    cond, prediction: see `ddim_step`.

  Returns:
    the corrected sample [B, ...].
  """
  tb = batch_t(t, x)
  ab = continuous.alpha_bar_at(schedule, tb)
  _, eps = continuous.to_x0_eps_at(ab, x, model_fn(x, tb, cond), prediction=prediction)
  score = -eps / jnp.sqrt(1.0 - ab).reshape((-1,) + (1,) * (x.ndim - 1))
  alpha = continuous.alpha_bar_at(schedule, t) / continuous.alpha_bar_at(schedule, t_next)
  step = 2.0 * alpha * (snr * _mean_norm(noise) / _mean_norm(score)) ** 2
  out = x.astype(jnp.float32) + step * score + jnp.sqrt(2.0 * step) * noise.astype(jnp.float32)
  return out.astype(x.dtype)


def ancestral_predictor_step(schedule: Schedule, model_fn, x: Array, t: Array, t_next: Array,
                             noise: Array, *, eta: float = 1.0, cond: Array | None = None,
                             prediction: str = "eps") -> Array:
  """x_t -> x_{t_next} by the DDIM step at fractional t (eta = 1: ancestral, DDPM posterior). NFE 1.

  Args:
    schedule: the `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    x: [B, ...] sample at t.
    t, t_next: scalar timesteps, t > t_next; t_next < 0 means the data (returns x0_hat).
    noise: [B, ...] standard normal noise.
    eta: 1 for the ancestral step, 0 for the deterministic DDIM step.
    cond, prediction: see `ddim_step`.
  """
  tb = batch_t(t, x)
  ab = continuous.alpha_bar_at(schedule, t)
  ab_next = continuous.alpha_bar_at(schedule, t_next)
  x0, eps = continuous.to_x0_eps_at(ab, x, model_fn(x, tb, cond), prediction=prediction)
  std = eta * jnp.sqrt(jnp.maximum((1.0 - ab_next) / (1.0 - ab) * (1.0 - ab / ab_next), 0.0))
  dir_coef = jnp.sqrt(jnp.maximum(1.0 - ab_next - std**2, 0.0))
  out = jnp.sqrt(ab_next) * x0 + dir_coef * eps + std * noise.astype(jnp.float32)
  return out.astype(x.dtype)


def pc_step(schedule: Schedule, model_fn, x: Array, t: Array, t_next: Array, noise: Array, *,
            n_corrector: int = 1, snr: float = 0.16, eta: float = 1.0,
            cond: Array | None = None, prediction: str = "eps") -> Array:
  """Corrector (n_corrector Langevin steps at t) then predictor (t -> t_next). NFE 1 + n_corrector.

  Args:
    noise: [n_corrector + 1, B, ...] standard normal noise: one slice per corrector step,
      the last for the predictor.
    Other args: see `langevin_corrector_step` and `ancestral_predictor_step`.
  """
  if noise.shape[0] != n_corrector + 1:
    raise ValueError(f"noise must have leading dimension n_corrector + 1 = {n_corrector + 1}, "
                     f"got shape {noise.shape}")

  def correct(x, z):
    return langevin_corrector_step(schedule, model_fn, x, t, t_next, z, snr=snr, cond=cond,
                                   prediction=prediction), None

  if n_corrector:
    x, _ = jax.lax.scan(correct, x, noise[:-1])
  return ancestral_predictor_step(schedule, model_fn, x, t, t_next, noise[-1], eta=eta,
                                  cond=cond, prediction=prediction)


def pc_sample(schedule: Schedule, model_fn, x_T: Array, rng: Array, *, num_steps: int = 100,
              n_corrector: int = 1, snr: float = 0.16, eta: float = 1.0,
              spacing: str = "trailing", grid: Array | None = None, cond: Array | None = None,
              prediction: str = "eps") -> Array:
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
    cond, prediction: see `ddim_step`.

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
    return pc_step(schedule, model_fn, x, t, t_next, noise, n_corrector=n_corrector, snr=snr,
                   eta=eta, cond=cond, prediction=prediction)

  return sample_loop(step, x_T, grid, rng)[0]
