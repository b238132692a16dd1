"""Runs on an imported model: `config.pretrained` (jdiff/configs/pretrained.py).

`attach(setup)` replaces the config's U-Net and schedule by the imported ones: the
architecture, the schedule (from scheduler_config.json or ADM's flags), the
parameterisation (`diffusion.prediction`, `diffusion.variance`, `model.learn_sigma`) and
whether the model is class-conditional come from the weights' own configuration and
are written into the run's copy of the config (logged); `model.dtype`, `conv_impl` and
`remat` stay the config's. With `pretrained.scheduler_sampling` the publisher's x0
clipping / thresholding replace `sample.clip_x0` / `dynamic_threshold`, and where the
publisher names a sampler (ADM's `timestep_respacing`) it replaces `sample.sampler`,
`num_steps`, `eta` and `spacing`; every replacement and approximation is logged. The
weights are restored straight onto the run's replicated sharding, one array at a time.

Sampling and evaluation then use the imported weights when the workdir has no
checkpoint; training starts from them (params and EMA) and resumes from the workdir as
usual once it has saved one.
"""

from __future__ import annotations

from absl import logging

from jdiff.models.layers import DTYPES
from jdiff.runs.sample_options import validate_sample_config


def enabled(config) -> bool:
  """Whether `config` imports a pretrained model (`config.pretrained.path` set)."""
  return "pretrained" in config and bool(config.pretrained.path)


def apply_settings(c, s, *, scheduler_sampling: bool) -> list[str]:
  """Writes `Settings` `s` into the unlocked config `c`; returns what to log.

  The parameterisation always; with `scheduler_sampling` also the publisher's clipping /
  thresholding and, where it names one (ADM's `timestep_respacing`), its sampler, step
  count, eta and spacing in place of config.sample's, each change logged.
  """
  c.diffusion.prediction, c.diffusion.variance = s.prediction, s.variance
  c.diffusion.num_steps = s.schedule.num_steps
  notes = []
  if scheduler_sampling:
    c.sample.clip_x0, c.sample.dynamic_threshold = s.clip_x0, s.dynamic_threshold
    if s.sampler is not None:
      new = dict(sampler=s.sampler, num_steps=s.num_steps, eta=s.eta, spacing=s.spacing or "auto")
      if s.sampler == "ddpm":
        new["num_steps"] = c.sample.num_steps  # ddpm takes every timestep
      old = {k: c.sample[k] for k in new}
      if old != new:
        c.sample.update(new)
        notes.append(
          f"config.sample {old} replaced by the publisher's {new} "
          "(config.pretrained.scheduler_sampling=False keeps config.sample's)"
        )
    elif s.spacing and c.sample.spacing == "auto" and c.sample.sampler in ("ddim", "pc"):
      c.sample.spacing = s.spacing
  if s.variance == "learned_range" and c.sample.sampler != "ddpm":
    notes.append(
      f"sampler {c.sample.sampler!r} uses the model's prediction only: its learned variance "
      "is used by 'ddpm' (all T steps; jdiff.pretrained.respace.adm_sample on a respaced grid)"
    )
  return notes


def attach(setup) -> None:
  """Loads `config.pretrained` into `setup` (module, schedule, params, config copy)."""
  from jdiff.pretrained import PretrainedError, load_pretrained  # pylint: disable=g-import-not-at-top

  c = setup.config
  p = c.pretrained
  if setup.reads_data:  # the data must fit the imported model
    setup.pixel_shape = setup.image_shape = tuple(setup.meta.image_shape)
  if c.latent.autoencoder_workdir:
    raise PretrainedError("config.pretrained imports pixel-space U-Nets: unset config.latent")
  model = load_pretrained(
    p.path,
    format=p.format,
    flags=p.flags or None,
    variant=p.adm_variant,
    shardings=setup.repl,
    dtype=DTYPES[c.model.dtype],
    conv_impl=c.model.conv_impl,
    remat=c.model.remat,
  )
  if model.module.context_dim is not None:
    raise PretrainedError(
      f"{model.source} is a text-conditioned UNet2DConditionModel: sample it with "
      "jdiff/configs/text2image.py (config.sample.prompts), a Stable Diffusion pipeline"
    )
  # A mode that reads no data (sample, edit, fid on stored statistics) takes the weights' shape.
  if setup.reads_data and tuple(model.image_shape) != tuple(setup.image_shape):
    raise PretrainedError(
      f"the imported model takes images {model.image_shape} but config.data gives "
      f"{setup.image_shape}: set config.data.name / image_size to match"
    )
  if (
    model.num_classes is not None
    and setup.reads_data
    and setup.meta.num_classes not in (None, model.num_classes)
  ):
    raise PretrainedError(
      f"the imported model has {model.num_classes} classes, dataset {c.data.name!r} has "
      f"{setup.meta.num_classes}"
    )
  c = c.copy_and_resolve_references()
  s = model.settings
  with c.unlocked():
    c.conditional = model.num_classes is not None
    c.model.learn_sigma = bool(model.module.learn_sigma)
    if s is not None:
      notes = apply_settings(c, s, scheduler_sampling=p.scheduler_sampling)
      for note in (*s.notes, *notes):
        logging.warning("pretrained %s: %s", model.source, note)
  c.lock()
  validate_sample_config(c.sample, latent=False)
  setup.config = c
  setup.pretrained = model
  setup.module = model.module
  if s is not None:
    setup.schedule = s.schedule
  setup.num_classes = model.num_classes
  setup.pixel_shape = setup.image_shape = tuple(model.image_shape)
  setup.null_label = model.num_classes
  logging.info(
    "imported %s U-Net from %s: %s; prediction %s, variance %s, T = %d, clip_x0 %s",
    model.format,
    model.source,
    {k: getattr(model.module, k) for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")},
    c.diffusion.prediction,
    c.diffusion.variance,
    setup.schedule.num_steps,
    c.sample.clip_x0,
  )
