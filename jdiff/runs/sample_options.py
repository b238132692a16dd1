"""The `config.sample` section as keyword arguments of `samplers.registry.make_sample_fn`."""

from __future__ import annotations

from jdiff.runs.validate import check_sample as validate_sample_config  # noqa: F401 (its home)


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
