"""Karras-style samplers in sigma space: Euler, Heun (EDM Alg. 1), Euler-ancestral, EDM Alg. 2.

All work on the variance-exploding view x_ve = x_t / sqrt(alpha_bar) = x_0 + sigma eps of a
VP model (see `jdiff.continuous`), along a decreasing sigma grid ending with 0
(`grids.sigma_grid`, Karras rho = 7 by default). The probability-flow ODE there is
dx/dsigma = (x - D(x, sigma)) / sigma, D the denoiser ([EDM] eq. 4 with s = 1, sigma(t) = t).

Every `*_sample` takes a denoiser `denoise(x_ve, sigma)` (`denoisers.make_denoiser`), the VE
start x_ve = x_T sqrt(1 + sigma_0^2) (`grids.ve_start`), the sigma grid and an rng, and returns
x_0 [B, ...]. A step function takes the denoiser and explicit noise, so a run can be replayed
step by step.

NFE (model calls) for N sigma levels (a grid of N + 1 entries):
  Euler N; Heun 2N - 1 (the last step, to sigma = 0, is Euler, as in EDM);
  Euler-ancestral N; EDM stochastic 2N - 1.

References:
  [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based
    Generative Models, 2022, Algorithms 1 and 2, eq. 5.
  [k-diffusion] Crowson, `k_diffusion.sampling` (sample_euler_ancestral, get_ancestral_step).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jdiff import continuous
from jdiff.samplers.driver import sample_loop

Array = jax.Array
Denoiser = continuous.Denoiser


def _safe(s: Array) -> Array:
  return jnp.where(s > 0, s, 1.0)


def to_d(x: Array, sigma: Array, denoised: Array) -> Array:
  """The ODE derivative dx/dsigma = (x - D(x; sigma)) / sigma ([EDM] Alg. 1 line 4)."""
  return (x - denoised) / jnp.asarray(sigma, x.dtype)


def euler_step(denoise: Denoiser, x: Array, sigma: Array, sigma_next: Array) -> Array:
  """One Euler step of the PF-ODE from sigma to sigma_next (NFE 1).

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat`.
    x: [B, ...] VE sample at sigma.
    sigma, sigma_next: scalars, sigma > sigma_next >= 0.

  Returns:
    x at sigma_next, [B, ...].
  """
  d = to_d(x, sigma, denoise(x, sigma))
  return x + (sigma_next - sigma).astype(x.dtype) * d


def heun_step(denoise: Denoiser, x: Array, sigma: Array, sigma_next: Array) -> Array:
  """One step of Heun's 2nd-order method ([EDM] Alg. 1 lines 3-8).

  NFE 2, or 1 when sigma_next = 0 (the correction is skipped with `lax.cond`, so the
  second model call does not run).
  """
  dt = (sigma_next - sigma).astype(x.dtype)
  d = to_d(x, sigma, denoise(x, sigma))
  x_euler = x + dt * d

  def correct(_):
    d_next = to_d(x_euler, _safe(sigma_next), denoise(x_euler, _safe(sigma_next)))
    return x + dt * 0.5 * (d + d_next)

  return jax.lax.cond(sigma_next > 0, correct, lambda _: x_euler, None)


def ancestral_sigmas(sigma: Array, sigma_next: Array, *, eta: float = 1.0) -> tuple[Array, Array]:
  """(sigma_down, sigma_up) of an ancestral step: sigma_down^2 + sigma_up^2 = sigma_next^2.

  sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)) is the
  std of the DDPM posterior in the VE view (k-diffusion's `get_ancestral_step`).
  """
  up = jnp.minimum(
    sigma_next,
    eta * jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)),
  )
  down = jnp.sqrt(jnp.maximum(sigma_next**2 - up**2, 0.0))
  return down, up


def euler_ancestral_step(
  denoise: Denoiser,
  x: Array,
  sigma: Array,
  sigma_next: Array,
  noise: Array,
  *,
  eta: float = 1.0,
  s_noise: float = 1.0,
) -> Array:
  """Euler step to sigma_down, then fresh noise of std sigma_up (NFE 1).

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat`.
    x: [B, ...] VE sample at sigma.
    sigma, sigma_next: scalars.
    noise: [B, ...] standard normal noise.
    eta: 1 is ancestral (DDPM-like) sampling, 0 is the Euler ODE step.
    s_noise: scale of the added noise.
  """
  down, up = ancestral_sigmas(sigma, sigma_next, eta=eta)
  d = to_d(x, sigma, denoise(x, sigma))
  x = x + (down - sigma).astype(x.dtype) * d
  return x + (up * s_noise).astype(x.dtype) * noise.astype(x.dtype)


def edm_stochastic_step(
  denoise: Denoiser,
  x: Array,
  sigma: Array,
  sigma_next: Array,
  noise: Array,
  *,
  gamma: Array,
  s_noise: float = 1.0,
  sigma_cap: Array | None = None,
) -> Array:
  """[EDM] Alg. 2, one step: raise the noise to sigma_hat = sigma (1 + gamma), then Heun.

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat`.
    x: [B, ...] VE sample at sigma.
    sigma, sigma_next: scalars.
    noise: [B, ...] standard normal noise (the churn).
    gamma: scalar churn factor >= 0 (0: a plain Heun step).
    s_noise: S_noise of [EDM] (slightly > 1 offsets the denoiser's detail loss).
    sigma_cap: optional largest sigma the model knows (the schedule's sigma_max): sigma_hat is
      clipped to it, since a discrete model is undefined above its last timestep.

  Returns:
    x at sigma_next, [B, ...]. NFE 2, or 1 when sigma_next = 0.
  """
  sigma_hat = sigma * (1.0 + gamma)
  if sigma_cap is not None:
    sigma_hat = jnp.maximum(jnp.minimum(sigma_hat, sigma_cap), sigma)
  # (sigma_hat - sigma)(sigma_hat + sigma), not sigma_hat^2 - sigma^2: the latter is not 0 at
  # gamma = 0 once XLA fuses it into an FMA (~ulp(6400) at sigma = 80, i.e. noise of std 0.02).
  extra = jnp.sqrt(jnp.maximum((sigma_hat - sigma) * (sigma_hat + sigma), 0.0)) * s_noise
  x_hat = x + extra.astype(x.dtype) * noise.astype(x.dtype)
  return heun_step(denoise, x_hat, sigma_hat, sigma_next)


def edm_gamma(
  sigma: Array, num_steps: int, *, s_churn: float, s_tmin: float = 0.0, s_tmax: float = float("inf")
) -> Array:
  """gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma_i <= S_tmax, else 0.

  [EDM] Alg. 2.
  """
  g = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
  return jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), g, 0.0)


# ----------------------------------------------------------------------------- samplers
# Each takes a ready denoiser, the VE start x = x_T sqrt(1 + sigma_0^2) and its sigma grid
# (`registry.sample` builds all three once), as k-diffusion's `sample_*(model, x, sigmas)`.


def _walk(step, x: Array, grid: Array, rng: Array, inpaint) -> Array:
  """Runs `step(x, s, s_next, key)` over the grid in the VE space (inpainting included)."""
  return sample_loop(
    lambda c, i, s, s_next, key: step(c, s, s_next, key), x, grid, rng, inpaint=inpaint, space="ve"
  )[0]


def euler_sample(denoise: Denoiser, x: Array, grid: Array, rng: Array, *, inpaint=None) -> Array:
  """Euler PF-ODE sampler ([EDM] Alg. 1 without the correction). NFE = N.

  Args:
    denoise: `denoise(x_ve, sigma) -> x0_hat` (`denoisers.make_denoiser`).
    x: [B, ...] VE sample at grid[0].
    grid: [N + 1] decreasing sigmas ending with 0 (`grids.sigma_grid`).
    rng: PRNG key (unused by this deterministic sampler; kept for a uniform API).
    inpaint: optional `editing.Inpaint` (see `driver.sample_loop`).

  Returns:
    x_0 samples [B, ...].
  """
  return _walk(lambda x, s, s_next, key: euler_step(denoise, x, s, s_next), x, grid, rng, inpaint)


def heun_sample(denoise: Denoiser, x: Array, grid: Array, rng: Array, *, inpaint=None) -> Array:
  """EDM's deterministic 2nd-order sampler ([EDM] Alg. 1). NFE = 2 N - 1.

  Args: as `euler_sample`. EDM starts its grid at sigma_max = 80 ([EDM] Table 1;
    `grids.sigma_grid(sigma_max=80)`): on a VP schedule whose sigma(T-1) is ~1e4 (cosine,
    T = 1000) a few-step grid from there takes steps whose sigma ratio Heun's trapezoid cannot
    follow, while x_T sqrt(1 + 80^2) already has the marginal of sigma = 80 up to the data's
    variance over 80^2.
  """
  return _walk(lambda x, s, s_next, key: heun_step(denoise, x, s, s_next), x, grid, rng, inpaint)


def euler_ancestral_sample(
  denoise: Denoiser,
  x: Array,
  grid: Array,
  rng: Array,
  *,
  eta: float = 1.0,
  s_noise: float = 1.0,
  inpaint=None,
) -> Array:
  """Euler-ancestral sampler (k-diffusion's `sample_euler_ancestral`). NFE = N.

  Args: as `euler_sample`, plus eta (ancestral noise fraction) and s_noise.
  """

  def step(x, s, s_next, key):
    noise = jax.random.normal(key, x.shape, x.dtype)
    return euler_ancestral_step(denoise, x, s, s_next, noise, eta=eta, s_noise=s_noise)

  return _walk(step, x, grid, rng, inpaint)


def edm_sample(
  denoise: Denoiser,
  x: Array,
  grid: Array,
  rng: Array,
  *,
  s_churn: float = 0.0,
  s_tmin: float = 0.0,
  s_tmax: float = float("inf"),
  s_noise: float = 1.0,
  inpaint=None,
) -> Array:
  """EDM's stochastic sampler ([EDM] Alg. 2). NFE = 2 N - 1.

  s_churn = 0 is exactly `heun_sample`. sigma_hat is clipped to the sigma_max of
  `denoise.schedule` (the model is undefined above it).

  Args: as `euler_sample`, plus S_churn, S_tmin, S_tmax, S_noise of [EDM] Alg. 2.
  """
  if s_churn < 0 or s_noise < 0:
    raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
  cap = continuous.sigma_min_max(denoise.schedule)[1]
  n = grid.shape[0] - 1

  def step(x, s, s_next, key):
    noise = jax.random.normal(key, x.shape, x.dtype)
    gamma = edm_gamma(s, n, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
    return edm_stochastic_step(
      denoise, x, s, s_next, noise, gamma=gamma, s_noise=s_noise, sigma_cap=cap
    )

  return _walk(step, x, grid, rng, inpaint)
