"""Continuous-time view of a discrete schedule: sigma <-> fractional timestep, denoisers.

A discrete VP schedule alpha_bar_t (t = 0..T-1) is made continuous the way k-diffusion's
`DiscreteSchedule` does it: the variance-exploding noise level
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is interpolated *linearly in log-sigma*
between integer timesteps. So a fractional timestep t in [0, T-1] has

  log sigma(t) = interp(t, [0..T-1], log sigma_[0..T-1]),   alpha_bar(t) = 1 / (1 + sigma(t)^2),

and `sigma_to_t` is the exact inverse of `t_to_sigma` on [sigma_min, sigma_max]. At integer t
both agree with the `Schedule` to float32 rounding. Timestep -1 (or any t < 0) means the clean data
(sigma = 0, alpha_bar = 1), as in `timestep_grid`.

The VE view used by the Karras / DPM-Solver samplers is x_ve = x_t / sqrt(alpha_bar) = x_0 +
sigma eps; the model, which is trained on x_t, is called on x_ve * sqrt(alpha_bar) at the
fractional timestep t(sigma) (float32 [B]). Its prediction is converted by the one conversion,
`diffusion.convert_prediction`, at coefficients computed from sigma (`vp_coefs`), which are
exact near sigma = 0 where 1 - alpha_bar would cancel.

`Schedule` and `processes.Process` share one protocol of methods (kind, t_min / t_max /
t_scale, sigma_min_max, t_to_sigma / sigma_to_t, check_prediction, make_denoiser); the module
functions of the same names take either and dispatch through those methods.

References:
  [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based
    Generative Models, 2022, Sec. 2 and Table 1 (VP as VE with scaling s(t)).
  [k-diffusion] Crowson, `k_diffusion.external.DiscreteSchedule` (t <-> sigma).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion

if TYPE_CHECKING:  # annotations only: Schedule's protocol methods call into this module
  from jdiff.schedules import Schedule

Array = jax.Array
# What the protocol functions accept: a discrete `Schedule` or a continuous `processes.Process`,
# which share kind, t_min / t_max / t_scale, sigma_min_max, t_to_sigma / sigma_to_t,
# check_prediction and make_denoiser.
Noise = "Schedule | processes.Process"
# denoise(x_ve [B, ...], sigma scalar or [B]) -> x0_hat [B, ...]
Denoiser = Callable[[Array, Array], Array]

# The protocol functions below take a `Schedule` or a `processes.Process` (Noise) and dispatch
# through its methods; they stay as module functions for existing callers.


def log_sigmas(schedule: Schedule) -> Array:
  """`Schedule.log_sigmas`: log sigma_t, float32 [T], increasing in t."""
  return schedule.log_sigmas()


def sigma_min_max(noise: Noise) -> tuple[Array, Array]:
  """`noise.sigma_min_max()`: the VE sigmas at t_min and t_max, float32 scalars."""
  return noise.sigma_min_max()


def t_to_sigma(noise: Noise, t: Array) -> Array:
  """`noise.t_to_sigma(t)`: sigma at times t (a `Schedule`'s fractional timesteps)."""
  return noise.t_to_sigma(t)


def sigma_to_t(noise: Noise, sigma: Array) -> Array:
  """`noise.sigma_to_t(sigma)`: the time at VE noise levels sigma, the inverse of t_to_sigma."""
  return noise.sigma_to_t(sigma)


def check_prediction(noise: Noise, prediction: str) -> None:
  """`noise.check_prediction(prediction)`: ValueError unless the noise supports it."""
  noise.check_prediction(prediction)


def alpha_bar_at(schedule: Schedule, t: Array) -> Array:
  """alpha_bar(t) = 1 / (1 + sigma(t)^2) at fractional t; 1 where t < 0. float32, t's shape."""
  return 1.0 / (1.0 + t_to_sigma(schedule, t) ** 2)


def _bcast(a: Array, x: Array) -> Array:
  a = jnp.asarray(a, jnp.float32)
  if a.ndim == 0:
    return a
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def vp_coefs(sigma: Array, x: Array) -> tuple[Array, Array]:
  """(sqrt(ab), sqrt(1 - ab)) at noise level sigma, broadcastable against x [B, ...], float32.

  With ab = 1 / (1 + sigma^2): sqrt(ab) = 1 / sqrt(1 + sigma^2) and
  sqrt(1 - ab) = sigma / sqrt(1 + sigma^2), both to float32 rounding for every sigma >= 0;
  forming 1 - ab instead loses ~1e-7 / sigma^2 relative precision near sigma = 0 (t = 0).

  Args:
    sigma: scalar or [B] noise levels (0: clean data).
    x: [B, ...] the array the coefficients multiply.
  """
  sig = _bcast(sigma, x)
  a = jax.lax.rsqrt(1.0 + sig**2)
  return a, sig * a


def _convert(a: Array, s: Array, x_t: Array, pred: Array, prediction: str):
  return diffusion.convert_prediction(
    a, s, x_t.astype(jnp.float32), pred.astype(jnp.float32), prediction=prediction
  )


def to_x0_eps_at(
  alpha_bar: Array, x_t: Array, pred: Array, *, prediction: str = "eps"
) -> tuple[Array, Array]:
  """`diffusion.convert_prediction` at an explicit alpha_bar (scalar or [B]), in float32.

  sqrt(1 - alpha_bar) is formed from alpha_bar here, so near alpha_bar = 1 it carries the
  cancellation error of 1 - alpha_bar; where sigma or t is known, `to_x0_eps` (or
  `vp_coefs` with `diffusion.convert_prediction`) is exact to float32 rounding.

  Args:
    alpha_bar: scalar or [B] float, in (0, 1].
    x_t: [B, ...] VP-noisy input.
    pred: [B, ...] model output of kind `prediction`.
    prediction: 'eps', 'x0' or 'v'.

  Returns:
    (x0_hat, eps_hat), each [B, ...] float32.
  """
  ab = _bcast(alpha_bar, x_t)
  return _convert(jnp.sqrt(ab), jnp.sqrt(1.0 - ab), x_t, pred, prediction)


def to_x0_eps_sigma(
  sigma: Array, x_t: Array, pred: Array, *, prediction: str = "eps"
) -> tuple[Array, Array]:
  """`diffusion.convert_prediction` at noise level sigma (scalar or [B]), in float32.

  The coefficients come from sigma (`vp_coefs`), exact to float32 rounding near sigma = 0.

  Args:
    sigma: scalar or [B] noise levels; x_t = x0 / sqrt(1 + sigma^2) + eps sigma / sqrt(...).
    x_t: [B, ...] VP-noisy input.
    pred: [B, ...] model output of kind `prediction`.
    prediction: 'eps', 'x0' or 'v'.

  Returns:
    (x0_hat, eps_hat), each [B, ...] float32.
  """
  return _convert(*vp_coefs(sigma, x_t), x_t, pred, prediction)


def to_x0_eps(
  schedule: Schedule, x_t: Array, t: Array, pred: Array, *, prediction: str = "eps"
) -> tuple[Array, Array]:
  """`diffusion.to_x0_eps` at fractional timesteps t [B] (float or int), in float32.

  Converts at sigma(t), so at integer t it agrees with `diffusion.to_x0_eps` to float32
  rounding, t = 0 included.
  """
  return to_x0_eps_sigma(t_to_sigma(schedule, t), x_t, pred, prediction=prediction)


def batch_sigma(sigma: Array, x: Array) -> Array:
  """A scalar or [B] sigma as float32 [B]."""
  return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))


