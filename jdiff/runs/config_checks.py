"""Range checks of every numeric key of the configs (before anything is built or compiled).

`check_ranges(config)` covers the int and float keys of jdiff/configs/default.py and
of the stage-1 configs (ae_digits.py) that `jdiff.runs.setup.validate_config` does not check
itself, each against the range its consumer accepts; a value outside it is a ValueError
naming `config.<key>` and the value. A section or key that a config does not have is
skipped. Cross-key rules: the U-Net's group norm needs `model.num_groups` to divide every
level's width, and classifier-free guidance (`sample.guidance_scale != 1`) needs a
conditional model.
"""

from __future__ import annotations

import math

# (key, kind, low, high, low inclusive, high inclusive, allow None); kind 'int' or 'float'.
_RANGES = (
  ("data.image_size", "int", 0, None, True, None, False),
  ("model.ch", "int", 1, None, True, None, False),
  ("model.num_res_blocks", "int", 1, None, True, None, False),
  ("model.num_heads", "int", 1, None, True, None, False),
  ("model.head_channels", "int", 1, None, True, None, True),
  ("model.dropout", "float", 0.0, 1.0, True, False, False),
  ("model.num_groups", "int", 1, None, True, None, False),
  ("diffusion.num_steps", "int", 1, None, True, None, False),
  ("diffusion.min_snr_gamma", "float", 0.0, None, False, None, False),
  ("diffusion.vlb_weight", "float", 0.0, None, True, None, False),
  ("optim.lr", "float", 0.0, None, False, None, False),
  ("optim.warmup_steps", "int", 0, None, True, None, False),
  ("optim.grad_clip", "float", 0.0, None, True, None, True),
  ("optim.b1", "float", 0.0, 1.0, True, False, False),
  ("optim.b2", "float", 0.0, 1.0, True, False, False),
  ("optim.eps", "float", 0.0, None, False, None, False),
  ("optim.weight_decay", "float", 0.0, None, True, None, False),
  ("train.log_every", "int", 1, None, True, None, False),
  ("train.ckpt_every", "int", 0, None, True, None, False),
  ("train.sample_every", "int", 0, None, True, None, False),
  ("sample.eta", "float", 0.0, None, True, None, True),
  ("sample.clip_x0", "float", None, None, None, None, False),
  ("sample.guidance_scale", "float", None, None, None, None, False),
  ("sample.guidance_rescale", "float", 0.0, 1.0, True, True, False),
  ("sample.num_samples", "int", 1, None, True, None, False),
  ("sample.grid_size", "int", 1, None, True, None, False),
  ("sample.batch_size", "int", 1, None, True, None, False),
  ("eval.bound_examples", "int", 0, None, True, None, False),
  ("eval.num_recon_images", "int", 0, None, True, None, False),
  ("latent.scale_factor", "float", 0.0, None, True, None, False),
  ("loss.kl_weight", "float", 0.0, None, True, None, False),
)


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _range_text(kind, low, high, low_inc, high_inc) -> str:
  noun = "an integer" if kind == "int" else "a finite number"
  if low is None and high is None:
    return noun
  if high is None:
    return f"{noun} {'>=' if low_inc else '>'} {low}"
  return f"{noun} in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"


def _in_range(value, kind, low, high, low_inc, high_inc) -> bool:
  if isinstance(value, bool):
    return False
  if kind == "int" and not isinstance(value, int):
    return False
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    return False
  if low is not None and (value < low or (value == low and not low_inc)):
    return False
  return high is None or value < high or (value == high and high_inc)


def check_ranges(config) -> None:
  """Raises ValueError naming the first numeric key outside its valid range (see module)."""
  for key, kind, low, high, low_inc, high_inc, allow_none in _RANGES:
    value = _get(config, key)
    if value is _MISSING or (value is None and allow_none):
      continue
    if not _in_range(value, kind, low, high, low_inc, high_inc):
      what = _range_text(kind, low, high, low_inc, high_inc)
      raise ValueError(
        f"config.{key} must be {what}{' or None' if allow_none else ''}, got {value!r}"
      )
  model = _get(config, "model")
  if model is not _MISSING:
    for m in model.ch_mult:
      if not isinstance(m, int) or m < 1 or (model.ch * m) % model.num_groups:
        raise ValueError(
          f"config.model.ch_mult={tuple(model.ch_mult)}: every entry must be a positive "
          f"integer with config.model.ch * entry divisible by config.model.num_groups="
          f"{model.num_groups} (group norm); got the entry {m!r}"
        )
  scale = _get(config, "sample.guidance_scale")
  if scale is not _MISSING and scale != 1.0 and not config.conditional:
    raise ValueError(
      f"config.sample.guidance_scale={scale} needs a conditional model (config.conditional="
      "True, trained with config.train.label_dropout > 0); an unconditional model has "
      "nothing to guide, so use 1.0"
    )
