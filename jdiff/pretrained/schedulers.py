"""diffusers' `scheduler_config.json` and ADM's diffusion flags -> a `Schedule` plus settings.

The schedule and the model's parameterisation (prediction, variance) define the trained
model; the sampler settings (clipping, thresholding, step count and spacing) are the
publisher's defaults, which a run may override.

References:
  diffusers `DDPMScheduler` / `DDIMScheduler` (`betas_for_alpha_bar`, `rescale_zero_terminal_snr`).
  [IDDPM] Nichol, Dhariwal 2021 (`gaussian_diffusion.get_named_beta_schedule`, `space_timesteps`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from jdiff import schedules
from jdiff.pretrained import respace
from jdiff.pretrained.mapping import PretrainedError
from jdiff.samplers import grids
from jdiff.schedules import Schedule

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {
  "fixed_small": "fixed_small",
  "fixed_small_log": "fixed_small",
  "fixed_large": "fixed_large",
  "fixed_large_log": "fixed_large",
  "learned_range": "learned_range",
  # DPM-Solver's variance_type None: the model outputs no variance (C channels).
  None: "fixed_small",
}
# What a scheduler class without the option does: no clipping, no thresholding, no
# variance output, timesteps ending at the clean data, a linspace grid.
_WITHOUT = {
  "variance_type": None,
  "clip_sample": False,
  "clip_sample_range": 1.0,
  "thresholding": False,
  "dynamic_thresholding_ratio": 0.995,
  "sample_max_value": 1.0,
  "rescale_betas_zero_snr": False,
  "set_alpha_to_one": True,
  # DPMSolverSinglestep's own grid is linspace-like (the default of the newer classes).
  "timestep_spacing": "linspace",
  "steps_offset": 0,
}
_SCHEDULE = {
  "num_train_timesteps": 1000,
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "trained_betas": None,
  "prediction_type": "epsilon",
}
_CLIPPING = {"clip_sample": True, "clip_sample_range": 1.0}
_THRESHOLDING = {
  "thresholding": False,
  "dynamic_thresholding_ratio": 0.995,
  "sample_max_value": 1.0,
}
# Each diffusers scheduler class's constructor defaults (diffusers 0.2x-0.4x) for the keys
# above, over `_WITHOUT` for the options the class does not have (PNDM, Euler, UniPC, ...
# have no clip_sample: they never clip). A config saved by `save_config` names its class
# in `_class_name`; one without it is read as DDPMScheduler's.
CLASS_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
  "DDPMScheduler": {
    **_SCHEDULE,
    **_CLIPPING,
    **_THRESHOLDING,
    "variance_type": "fixed_small",
    "timestep_spacing": "leading",
  },
  "DDIMScheduler": {**_SCHEDULE, **_CLIPPING, **_THRESHOLDING, "timestep_spacing": "leading"},
  "PNDMScheduler": {**_SCHEDULE, "timestep_spacing": "leading", "set_alpha_to_one": False},
  "EulerDiscreteScheduler": _SCHEDULE,
  "EulerAncestralDiscreteScheduler": _SCHEDULE,
  "LMSDiscreteScheduler": _SCHEDULE,
  "UniPCMultistepScheduler": {**_SCHEDULE, **_THRESHOLDING},
  "DEISMultistepScheduler": {**_SCHEDULE, **_THRESHOLDING},
  "DPMSolverMultistepScheduler": {**_SCHEDULE, **_THRESHOLDING},
  "DPMSolverSinglestepScheduler": {**_SCHEDULE, **_THRESHOLDING},
  "HeunDiscreteScheduler": {**_SCHEDULE, "beta_start": 0.00085, "beta_end": 0.012},
  "KDPM2DiscreteScheduler": {**_SCHEDULE, "beta_start": 0.00085, "beta_end": 0.012},
}
CLASS_DEFAULTS = {k: {**_WITHOUT, **v} for k, v in CLASS_DEFAULTS.items()}
DEFAULTS = CLASS_DEFAULTS["DDPMScheduler"]
# Keys of other schedulers' sampling loops (or of old diffusers), which do not change the
# schedule or the parameterisation; others unknown are listed in `Settings.notes`.
_IGNORED = {"skip_prk_steps", "tensor_format"}


class Settings(NamedTuple):
  """A pretrained model's diffusion and the publisher's sampler defaults.

  Attributes:
    schedule: the training `Schedule` (T = num_train_timesteps).
    prediction: 'eps', 'x0' or 'v' (config.diffusion.prediction).
    variance: 'fixed_small', 'fixed_large' or 'learned_range' (config.diffusion.variance).
    clip_x0: clip x0_hat to [-c, c], or 0 for none (config.sample.clip_x0).
    dynamic_threshold: Imagen's percentile, or 0 (config.sample.dynamic_threshold).
    spacing: 'trailing' / 'linspace' for the timestep samplers, or None (jdiff's default).
    sampler: a jdiff sampler name the publisher's setting corresponds to, or None.
    num_steps: its step count, or None.
    eta: its eta, or None.
    timesteps: the publisher's kept timesteps, increasing int64 [N] (ADM's
      `timestep_respacing`), or None.
    notes: what was approximated or left out, one sentence each.
  """

  schedule: Schedule
  prediction: str
  variance: str
  clip_x0: float
  dynamic_threshold: float
  spacing: str | None = None
  sampler: str | None = None
  num_steps: int | None = None
  eta: float | None = None
  timesteps: np.ndarray | None = None
  notes: tuple[str, ...] = ()


def betas_from_diffusers(config: Mapping[str, Any]) -> np.ndarray:
  """diffusers' betas [T] (float32 values, as its torch code computes them), as float64."""
  c = {**class_defaults(config)[0], **config}
  n = int(c["num_train_timesteps"])
  name = c["beta_schedule"]
  if c["trained_betas"] is not None:
    betas = np.asarray(c["trained_betas"], np.float32)
  elif name == "linear":
    betas = np.linspace(c["beta_start"], c["beta_end"], n, dtype=np.float32)
  elif name == "scaled_linear":
    betas = np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=np.float32) ** 2
  elif name == "squaredcos_cap_v2":
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], np.float32)
  elif name == "sigmoid":
    x = np.linspace(-6, 6, n, dtype=np.float32)
    betas = (1 / (1 + np.exp(-x))) * (c["beta_end"] - c["beta_start"]) + c["beta_start"]
  else:
    raise PretrainedError(
      f"scheduler_config.json: beta_schedule={name!r} is not supported "
      "(linear, scaled_linear, squaredcos_cap_v2, sigmoid, or trained_betas)"
    )
  return betas.astype(np.float32).astype(np.float64)


