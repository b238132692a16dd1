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
from jdiff.schedules import Schedule

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {
  "fixed_small": "fixed_small",
  "fixed_small_log": "fixed_small",
  "fixed_large": "fixed_large",
  "fixed_large_log": "fixed_large",
  "learned_range": "learned_range",
}
# diffusers DDPMScheduler / DDIMScheduler constructor defaults, for omitted keys.
DEFAULTS: Mapping[str, Any] = {
  "num_train_timesteps": 1000,
  "beta_start": 0.0001,
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "trained_betas": None,
  "variance_type": "fixed_small",
  "clip_sample": True,
  "clip_sample_range": 1.0,
  "prediction_type": "epsilon",
  "thresholding": False,
  "dynamic_thresholding_ratio": 0.995,
  "sample_max_value": 1.0,
  "timestep_spacing": "leading",
  "steps_offset": 0,
  "rescale_betas_zero_snr": False,
}
# Keys of other schedulers' sampling loops (or of old diffusers), which do not change the
# schedule or the parameterisation; others unknown are listed in `Settings.notes`.
_IGNORED = {"set_alpha_to_one", "skip_prk_steps", "tensor_format"}


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
  notes: tuple[str, ...] = ()


def betas_from_diffusers(config: Mapping[str, Any]) -> np.ndarray:
  """diffusers' betas [T] (float32 values, as its torch code computes them), as float64."""
  c = {**DEFAULTS, **config}
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
    raise ValueError(
      f"scheduler_config.json: beta_schedule={name!r} is not supported "
      "(linear, scaled_linear, squaredcos_cap_v2, sigmoid, or trained_betas)"
    )
  return betas.astype(np.float32).astype(np.float64)


def from_diffusers(config: Mapping[str, Any]) -> Settings:
  """`Settings` from a diffusers `scheduler_config.json` dict (DDPM / DDIM / PNDM / ...).

  Raises:
    ValueError: an unsupported value (beta_schedule, prediction_type, variance_type),
      naming it.
  """
  unknown = sorted(
    k for k in config if not k.startswith("_") and k not in DEFAULTS and k not in _IGNORED
  )
  c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
  schedule = schedules.from_betas(betas_from_diffusers(c))
  if c["rescale_betas_zero_snr"]:
    schedule = schedules.rescale_zero_terminal_snr(schedule)
  if c["prediction_type"] not in PREDICTIONS:
    raise ValueError(
      f"scheduler_config.json: prediction_type={c['prediction_type']!r}; "
      f"choose from {sorted(PREDICTIONS)}"
    )
  if c["variance_type"] not in VARIANCES:
    raise ValueError(
      f"scheduler_config.json: variance_type={c['variance_type']!r} is not supported "
      f"({sorted(VARIANCES)})"
    )
  notes = []
  if unknown:
    notes.append(f"sampler options {unknown} have no jdiff counterpart and are not used")
  spacing = {"trailing": "trailing", "linspace": "linspace"}.get(c["timestep_spacing"])
  if spacing is None:
    notes.append(
      f"timestep_spacing={c['timestep_spacing']!r} (steps_offset={c['steps_offset']}) has "
      "no jdiff grid (it does not start at the last timestep): jdiff's default grid is used"
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
  `timestep_respacing` 'ddimN' becomes DDIM with N steps (eta 0), 'N' becomes N
  ancestral steps (DDIM with eta 1 on a linspace grid, which takes the posterior
  variance of the respaced chain).
  """
  from jdiff.pretrained import adm  # pylint: disable=g-import-not-at-top

  f = adm.complete_flags(flags, variant=variant)
  steps = int(f["diffusion_steps"])
  if f["noise_schedule"] == "linear":
    schedule = schedules.linear(steps)
  elif f["noise_schedule"] == "cosine":
    schedule = schedules.cosine(steps)
  else:
    raise ValueError(f"ADM noise_schedule={f['noise_schedule']!r}: only linear and cosine exist")
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
  sampler = num_steps = eta = spacing = None
  resp = str(f["timestep_respacing"] or "")
  if resp.startswith("ddim"):
    sampler, num_steps, eta, spacing = "ddim", int(resp[4:]), 0.0, "trailing"
    notes.append("ADM's ddimN grid starts at 0 (leading); jdiff's trailing grid is used")
  elif resp:
    counts = [int(s) for s in resp.split(",")]
    sampler, num_steps, eta, spacing = "ddim", sum(counts), 1.0, "linspace"
    if len(counts) > 1:
      notes.append(f"timestep_respacing={resp!r}: per-section counts become one linspace grid")
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
    notes=tuple(notes),
  )
