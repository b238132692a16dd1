"""Timestep grids (discrete samplers) and sigma grids (continuous samplers).

A timestep grid is a decreasing int32 array of timesteps ending with -1, which stands for
"the clean data" (alpha_bar = 1). A sigma grid is a decreasing float32 array of VE noise
levels sigma = sqrt((1 - alpha_bar) / alpha_bar) ending with 0 (the clean data); the
Karras / DPM-Solver samplers step along it.

References:
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models, 2021 (Sec. C.2).
  [Lin24] Lin et al. Common Diffusion Noise Schedules and Sample Steps are Flawed, 2024 (Table 2).
  [EDM] Karras et al. Elucidating the Design Space of Diffusion-Based Generative Models, 2022,
    eq. 5 (the rho-schedule).
  [DPM-Solver] Lu et al. DPM-Solver, 2022, Sec. 3.3 (steps uniform in lambda = log-SNR / 2).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from jdiff import continuous
from jdiff.schedules import Schedule

SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def timestep_grid(num_train_steps: int, num_steps: int, *, spacing: str = "leading",
                  offset: int = 0) -> jnp.ndarray:
  """Picks `num_steps` of the `num_train_steps` timesteps, in decreasing order, then -1.

  Args:
    num_train_steps: T of the schedule.
    num_steps: number of sampling steps N, 1 <= N <= T.
    spacing: 'leading' (0, k, 2k, ... with k = T // N, plus `offset`; DDIM / diffusers),
      'trailing' (T-1, T-1-k, ...; [Lin24], reaches the last timestep),
      'linspace' (round(linspace(0, T-1, N))), or 'quadratic' ([DDIM]'s CIFAR grid).
    offset: added to 'leading' steps (Stable Diffusion uses 1).

  Returns:
    int32 [N + 1] decreasing timesteps ending with -1.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
  t_max = num_train_steps - 1
  if spacing == "leading":
    ts = np.arange(num_steps) * (num_train_steps // num_steps) + offset
  elif spacing == "trailing":
    ts = np.round(np.arange(num_train_steps, 0, -num_train_steps / num_steps)) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, t_max, num_steps))
  else:
    ts = np.round(np.linspace(0, np.sqrt(t_max * 0.8), num_steps) ** 2)
  ts = np.unique(np.clip(ts.astype(np.int64), 0, t_max))[::-1]
  if ts.shape[0] != num_steps:
    raise ValueError(f"spacing {spacing!r} gives only {ts.shape[0]} distinct timesteps for "
                     f"num_steps={num_steps}, T={num_train_steps}")
  return jnp.asarray(np.concatenate([ts, [-1]]), jnp.int32)


SIGMA_SPACINGS = ("karras", "log_snr", "uniform", "trailing", "quadratic")
FINAL_SIGMAS = ("zero", "sigma_min")


def karras_sigmas(sigma_min, sigma_max, num_steps: int, *, rho: float = 7.0) -> jax.Array:
  """[EDM] eq. 5: sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, then 0.

  Args:
    sigma_min, sigma_max: end points, 0 < sigma_min < sigma_max (may be traced scalars).
    num_steps: N >= 1 (N = 1 gives [sigma_max, 0]).
    rho: the schedule's curvature (7 in [EDM]; 1 is uniform in sigma).

  Returns:
    float32 [N + 1], decreasing, ending with 0.
  """
  _check_num_steps(num_steps)
  if rho <= 0:
    raise ValueError(f"rho must be positive, got {rho}")
  ramp = jnp.linspace(0.0, 1.0, num_steps, dtype=jnp.float32)
  lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
  hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
  sig = (hi + ramp * (lo - hi)) ** rho
  return jnp.concatenate([sig, jnp.zeros((1,), jnp.float32)])


def sigma_grid(schedule: Schedule, num_steps: int, *, spacing: str = "karras",
               rho: float = 7.0, sigma_min=None, sigma_max=None,
               final: str = "zero") -> jax.Array:
  """A decreasing sigma grid of `num_steps` noise levels on the schedule, then 0.

  With final='sigma_min' the grid has no trailing 0: its N + 1 levels span [sigma_min,
  sigma_max] (the `num_steps + 1`-level grid without its 0), so a one-call-per-step solver
  spends every call on a real step and ends at sigma_min, the noise level of the first
  training timestep, instead of spending its last call on the jump sigma_min -> 0
  (diffusers' `final_sigmas_type='sigma_min'`, for grids that end at t = 0).

  Args:
    schedule: the `Schedule`; by default the grid spans its [sigma(0), sigma(T-1)].
    num_steps: number of noise levels N >= 1 (sampler steps; NFE depends on the sampler).
    spacing: 'karras' ([EDM] eq. 5 with `rho`), 'log_snr' (uniform in log sigma, i.e. in
      lambda = -log sigma = log-SNR / 2; [DPM-Solver] Sec. 3.3), 'uniform' (fractional
      timesteps linspace(T-1, 0, N), as k-diffusion's `get_sigmas`), 'trailing' or
      'quadratic' (the integer timesteps of `timestep_grid`, mapped to sigmas).
    rho: curvature of the 'karras' spacing.
    sigma_min, sigma_max: override the end points ('karras' and 'log_snr' only).
    final: 'zero' (the grid ends with 0) or 'sigma_min' (see above).

  Returns:
    float32 [N + 1], strictly decreasing, ending with 0 (final='zero') or sigma_min.
  """
  if spacing not in SIGMA_SPACINGS:
    raise ValueError(f"unknown sigma spacing {spacing!r}; choose one of {SIGMA_SPACINGS}")
  if final not in FINAL_SIGMAS:
    raise ValueError(f"unknown final sigma {final!r}; choose one of {FINAL_SIGMAS}")
  _check_num_steps(num_steps)
  if final == "sigma_min":
    return sigma_grid(schedule, num_steps + 1, spacing=spacing, rho=rho, sigma_min=sigma_min,
                      sigma_max=sigma_max)[:-1]
  s_min, s_max = continuous.sigma_min_max(schedule)
  s_min = s_min if sigma_min is None else jnp.asarray(sigma_min, jnp.float32)
  s_max = s_max if sigma_max is None else jnp.asarray(sigma_max, jnp.float32)
  zero = jnp.zeros((1,), jnp.float32)
  if spacing == "karras":
    return karras_sigmas(s_min, s_max, num_steps, rho=rho)
  if spacing == "log_snr":
    sig = jnp.exp(jnp.linspace(jnp.log(s_max), jnp.log(s_min), num_steps, dtype=jnp.float32))
    return jnp.concatenate([sig, zero])
  if spacing == "uniform":
    t = jnp.linspace(schedule.num_steps - 1, 0, num_steps, dtype=jnp.float32)
  else:
    t = timestep_grid(schedule.num_steps, num_steps, spacing=spacing)[:-1]
  return jnp.concatenate([continuous.t_to_sigma(schedule, t), zero])


def _check_num_steps(num_steps) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
