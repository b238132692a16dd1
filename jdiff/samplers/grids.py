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

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import continuous
from jdiff.schedules import Schedule

SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def timesteps(
  num_train_steps: int, num_steps: int, *, spacing: str = "leading", offset: int = 0
) -> np.ndarray:
  """The `num_steps` distinct timesteps of a spacing, increasing, as host int64 [N].

  Computed in exact arithmetic: integer numerators over integer denominators, so every
  1 <= N <= T gives N distinct timesteps ('leading' with an `offset` may leave [0, T-1]).

  Args:
    num_train_steps: T of the schedule.
    num_steps: number of sampling steps N, 1 <= N <= T.
    spacing: 'leading' (i (T // N) + offset; DDIM / diffusers), 'trailing' (round(T (N - i) /
      N) - 1, half to even as diffusers' `np.round`; [Lin24], reaches T - 1), 'linspace'
      (round(i (T - 1) / (N - 1))), or 'quadratic' ([DDIM]'s int(linspace(0, sqrt(0.8 T),
      N)^2); where that repeats a timestep, which it does near t = 0 for large N, the repeat
      is moved to the next free timestep, so N distinct steps are taken).
    offset: added to 'leading' steps (Stable Diffusion uses 1).

  Returns:
    int64 [N], strictly increasing, in [0, T - 1].
  """
  if spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps must be an integer in [1, {num_train_steps}], got {num_steps!r}")
  t, n = int(num_train_steps), int(num_steps)
  i = np.arange(n, dtype=np.int64)
  if spacing == "leading":
    ts = i * (t // n) + offset
  elif spacing == "trailing":
    # T (N - i) / N as one correctly rounded division: a true half-integer stays exact, so
    # np.round breaks ties as diffusers does (its float `arange` step drifted instead).
    ts = (np.round(t * (n - i) / n) - 1).astype(np.int64)[::-1]
  elif spacing == "linspace":
    ts = np.round(i * (t - 1) / max(n - 1, 1)).astype(np.int64)
  else:
    ts = (np.linspace(0, np.sqrt(t * 0.8), n) ** 2).astype(np.int64)
    ts = np.maximum.accumulate(ts - i) + i  # ts_i = max(ts_i, ts_{i-1} + 1): no repeats
  if np.any(np.diff(ts) <= 0) or ts[0] < 0 or ts[-1] > t - 1:
    raise ValueError(
      f"spacing {spacing!r} with offset={offset} does not give {n} distinct "
      f"timesteps in [0, {t - 1}]: {ts}"
    )
  return ts


def timestep_grid(
  num_train_steps: int, num_steps: int, *, spacing: str = "leading", offset: int = 0
) -> jnp.ndarray:
  """`timesteps` in decreasing order, then -1 (the clean data): the discrete samplers' grid.

  Args: as `timesteps`.

  Returns:
    int32 [N + 1] decreasing timesteps ending with -1.
  """
  ts = timesteps(num_train_steps, num_steps, spacing=spacing, offset=offset)
  return jnp.asarray(np.concatenate([ts[::-1], [-1]]), jnp.int32)


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


def sigma_grid(
  schedule: Schedule,
  num_steps: int,
  *,
  spacing: str = "karras",
  rho: float = 7.0,
  sigma_min=None,
  sigma_max=None,
  final: str = "zero",
) -> jax.Array:
  """A decreasing sigma grid of `num_steps` noise levels on the schedule, then 0.

  With final='sigma_min' the grid has no trailing 0: it is the spacing's grid of N + 1 levels
  with its smallest level set to sigma(t = 0) (for 'karras', 'log_snr' and 'uniform' it is
  already there; 'trailing' and 'quadratic' otherwise stop above t = 0). So a
  one-call-per-step solver spends every call on a real step and ends at the noise level of
  the first training timestep, on every spacing, instead of spending its last call on the
  jump to 0 (diffusers' `final_sigmas_type='sigma_min'`).

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

  A `processes.Process` in place of the schedule spans its [sigma_min, sigma_max]; there
  'uniform' and 'trailing' are both uniform in the process's time t, from t_max to t_min.

  Returns:
    float32 [N + 1], strictly decreasing, ending with 0 (final='zero') or sigma_min
    (final='sigma_min': sigma(t = 0), or the `sigma_min` given for 'karras' / 'log_snr').
  """
  if spacing not in SIGMA_SPACINGS:
    raise ValueError(f"unknown sigma spacing {spacing!r}; choose one of {SIGMA_SPACINGS}")
  if final not in FINAL_SIGMAS:
    raise ValueError(f"unknown final sigma {final!r}; choose one of {FINAL_SIGMAS}")
  _check_num_steps(num_steps)
  discrete = schedule.kind == "discrete"
  if spacing == "quadratic" and not discrete:
    raise ValueError(
      "sigma spacing 'quadratic' takes the integer timesteps of a discrete Schedule; a "
      f"{type(schedule).__name__} has none: use one of {SIGMA_SPACINGS[:4]}"
    )
  if final == "sigma_min" and discrete and spacing in ("trailing", "quadratic"):
    if num_steps >= schedule.num_steps:
      raise ValueError(
        f"final='sigma_min' with spacing {spacing!r} takes num_steps + 1 distinct integer "
        f"timesteps, so num_steps must be <= T - 1 = {schedule.num_steps - 1}; got "
        f"num_steps={num_steps} (use final='zero', or spacing 'uniform' / 'log_snr' / 'karras')"
      )
  if final == "sigma_min":
    g = sigma_grid(
      schedule, num_steps + 1, spacing=spacing, rho=rho, sigma_min=sigma_min, sigma_max=sigma_max
    )[:-1]
    if spacing in ("trailing", "quadratic"):  # the others already end at sigma_min
      g = g.at[-1].set(continuous.sigma_min_max(schedule)[0])
    return g
  if (sigma_min is not None or sigma_max is not None) and spacing not in ("karras", "log_snr"):
    raise ValueError(
      f"sigma_min / sigma_max override the end points of the 'karras' and 'log_snr' grids "
      f"only, got spacing={spacing!r}"
    )
  s_min, s_max = schedule.sigma_min_max()
  if spacing == "uniform" or (spacing == "trailing" and not discrete):
    # Uniform in time t; a continuous process has no integer timesteps: trailing is uniform.
    t = jnp.linspace(schedule.t_max, schedule.t_min, num_steps, dtype=jnp.float32)
    return jnp.concatenate([schedule.t_to_sigma(t), jnp.zeros((1,), jnp.float32)])
  s_min = s_min if sigma_min is None else jnp.asarray(sigma_min, jnp.float32)
  # Above the schedule's sigma_max the model is undefined: clamp there, as EDM's sampler does.
  s_max = s_max if sigma_max is None else jnp.minimum(jnp.asarray(sigma_max, jnp.float32), s_max)
  zero = jnp.zeros((1,), jnp.float32)
  if spacing == "karras":
    return karras_sigmas(s_min, s_max, num_steps, rho=rho)
  if spacing == "log_snr":
    sig = jnp.exp(jnp.linspace(jnp.log(s_max), jnp.log(s_min), num_steps, dtype=jnp.float32))
    return jnp.concatenate([sig, zero])
  t = timestep_grid(schedule.num_steps, num_steps, spacing=spacing)[:-1]
  return jnp.concatenate([schedule.t_to_sigma(t), zero])


def ddpm_grid(num_train_steps: int) -> jax.Array:
  """Every timestep T-1, ..., 0, then -1: ancestral sampling's grid, int32 [T + 1]."""
  return jnp.arange(num_train_steps - 1, -2, -1, dtype=jnp.int32)


def ve_start(x_T: jax.Array, grid: jax.Array) -> jax.Array:
  """The VE sample x_T sqrt(1 + sigma_0^2) at grid[0] of standard normal x_T [B, ...].

  x_T is the VP sample at the first level (as DDIM's), so every sampler starts from the
  same noise whatever its space.
  """
  return x_T * jnp.sqrt(1.0 + grid[0] ** 2).astype(x_T.dtype)


def lambda_step(sigma: jax.Array, sigma_next: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A grid step in lambda = -log sigma, for the exponential integrators.

  Returns:
    (h = lambda_next - lambda, sigma_next with 0 replaced by 1 (safe to divide / log),
     is_last: sigma_next == 0, where the step returns the data prediction instead).
  """
  last = sigma_next <= 0
  sn = jnp.where(last, 1.0, sigma_next)
  return jnp.log(sigma) - jnp.log(sn), sn, last


def _check_num_steps(num_steps) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
