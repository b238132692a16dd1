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

from jdiff.samplers.denoisers import VPDenoiser
from jdiff.samplers.driver import sample_loop

Array = jax.Array


def ddim_step(
  denoise: VPDenoiser, x_t: Array, t: Array, t_prev: Array, noise: Array, *, eta: float = 0.0
) -> tuple[Array, Array]:
  """One DDIM step x_t -> x_{t_prev} with explicit noise ([DDIM] eqs. 12, 16). NFE 1.

  Args:
    denoise: the `VPDenoiser` (model, prediction, thresholding of x0_hat).
    x_t: [B, ...] current sample.
    t: scalar timestep, integer or fractional.
    t_prev: scalar target timestep, < t; negative means x_0 (x0_hat is returned).
    noise: [B, ...] standard normal noise (used when eta > 0).
    eta: stochasticity in [0, 1]; 1 is the ancestral (DDPM posterior) step.

  Returns:
    (x_{t_prev} [B, ...], x0_hat [B, ...]), dtype of x_t.
  """
  x0, eps = denoise(x_t, t)
  ab_t = denoise.alpha_bar(t)
  ab_prev = denoise.alpha_bar(t_prev)
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
  denoise: VPDenoiser,
  x_T: Array,
  grid: Array,
  rng: Array,
  *,
  eta: float = 0.0,
  inpaint=None,
) -> Array:
  """DDIM sampling from x_T along a timestep grid.

  Args:
    denoise: the `VPDenoiser`.
    x_T: [B, ...] starting noise (the sample at grid[0]).
    grid: decreasing timesteps (int or float) ending with -1 (`grids.timestep_grid`).
    rng: PRNG key; step i uses fold_in(rng, i).
    eta: 0 (deterministic) to 1 (ancestral-like).
    inpaint: optional `editing.Inpaint` (replacement / RePaint; see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...].
  """

  def step(x, i, t, t_prev, key):
    del i
    noise = jax.random.normal(key, x.shape, x.dtype)
    return ddim_step(denoise, x, t, t_prev, noise, eta=eta)[0]

  return sample_loop(step, x_T, grid, rng, inpaint=inpaint, schedule=denoise.schedule)[0]