def make_denoiser(noise: Noise, model_fn: diffusion.ModelFn, **options) -> Denoiser:
  """`noise.make_denoiser(model_fn, **options)`: the EDM denoiser D(x_ve, sigma) -> x0_hat of a
  model of a `Schedule` (`vp_denoiser`, which documents the options) or of a
  `processes.Process` (`processes.make_denoiser`)."""
  return noise.make_denoiser(model_fn, **options)


def vp_denoiser(
  schedule: Schedule,
  model_fn: diffusion.ModelFn,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Denoiser:
  """Wraps a VP `model_fn(x_t, t, cond)` as an EDM-style denoiser D(x_ve, sigma) -> x0_hat.

  D calls the model once, on x_t = x_ve / sqrt(1 + sigma^2) at the fractional timestep
  t(sigma) (float32 [B]), and converts its prediction to x0 at alpha_bar = 1 / (1 + sigma^2)
  ([EDM] Table 1, VP preconditioning with a discrete-time model as in k-diffusion).

  Args:
    schedule: the `Schedule` the model was trained with.
    model_fn: `model_fn(x_t, t, cond) -> [B, ...]`.
    cond: conditioning passed through to model_fn.
    prediction: what the model predicts: 'eps', 'x0' or 'v'.
    clip_x0, dynamic_percentile: static clipping / dynamic thresholding of x0_hat inside the
      denoiser (`diffusion.threshold_x0`), so every sigma-grid sampler sees the thresholded
      data prediction.

  Returns:
    `denoise(x_ve [B, ...], sigma scalar or [B]) -> x0_hat [B, ...]` (dtype of x_ve).
  """
  diffusion.check_prediction(prediction)
  diffusion.check_threshold(clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)

  def denoise(x: Array, sigma: Array) -> Array:
    sig = batch_sigma(sigma, x)
    x_t = (x.astype(jnp.float32) * vp_coefs(sig, x)[0]).astype(x.dtype)
    out = model_fn(x_t, schedule.sigma_to_t(sig), cond)
    x0 = to_x0_eps_sigma(sig, x_t, out, prediction=prediction)[0]
    x0 = diffusion.threshold_x0(x0, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
    return x0.astype(x.dtype)

  return denoise


def check_sigma_grid(grid: Array) -> Array:
  """Validates a decreasing float sigma grid [N + 1] ending with 0 (concrete grids only)."""
  grid = jnp.asarray(grid, jnp.float32)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f"sigma grid must be 1-D with at least 2 entries, got shape {grid.shape}")
  try:
    g = np.asarray(grid)
  except jax.errors.TracerArrayConversionError:  # traced inside jit: values unknown
    return grid
  if g[-1] != 0.0:
    raise ValueError(f"sigma grid must end with 0, got last value {g[-1]}")
  if np.any(g[1:] >= g[:-1]):
    raise ValueError(f"sigma grid must be strictly decreasing, got {g}")
  return grid
