"""The model-function chain, composed once: network -> guidance -> prediction half -> denoiser.

A sampler never sees the network. The caller builds, once per sample call,

  chain    = compose(partial(guided, ...),         # classifier-free guidance (optional)
                     eps_half)                     # learned-variance models (optional)
  denoise  = make_denoiser(schedule, chain(model_fn), space=..., cond=..., prediction=...,
                           clip_x0=..., dynamic_percentile=...)   # x0 thresholding inside

and hands `denoise` to the sampler with its grid, as k-diffusion's `(model, x, sigmas)`.
Thresholding lives in the denoiser, so every sampler sees the clipped data prediction.

Two spaces ('vp' timesteps, 've' sigmas; see `jdiff.samplers.editing`):
  * `SigmaDenoiser`: `denoise(x_ve, sigma) -> x0_hat`, the EDM denoiser D of the
    sigma-grid samplers (`continuous.make_denoiser`).
  * `VPDenoiser`: `denoise(x_t, t) -> (x0_hat, eps_hat)` at integer or fractional t, for the
    timestep samplers (DDPM, DDIM, predictor-corrector), which also read alpha_bar(t).
Both carry the schedule they live on (the driver's inpainting and EDM's sigma cap use it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jdiff import continuous, diffusion
from jdiff.models import guidance_schedules
from jdiff.models.guidance import cfg_model_fn
from jdiff.samplers.driver import batch_t

Array = jax.Array
ModelFn = Callable[[Array, Array, Any], Array]
SPACES = ("vp", "ve")


def _is_int(t: Array) -> bool:
  return jnp.issubdtype(jnp.asarray(t).dtype, jnp.integer)


def alpha_bar_or_one(schedule, t: Array) -> Array:
  """alpha_bar_t as float32, with t < 0 meaning the clean data (alpha_bar = 1).

  Integer t reads the schedule; fractional t interpolates (`continuous.alpha_bar_at`).
  """
  if not _is_int(t):
    return continuous.alpha_bar_at(schedule, t)
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


class SigmaDenoiser(NamedTuple):
  """D(x_ve, sigma) -> x0_hat [B, ...] on `schedule` (a `Schedule` or a `processes.Process`)."""

  fn: Callable[[Array, Array], Array]
  schedule: Any

  def __call__(self, x: Array, sigma: Array) -> Array:
    return self.fn(x, sigma)


class VPDenoiser(NamedTuple):
  """`denoise(x_t, t) -> (x0_hat, eps_hat)` from one model call, x0_hat thresholded.

  Attributes:
    schedule: the discrete `Schedule`.
    model_fn: `model_fn(x_t, t, cond)`.
    cond: conditioning passed to model_fn.
    prediction: 'eps', 'x0' or 'v'.
    clip_x0, dynamic_percentile: `diffusion.threshold_x0` of x0_hat (None: off); eps_hat is
      then recomputed from it, so the pair stays consistent with
      x_t = sqrt(ab) x0 + sqrt(1 - ab) eps.
  """

  schedule: Any
  model_fn: ModelFn
  cond: Array | None = None
  prediction: str = "eps"
  clip_x0: float | None = None
  dynamic_percentile: float | None = None

  @property
  def thresholds(self) -> bool:
    return self.clip_x0 is not None or self.dynamic_percentile is not None

  def threshold(self, x0: Array) -> Array:
    return diffusion.threshold_x0(
      x0, clip_x0=self.clip_x0, dynamic_percentile=self.dynamic_percentile
    )

  def alpha_bar(self, t: Array) -> Array:
    """alpha_bar(t), 1 for t < 0 (`alpha_bar_or_one`)."""
    return alpha_bar_or_one(self.schedule, t)

  def __call__(self, x_t: Array, t: Array) -> tuple[Array, Array]:
    """(x0_hat, eps_hat), each [B, ...], at scalar or [B] t >= 0 (int or float)."""
    s = self.schedule
    tb = batch_t(t, x_t)
    to_x0_eps = diffusion.to_x0_eps if _is_int(tb) else continuous.to_x0_eps
    out = self.model_fn(x_t, tb, self.cond)
    x0, eps = to_x0_eps(s, x_t, tb, out, prediction=self.prediction)
    if not self.thresholds:
      return x0, eps
    x0 = self.threshold(x0)
    if _is_int(tb):
      return x0, diffusion.eps_from_x0(s, x_t, tb, x0)
    ab = continuous.alpha_bar_at(s, tb).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return x0, (x_t.astype(jnp.float32) - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)


def make_denoiser(
  schedule,
  model_fn: ModelFn,
  *,
  space: str = "ve",
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> SigmaDenoiser | VPDenoiser:
  """The denoiser a sampler of `space` takes ('ve': `SigmaDenoiser`, 'vp': `VPDenoiser`).

  Args:
    schedule: the `Schedule` (or, for 've', a `processes.Process`).
    model_fn: `model_fn(x_t, t, cond)`, already guided / halved (`guided`, `eps_half`).
    space: 've' (sigma grids) or 'vp' (timestep grids).
    cond, prediction, clip_x0, dynamic_percentile: see `VPDenoiser`.
  """
  if space not in SPACES:
    raise ValueError(f"unknown space {space!r}; choose one of {SPACES}")
  kw = dict(
    cond=cond, prediction=prediction, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile
  )
  if space == "vp":
    return VPDenoiser(schedule, model_fn, **kw)
  return SigmaDenoiser(continuous.make_denoiser(schedule, model_fn, **kw), schedule)


def compose(*wrappers: Callable[[ModelFn], ModelFn] | None) -> Callable[[ModelFn], ModelFn]:
  """`chain(model_fn) = w_n(... w_1(model_fn))` for the wrappers given (None: skipped)."""

  def chain(model_fn: ModelFn) -> ModelFn:
    for wrap in wrappers:
      if wrap is not None:
        model_fn = wrap(model_fn)
    return model_fn

  return chain


def eps_half(model_fn: ModelFn) -> ModelFn:
  """The first C output channels of a learned-variance model (eps / x0 / v, not the variance)."""

  def eps_fn(x, t, cond):
    out = model_fn(x, t, cond)
    return out[..., : x.shape[-1]]

  return eps_fn


def guidance_scale_fn(
  scale: float, *, interval: tuple[float, float] | None = None, schedule: str = "constant"
) -> Callable | None:
  """The per-level guidance scale of an interval or a schedule (None: a constant scale).

  Raises:
    ValueError: both an interval and a non-constant schedule.
  """
  if interval is None and schedule == "constant":
    return None
  if interval is not None and schedule != "constant":
    raise ValueError(
      f"use a guidance_interval {interval} or a guidance_schedule {schedule!r}, not both"
    )
  if interval is not None:
    return guidance_schedules.interval_scale(scale, *interval)
  return guidance_schedules.schedule_scale(scale, schedule)


def guided(
  model_fn: ModelFn,
  schedule,
  *,
  scale: float,
  null_cond: int,
  rescale: float = 0.0,
  learn_sigma: bool = False,
  scale_fn: Callable | None = None,
) -> ModelFn:
  """Classifier-free guidance of a class-conditional `model_fn` (unchanged at scale 1).

  `scale_fn` (`guidance_scale_fn`) makes the scale depend on the noise level.
  """
  if scale_fn is not None:
    return guidance_schedules.scheduled_cfg_model_fn(
      model_fn,
      schedule,
      scale_fn=scale_fn,
      null_cond=null_cond,
      guidance_rescale=rescale,
      learn_sigma=learn_sigma,
    )
  if scale == 1.0:
    return model_fn
  return cfg_model_fn(
    model_fn,
    guidance_scale=scale,
    null_cond=null_cond,
    guidance_rescale=rescale,
    learn_sigma=learn_sigma,
  )
