"""The sections of the one validator (`jdiff.runs.validate`) that belong to a single mode:
`--mode=distill` and prompt -> image sampling."""

from __future__ import annotations

import json
import math
import os

from jdiff.models.layers import DTYPES
from jdiff.runs import distilled, stored_config
from jdiff.samplers.registry import FLOW_SAMPLERS, resolve_options

# ----------------------------------------------------------------------------- text to image


def check_text2image(config) -> None:
  """The keys of a prompt -> image config (jdiff/configs/text2image.py)."""
  s = config.sample
  if not config.pretrained.path:
    raise ValueError("config.pretrained.path must name a Stable Diffusion pipeline (dir or hub)")
  if s.prompts_file and not os.path.isfile(s.prompts_file):
    raise ValueError(f"config.sample.prompts_file: no file {s.prompts_file!r}")
  prompts = s.prompts
  if not s.prompts_file and (
    isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts)
  ):
    raise ValueError(f"config.sample.prompts must be a non-empty tuple of strings, got {prompts!r}")
  if not isinstance(s.negative_prompt, str):
    raise ValueError(f"config.sample.negative_prompt must be a string, got {s.negative_prompt!r}")
  if s.seeds is not None:
    n = None if s.prompts_file else len(prompts)
    if not all(isinstance(x, int) and 0 <= x < 2**32 for x in s.seeds) or n not in (
      None,
      len(s.seeds),
    ):
      raise ValueError(
        f"config.sample.seeds must be one int in [0, 2**32) per prompt ({n}), got {s.seeds!r}"
      )
  if not isinstance(s.guidance_scale, (int, float)) or not math.isfinite(s.guidance_scale):
    raise ValueError(
      f"config.sample.guidance_scale must be a finite number, got {s.guidance_scale!r}"
    )
  if not isinstance(s.num_steps, int) or s.num_steps < 1:
    raise ValueError(f"config.sample.num_steps must be an integer >= 1, got {s.num_steps!r}")
  if s.sampler in FLOW_SAMPLERS:
    raise ValueError(f"config.sample.sampler={s.sampler!r} is for flow models; SD is not one")
  try:
    resolve_options(s.sampler, spacing=s.spacing, eta=s.eta)
  except ValueError as e:
    raise ValueError(f"config.sample: {e}") from None
  if config.model.dtype not in DTYPES:
    raise ValueError(
      f"config.model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}"
    )


# ----------------------------------------------------------------------------- distill


def check_teacher(c) -> None:
  """`--mode=distill`'s teacher: a DDPM training workdir with a checkpoint (the other modes
  of a distilled workdir sample the student alone and do not read it)."""
  d = c.distill
  path = os.path.join(d.teacher_workdir, "config.json")
  if not d.teacher_workdir or not os.path.isfile(path):
    raise ValueError(
      f"config.distill.teacher_workdir={d.teacher_workdir!r} is not a training workdir (no "
      "config.json): give the teacher's workdir"
    )
  if not stored_config.has_checkpoints(d.teacher_workdir):
    raise ValueError(
      f"config.distill.teacher_workdir={d.teacher_workdir!r} has no checkpoint: train it first"
    )
  with open(path) as f:
    objective = json.load(f).get("objective", "ddpm")
  if objective != "ddpm":
    raise ValueError(
      f"config.distill.teacher_workdir={d.teacher_workdir!r} holds a teacher of objective "
      f"{objective!r}; distill.method={d.method!r} distils a DDPM teacher"
    )


def check_distill(c) -> None:
  """The distill section: the method and what it needs (the teacher: `check_teacher`)."""
  d, pow2 = c.distill, lambda n: isinstance(n, int) and n >= 1 and not n & (n - 1)
  if d.method not in distilled.METHODS:
    raise ValueError(f"config.distill.method must be one of {distilled.METHODS}, got {d.method!r}")
  if c.objective != "ddpm":
    raise ValueError(
      f"config.objective={c.objective!r}: distill.method={d.method!r} distils a DDPM teacher "
      "into a student of the same objective 'ddpm'"
    )
  for key in ("steps", "final_steps", "round_steps"):
    if not (pow2(d[key]) or (key == "round_steps" and d[key] == 0)):
      raise ValueError(
        f"config.distill.{key} must be a power of two (progressive distillation halves the "
        f"step count every round), got {d[key]!r}"
      )
  rounds = distilled.pd_rounds(d)
  if d.method == "progressive" and d.steps > d.final_steps and c.train.num_steps < rounds:
    raise ValueError(
      f"config.train.num_steps={c.train.num_steps}: progressive distillation from "
      f"{d.steps} to {d.final_steps} steps shares them among {rounds} rounds; need >= {rounds}"
    )
  if d.method == "progressive" and not d.final_steps < d.steps <= c.diffusion.num_steps // 2:
    raise ValueError(
      f"config.distill: need final_steps < steps <= diffusion.num_steps / 2, got final_steps="
      f"{d.final_steps}, steps={d.steps}, diffusion.num_steps={c.diffusion.num_steps}"
    )
  for key, allowed in distilled.CHOICES.items():
    if d[key] not in allowed:
      raise ValueError(f"config.distill.{key} must be one of {allowed}, got {d[key]!r}")
  if d.num_levels < 2 or not 1 <= d.s0 <= d.s1 or not d.sigma_max > 0 or not d.sigma_data > 0:
    raise ValueError(
      "config.distill: need num_levels >= 2, 1 <= s0 <= s1, sigma_max > 0 and sigma_data > 0; "
      f"got num_levels={d.num_levels}, s0={d.s0}, s1={d.s1}, sigma_max={d.sigma_max}, "
      f"sigma_data={d.sigma_data}"
    )
