"""Ancestral sampling from p(x_{t-1} | x_t) ([DDPM] Algorithm 2).

References:
  [DDPM] Ho et al. 2020. [IDDPM] Nichol & Dhariwal 2021 (fixed-large / learned variances).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff import diffusion
from jdiff.samplers.denoisers import VPDenoiser
from jdiff.samplers.driver import batch_t, sample_loop

Array = jax.Array


def ddpm_step(
  denoise: VPDenoiser, x_t: Array, t: Array, noise: Array, *, variance: str = "fixed_small"
) -> tuple[Array, Array]:
  """One ancestral step x_t -> x_{t-1} with explicit noise.

  The posterior mean is formed from the denoiser's (thresholded) x0_hat; with
  'learned_range' the model's second output half sets the variance, so `denoise.model_fn`
  must then return both halves.

  Args:
    denoise: the `VPDenoiser` (model, prediction, thresholding; integer timesteps).
    x_t: [B, ...] current sample.
    t: scalar or [B] integer timestep.
    noise: [B, ...] standard normal noise (unused at t = 0, where the mean is returned).
    variance: 'fixed_small' (beta_tilde), 'fixed_large' (beta) or 'learned_range'.

  Returns:
    (x_{t-1} [B, ...], x0_hat [B, ...]), dtype of x_t.
  """
  s = denoise.schedule
  t = batch_t(t, x_t)
  out = denoise.model_fn(x_t, t, denoise.cond)
  p, x0 = diffusion.p_mean_variance(
    s, out, x_t, t, prediction=denoise.prediction, variance=variance
  )
  mean = p.mean
  if denoise.thresholds:
    x0 = denoise.threshold(x0)
    mean = diffusion.q_posterior(s, x0, x_t, t).mean
  nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  x_prev = mean + nonzero * jnp.exp(0.5 * p.log_variance) * noise.astype(x_t.dtype)
  return x_prev.astype(x_t.dtype), x0


def ddpm_sample(
  denoise: VPDenoiser,
  x_T: Array,
  grid: Array,
  rng: Array,
  *,
  variance: str = "fixed_small",
  inpaint=None,
) -> Array:
  """Ancestral sampling along consecutive timesteps, from x_T to x_0.

  Args:
    denoise: the `VPDenoiser`.
    x_T: [B, ...] starting noise (explicit).
    grid: consecutive decreasing timesteps ending with -1: all T (`grids.ddpm_grid`) or its
      tail [k, k - 1, ..., -1] (SDEdit).
    rng: PRNG key; step i uses fold_in(rng, i).
    variance: see `ddpm_step`.
    inpaint: optional `editing.Inpaint` (replacement / RePaint; see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...], dtype of x_T.
  """

  def step(x, i, t, t_next, key):
    del i, t_next
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddpm_step(denoise, x, t, noise, variance=variance)[0]

  return sample_loop(step, x_T, grid, rng, inpaint=inpaint, schedule=denoise.schedule)[0]
