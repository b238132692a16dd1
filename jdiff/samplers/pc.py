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

from jdiff.samplers.ddim import ddim_step
from jdiff.samplers.denoisers import VPDenoiser
from jdiff.samplers.driver import sample_loop

Array = jax.Array


def _mean_norm(a: Array) -> Array:
  """Batch mean of the per-example L2 norms, as score_sde's LangevinCorrector."""
  return jnp.mean(
    jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32)).reshape(a.shape[0], -1), axis=1))
  )


def langevin_corrector_step(
  denoise: VPDenoiser, x: Array, t: Array, t_next: Array, noise: Array, *, snr: float = 0.16
) -> Array:
  """One Langevin step x <- x + e s(x, t) + sqrt(2 e) z targeting q_t ([ScoreSDE] Alg. 5). NFE 1.

  The step size e = 2 alpha (snr ||z|| / ||s||)^2 uses the batch means of the per-example
  norms, as score_sde does (per-example norms make e unbounded in low dimensions, where
  ||s|| can be ~0); so e is shared by the batch. alpha = alpha_bar_t / alpha_bar_{t_next} is
  the grid step's alpha (for the full T-step grid this is 1 - beta_t, as in [ScoreSDE]).
  The score s = -eps_hat / sqrt(1 - alpha_bar_t) uses the thresholded x0_hat's eps, as the
  predictor does.

  Args:
    denoise: the `VPDenoiser`.
    x: [B, ...] sample at t.
    t: scalar timestep (int or float) of x; t_next: the grid's next timestep (-1: data).
    noise: [B, ...] standard normal noise.
    snr: the signal-to-noise ratio r of the corrector (0.16 for CIFAR-10 in [ScoreSDE]).

  Returns:
    the corrected sample [B, ...].
  """
  _, eps = denoise(x, t)
  ab = denoise.alpha_bar(t)
  score = -eps.astype(jnp.float32) / jnp.sqrt(1.0 - ab)
  alpha = ab / denoise.alpha_bar(t_next)
  step = 2.0 * alpha * (snr * _mean_norm(noise) / _mean_norm(score)) ** 2
  out = x.astype(jnp.float32) + step * score + jnp.sqrt(2.0 * step) * noise.astype(jnp.float32)
  return out.astype(x.dtype)


def pc_step(
  denoise: VPDenoiser,
  x: Array,
  t: Array,
  t_next: Array,
  noise: Array,
  *,
  snr: float = 0.16,
  eta: float = 1.0,
) -> Array:
  """Corrector (n_corrector Langevin steps at t) then predictor (t -> t_next). NFE 1 + n_corrector.

  Args:
    denoise: the `VPDenoiser`.
    noise: [n_corrector + 1, B, ...] standard normal noise: one slice per corrector step,
      the last for the predictor (its leading dimension sets n_corrector).
    eta: predictor stochasticity (1: ancestral, 0: DDIM), see `ddim_step`.
    Other args: see `langevin_corrector_step` and `ddim_step`.
  """
  check_options(snr=snr)

  def correct(x, z):
    return langevin_corrector_step(denoise, x, t, t_next, z, snr=snr), None

  if noise.shape[0] > 1:
    x, _ = jax.lax.scan(correct, x, noise[:-1])
  return ddim_step(denoise, x, t, t_next, noise[-1], eta=eta)[0]


def check_options(*, n_corrector: int = 1, snr: float = 0.16) -> None:
  """Raises ValueError naming a bad n_corrector or snr."""
  if not isinstance(n_corrector, int) or n_corrector < 0:
    raise ValueError(f"n_corrector must be an integer >= 0, got {n_corrector!r}")
  if snr <= 0:
    raise ValueError(f"snr must be positive, got {snr}")


def pc_sample(
  denoise: VPDenoiser,
  x_T: Array,
  grid: Array,
  rng: Array,
  *,
  n_corrector: int = 1,
  inpaint=None,
  **options,
) -> Array:
  """Predictor-corrector sampling ([ScoreSDE] Alg. 3). NFE = N (1 + n_corrector).

  Args:
    denoise: the `VPDenoiser`.
    x_T: [B, ...] standard normal starting noise (x at the first grid timestep; the
      'trailing' grid starts at T-1, where x_T is standard normal).
    grid: decreasing timesteps (int or float) ending with -1, N steps.
    rng: PRNG key; step i uses fold_in(rng, i).
    n_corrector: Langevin corrector steps per predictor step (0: plain ancestral sampling).
    inpaint: optional `editing.Inpaint` (see `driver.sample_loop`).
    **options: `pc_step`'s `snr` (corrector signal-to-noise ratio, 0.16) and `eta`
      (predictor stochasticity, 1 ancestral, 0 DDIM).

  Returns:
    x_0 samples [B, ...].
  """
  check_options(n_corrector=n_corrector)

  def step(x, i, t, t_next, key):
    del i
    noise = jax.random.normal(key, (n_corrector + 1,) + x.shape, x.dtype)
    return pc_step(denoise, x, t, t_next, noise, **options)

  return sample_loop(step, x_T, grid, rng, inpaint=inpaint, schedule=denoise.schedule)[0]
