"""The `config.sample` section as keyword arguments of `training.sampling.make_sample_fn`."""

from __future__ import annotations

from jdiff.models.guidance_schedules import SCALE_SCHEDULES
from jdiff.samplers.registry import resolve_options


def validate_sample_config(sample_cfg, *, latent: bool) -> None:
  """Raises ValueError naming the bad `config.sample` key/value.

  Checks the sampler / spacing / eta combination (`sampling.resolve_options`), the
  thresholding keys, and that latent diffusion thresholds nothing: scaled latents have unit
  std, not a [-1, 1] range.
  """
  s = sample_cfg
  try:
    resolve_options(s.sampler, spacing=s.spacing, eta=s.eta)
  except ValueError as e:
    raise ValueError(f"config.sample: {e}") from None
  if not isinstance(s.num_steps, int) or s.num_steps < 1:
    raise ValueError(f"config.sample.num_steps must be an integer >= 1, got {s.num_steps!r}")
  if not 0.0 <= s.dynamic_threshold <= 1.0:
    raise ValueError(
      "config.sample.dynamic_threshold must be a percentile in (0, 1] or 0 "
      f"(off); got {s.dynamic_threshold}"
    )
  schedule = s.get("guidance_schedule", "constant")
  if schedule not in SCALE_SCHEDULES:
    raise ValueError(
      f"config.sample.guidance_schedule must be one of {SCALE_SCHEDULES}, got {schedule!r}"
    )
  lo, hi = s.get("guidance_sigma_lo", 0.0), s.get("guidance_sigma_hi", 0.0)
  if hi > 0 and not 0 <= lo <= hi:
    raise ValueError(
      f"config.sample.guidance_sigma_lo / _hi must satisfy 0 <= lo <= hi, got ({lo}, {hi})"
    )
  if hi > 0 and schedule != "constant":
    raise ValueError("config.sample: use guidance_sigma_hi > 0 or guidance_schedule, not both")
  if latent and s.clip_x0 > 0:
    raise ValueError(
      "config.sample.clip_x0 must be 0 for latent diffusion (scaled latents have "
      f"unit std, not a [-1, 1] range); got {s.clip_x0}"
    )
  if latent and s.dynamic_threshold > 0:
    raise ValueError(
      "config.sample.dynamic_threshold must be 0 for latent diffusion (scaled "
      f"latents have no fixed range); got {s.dynamic_threshold}"
    )


def sample_options(sample_cfg) -> dict:
  """`make_sample_fn` keyword arguments from `config.sample`."""
  s = sample_cfg
  return dict(
    sampler=s.sampler,
    num_steps=s.num_steps,
    eta=s.eta,
    spacing=s.spacing,
    clip_x0=s.clip_x0 if s.clip_x0 > 0 else None,
    dynamic_threshold=s.dynamic_threshold if s.dynamic_threshold > 0 else None,
    guidance_scale=s.guidance_scale,
    guidance_rescale=s.guidance_rescale,
    grid_file=s.grid_file,
    guidance_interval=(
      (s.guidance_sigma_lo, s.guidance_sigma_hi) if s.get("guidance_sigma_hi", 0.0) > 0 else None
    ),
    guidance_schedule=s.get("guidance_schedule", "constant"),
  )
