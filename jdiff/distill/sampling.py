"""Consistency models on jdiff's denoisers: the consistency function of a diffusion network and
[CM] Alg. 1 as a registry sampler (`samplers.registry.DISTILLED_SAMPLERS['consistency']`).

References:
  [CM] Song, Dhariwal, Chen, Sutskever. Consistency Models, ICML 2023, Sec. 3, Alg. 1.
  [LCM] Luo et al. Latent Consistency Models, 2023 (f from a pretrained denoiser).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.distill.consistency import ConsistencyFn, Denoiser, _b, cm_coefs, consistency_step
from jdiff.samplers.driver import sample_loop

Array = jax.Array


def denoiser_consistency_fn(
  denoise: Denoiser, *, sigma_min: float, sigma_data: float = 0.5
) -> ConsistencyFn:
  """f(x, sigma) = c_skip x + (1 - c_skip) D(x, sigma), c_skip of `cm_coefs`: a consistency
  function made of a denoiser D (any diffusion network through `continuous.make_denoiser`).

  f(x, sigma_min) = x exactly (c_skip = 1), and f -> D where c_skip -> 0 (sigma >> sigma_data),
  so a student initialised from a diffusion teacher starts at the teacher's one-step denoiser
  (LCM's parameterisation of a pretrained model, with [CM]'s c_skip).
  """

  def f(x: Array, sigma: Array) -> Array:
    sig = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    c_skip = _b(cm_coefs(sig, sigma_min=sigma_min, sigma_data=sigma_data)[0], x)
    xf = x.astype(jnp.float32)
    d = jnp.where(c_skip == 1.0, 0.0, denoise(x, sig).astype(jnp.float32))
    return (c_skip * xf + (1.0 - c_skip) * d).astype(x.dtype)

  return f


def consistency_denoiser_sample(denoise, x: Array, grid: Array, rng: Array, *, inpaint=None):
  """[CM] Alg. 1 as a registry sampler: `denoise` is the student's `SigmaDenoiser`, x the VE
  sample at grid[0], grid the decreasing levels [tau_1 = sigma_max, ..., sigma_min] (or ending
  with 0); f = `denoiser_consistency_fn` with sigma_min = sigma(t = 0) of the schedule.

  The last level is the clean data (f's output at sigma_min carries no noise), so inpainting
  returns the known pixels exactly.
  """
  sigma_min = jnp.asarray(denoise.schedule.sigma_min_max()[0], jnp.float32)
  f = denoiser_consistency_fn(denoise, sigma_min=sigma_min)
  grid = jnp.concatenate([jnp.asarray(grid[:-1], jnp.float32), jnp.zeros((1,), jnp.float32)])

  def step(x, i, sigma, sigma_next, key):
    del i
    noise = jax.random.normal(key, x.shape, x.dtype)
    return consistency_step(f, x, sigma, sigma_next, noise, sigma_min=sigma_min)

  return sample_loop(step, x, grid, rng, inpaint=inpaint, schedule=denoise.schedule, space="ve")[0]