def class_defaults(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], list[str]]:
  """The defaults of the config's `_class_name` (DDPMScheduler's if absent), and notes."""
  name = config.get("_class_name", "DDPMScheduler")
  if name in CLASS_DEFAULTS:
    return CLASS_DEFAULTS[name], []
  return DEFAULTS, [f"_class_name={name!r} is not known here: DDPMScheduler's defaults are used"]


def from_diffusers(config: Mapping[str, Any]) -> Settings:
  """`Settings` from a diffusers `scheduler_config.json` dict (DDPM / DDIM / PNDM / ...).

  Omitted keys take the defaults of the config's `_class_name` (`CLASS_DEFAULTS`): x0
  clipping and thresholding only where that scheduler has them.

  Raises:
    PretrainedError: an unsupported value (beta_schedule, prediction_type, variance_type),
      naming it.
  """
  defaults, notes = class_defaults(config)
  unknown = sorted(
    k for k in config if not k.startswith("_") and k not in defaults and k not in _IGNORED
  )
  c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
  schedule = schedules.from_betas(betas_from_diffusers(c))
  if c["rescale_betas_zero_snr"]:
    schedule = schedules.rescale_zero_terminal_snr(schedule)
  if c["prediction_type"] not in PREDICTIONS:
    raise PretrainedError(
      f"scheduler_config.json: prediction_type={c['prediction_type']!r}; "
      f"choose from {sorted(PREDICTIONS)}"
    )
  if c["variance_type"] not in VARIANCES:
    raise PretrainedError(
      f"scheduler_config.json: variance_type={c['variance_type']!r} is not supported "
      f"({sorted(VARIANCES, key=str)})"
    )
  if unknown:
    notes.append(f"sampler options {unknown} have no jdiff counterpart and are not used")
  spacing = {"trailing": "trailing", "linspace": "linspace"}.get(c["timestep_spacing"])
  if spacing is None:
    notes.append(
      f"timestep_spacing={c['timestep_spacing']!r} (steps_offset={c['steps_offset']}) has "
      "no jdiff grid (it does not start at the last timestep): jdiff's default grid is used"
    )
  if not c["set_alpha_to_one"]:
    notes.append(
      "set_alpha_to_one=False: diffusers' last step ends at alpha_bar(t=0); jdiff's timestep "
      "samplers end at the clean data (alpha_bar = 1)"
    )
  if c["thresholding"]:
    notes.append(
      f"thresholding: percentile {c['dynamic_thresholding_ratio']} maps to "
      f"dynamic_threshold; sample_max_value={c['sample_max_value']} is not used (jdiff floors "
      "the threshold at clip_x0 or 1)"
    )
  return Settings(
    schedule=schedule,
    prediction=PREDICTIONS[c["prediction_type"]],
    variance=VARIANCES[c["variance_type"]],
    clip_x0=float(c["clip_sample_range"]) if c["clip_sample"] else 0.0,
    dynamic_threshold=float(c["dynamic_thresholding_ratio"]) if c["thresholding"] else 0.0,
    spacing=spacing,
    notes=tuple(notes),
  )


def from_adm(flags: Mapping[str, Any], *, variant: str = "guided") -> Settings:
  """`Settings` from ADM's diffusion flags (`noise_schedule`, `diffusion_steps`,
  `learn_sigma`, `sigma_small`, `predict_xstart`, `timestep_respacing`, ...).

  ADM always clips x0_hat to [-1, 1] when sampling (`clip_denoised=True`). Its
  `timestep_respacing` gives `Settings.timesteps` (`respace.space_timesteps`; ADM's own
  sampler on them is `respace.adm_sample`) and the closest registered jdiff sampler:
  'ddimN' becomes DDIM with N steps and eta 0 on jdiff's trailing grid; 'N' (or per-section
  counts) becomes DDIM with eta 1 on the linspace grid, which is ADM's ancestral chain on
  that grid with the posterior variance of the respaced chain: ADM's learned (or fixed
  large) variance there is replaced, and a note says so, as it does where the grids differ.
  'T' (every timestep) becomes 'ddpm'. Without respacing ADM samples all T steps too, but
  no sampler is set then (config.sample applies).
  """
  from jdiff.pretrained import adm  # pylint: disable=g-import-not-at-top

  f = adm.complete_flags(flags, variant=variant)
  steps = int(f["diffusion_steps"])
  if f["noise_schedule"] == "linear":
    schedule = schedules.linear(steps)
  elif f["noise_schedule"] == "cosine":
    schedule = schedules.cosine(steps)
  else:
    raise PretrainedError(
      f"ADM noise_schedule={f['noise_schedule']!r}: only linear and cosine exist"
    )
  if f["learn_sigma"]:
    variance = "learned_range"
  else:
    variance = "fixed_small" if f["sigma_small"] else "fixed_large"
  notes = []
  if f["use_kl"] or f["rescale_learned_sigmas"]:
    notes.append(
      "use_kl / rescale_learned_sigmas set ADM's training loss weights; a fine-tuning run uses "
      "config.diffusion.weighting and vlb_weight instead"
    )
  sampler = num_steps = eta = spacing = timesteps = None
  resp = str(f["timestep_respacing"] or "")
  if resp:
    timesteps = respace.space_timesteps(steps, resp)
    num_steps = len(timesteps)
    if num_steps == steps and not resp.startswith("ddim"):
      sampler = "ddpm"  # every timestep: jdiff's ancestral sampler, variance included
    elif resp.startswith("ddim"):
      sampler, eta, spacing = "ddim", 0.0, "trailing"
      notes.append(
        f"timestep_respacing={resp!r}: ADM's DDIM grid {timesteps[:3].tolist()}... starts at "
        f"0 (leading); jdiff's trailing grid of {num_steps} steps is used"
      )
    else:
      sampler, eta, spacing = "ddim", 1.0, "linspace"
      ours = grids.timesteps(steps, num_steps, spacing="linspace")
      if not np.array_equal(ours, timesteps):
        notes.append(
          f"timestep_respacing={resp!r}: ADM's grid differs from jdiff's linspace grid of "
          f"{num_steps} steps at {int(np.sum(ours != timesteps))} timesteps; the linspace grid "
          "is used"
        )
      if variance != "fixed_small":
        notes.append(
          f"timestep_respacing={resp!r}: ADM samples ancestrally with the {variance} variance "
          "of the respaced chain; DDIM with eta 1 takes that chain's posterior variance "
          "instead (jdiff's 'ddpm' uses a learned variance over all T steps only; "
          "jdiff.pretrained.respace.adm_sample with Settings.timesteps is ADM's sampler)"
        )
  return Settings(
    schedule=schedule,
    prediction="x0" if f["predict_xstart"] else "eps",
    variance=variance,
    clip_x0=1.0,
    dynamic_threshold=0.0,
    spacing=spacing,
    sampler=sampler,
    num_steps=num_steps,
    eta=eta,
    timesteps=timesteps,
    notes=tuple(notes),
  )
