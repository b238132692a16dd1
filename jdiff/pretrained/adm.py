"""openai improved-diffusion / guided-diffusion (ADM) `UNetModel` <-> `jdiff.models.UNet`.

The architecture comes from the flags the model was trained and released with (the
`MODEL_FLAGS` of the repositories' READMEs, i.e. `script_util.create_model`'s
arguments): `image_size`, `num_channels`, `num_res_blocks`, `channel_mult`,
`attention_resolutions`, `num_heads`, `num_head_channels`, `num_heads_upsample`,
`use_scale_shift_norm`, `resblock_updown`, `use_new_attention_order`, `learn_sigma`,
`class_cond`, `dropout`, and for the time input `rescale_timesteps` with
`diffusion_steps`. That covers the class-conditional ImageNet 64/128/256 and the
unconditional LSUN models of guided-diffusion, and improved-diffusion's models. The
512x512 model's `channel_mult` starts at 0.5, which `UNet` cannot express (its first
level always has `ch` channels): an error.

Key layout (n counts `input_blocks` from 1 in order, m counts `output_blocks`):

  input_blocks.0.0                       conv_in
  time_embed.{0,2}, label_emb            time_mlp_{0,1}, class_emb (+ a zero null row)
  input_blocks.n.0 / .1                  down_{i}_res_{j} / down_{i}_attn_{j}
  input_blocks.n.0(.op)                  down_{i}_downsample (ResBlock, or conv)
  middle_block.{0,1,2}                   mid_res_0, mid_attn, mid_res_1
  output_blocks.m.0 / .1                 up_{i}_res_{j} / up_{i}_attn_{j}
  output_blocks.m.{1|2}(.conv)           up_{i}_upsample (ResBlock, or conv)
  out.{0,2}                              norm_out, conv_out
  ResBlock in_layers.{0,2} emb_layers.1 out_layers.{0,3} skip_connection
                                         norm1 conv1 emb_proj norm2 conv2 skip
  AttentionBlock norm qkv proj_out       norm q|k|v proj_out (qkv split per head)

This module was written from guided-diffusion's `unet.py` / `script_util.py` module
structure (no package provides `UNetModel`); the tests rebuild the key names and shapes
from that structure independently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jdiff.pretrained import mapping
from jdiff.pretrained.mapping import PretrainedError, Rule, module_rules

# guided-diffusion's model_and_diffusion_defaults(); improved-diffusion differs in
# rescale_timesteps / rescale_learned_sigmas (True) and has no head-channel options.
GUIDED_DEFAULTS: Mapping[str, Any] = {
  "image_size": 64,
  "num_channels": 128,
  "num_res_blocks": 2,
  "num_heads": 4,
  "num_heads_upsample": -1,
  "num_head_channels": -1,
  "attention_resolutions": "16,8",
  "channel_mult": "",
  "dropout": 0.0,
  "class_cond": False,
  "use_checkpoint": False,
  "use_scale_shift_norm": True,
  "resblock_updown": False,
  "use_fp16": False,
  "use_new_attention_order": False,
  "learn_sigma": False,
  "diffusion_steps": 1000,
  "noise_schedule": "linear",
  "timestep_respacing": "",
  "use_kl": False,
  "predict_xstart": False,
  "rescale_timesteps": False,
  "rescale_learned_sigmas": False,
  "sigma_small": False,
  "num_classes": 1000,
  "in_channels": 3,
}
IMPROVED_DEFAULTS: Mapping[str, Any] = {
  **GUIDED_DEFAULTS,
  "rescale_timesteps": True,
  "rescale_learned_sigmas": True,
}
# create_model's channel_mult when the flag is "" (both repositories; 32 is improved's).
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


def _ints(value) -> tuple[int, ...]:
  if isinstance(value, str):
    return tuple(int(v) for v in value.split(",") if v.strip())
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def complete_flags(flags: Mapping[str, Any], *, variant: str = "guided") -> dict:
  """`flags` over the defaults of `variant` ('guided' or 'improved'); unknown flags are errors."""
  if variant not in ("guided", "improved"):
    raise PretrainedError(f"ADM variant must be 'guided' or 'improved', got {variant!r}")
  defaults = GUIDED_DEFAULTS if variant == "guided" else IMPROVED_DEFAULTS
  unknown = sorted(set(flags) - set(defaults))
  if unknown:
    raise PretrainedError(f"unknown ADM flags {unknown}; known: {sorted(defaults)}")
  return {**defaults, **flags}


def unet_kwargs(flags: Mapping[str, Any], *, variant: str = "guided") -> tuple[dict, tuple]:
  """`UNet` kwargs and the input shape (H, W, C) from ADM's model flags.

  Raises:
    PretrainedError: a flag value `UNet` cannot express, naming it.
  """
  f = complete_flags(flags, variant=variant)
  size = int(f["image_size"])
  mult = f["channel_mult"]
  if mult in ("", None, ()):
    if size not in CHANNEL_MULT:
      raise PretrainedError(
        f"ADM image_size={size} without channel_mult: only {sorted(CHANNEL_MULT)} have a "
        "default (the 512 model's channel_mult starts at 0.5, which UNet cannot express)"
      )
    mult = CHANNEL_MULT[size]
  else:
    mult = _ints(mult)
  heads, head_ch, heads_up = (
    int(f["num_heads"]),
    int(f["num_head_channels"]),
    int(f["num_heads_upsample"]),
  )
  if head_ch == -1 and heads_up not in (-1, heads):
    raise PretrainedError(
      f"ADM num_heads_upsample={heads_up} != num_heads={heads}: UNet uses one head count"
    )
  steps = int(f["diffusion_steps"])
  if variant == "guided" and steps != 1000 and "rescale_timesteps" not in flags:
    # The one default that changes the function: improved-diffusion feeds the model
    # t * 1000 / T, guided-diffusion t (all its models have T = 1000).
    raise PretrainedError(
      f"ADM flags: diffusion_steps={steps} with variant 'guided' (which feeds the model t, "
      f"not improved-diffusion's t * 1000 / {steps}): for an improved-diffusion checkpoint "
      "set config.pretrained.adm_variant='improved' (load_pretrained(variant='improved')); "
      "otherwise pass the flag rescale_timesteps False"
    )
  kwargs = dict(
    ch=int(f["num_channels"]),
    ch_mult=tuple(mult),
    num_res_blocks=int(f["num_res_blocks"]),
    attn_resolutions=_ints(f["attention_resolutions"]),
    num_heads=heads,
    head_channels=None if head_ch == -1 else head_ch,
    dropout=float(f["dropout"]),
    num_groups=32,
    use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
    resblock_updown=bool(f["resblock_updown"]),
    conv_resample=True,
    num_classes=int(f["num_classes"]) if f["class_cond"] else None,
    out_channels=int(f["in_channels"]),
    learn_sigma=bool(f["learn_sigma"]),
    timestep_scale=1000.0 / steps if f["rescale_timesteps"] else 1.0,
  )
  return kwargs, (size, size, int(f["in_channels"]))


def _res(prefix: str, path: tuple, has_skip: bool) -> list[Rule]:
  rules = []
  for jd, tn, kind in (
    ("norm1", "in_layers.0", "norm"),
    ("conv1", "in_layers.2", "conv"),
    ("emb_proj", "emb_layers.1", "dense"),
    ("norm2", "out_layers.0", "norm"),
    ("conv2", "out_layers.3", "conv"),
  ) + ((("skip", "skip_connection", "conv"),) if has_skip else ()):
    rules += module_rules(kind, f"{prefix}.{tn}", (*path, jd), {})
  return rules


def _attn(prefix: str, path: tuple, *, heads: int, legacy: bool) -> list[Rule]:
  qkv = tuple((*path, n) for n in ("q", "k", "v"))
  return [
    *module_rules("norm", f"{prefix}.norm", (*path, "norm"), {}),
    mapping.fused_qkv(
      f"{prefix}.qkv.weight", tuple((*p, "kernel") for p in qkv), heads=heads, legacy=legacy
    ),
    mapping.fused_qkv(
      f"{prefix}.qkv.bias", tuple((*p, "bias") for p in qkv), heads=heads, legacy=legacy
    ),
    *module_rules("dense1d", f"{prefix}.proj_out", (*path, "proj_out"), {}),
  ]


def rules(
  kwargs: Mapping[str, Any], shapes: Mapping[tuple, tuple], *, new_attention_order: bool = False
) -> list[Rule]:
  """The rules between an ADM `UNetModel` state dict and the `UNet(**kwargs)` params.

  Args:
    kwargs: from `unet_kwargs`.
    shapes: `mapping.param_shapes` of that UNet.
    new_attention_order: the flag `use_new_attention_order` (qkv split before heads).
  """
  top = {p[0] for p in shapes}
  skip = lambda name: (name, "skip", "kernel") in shapes  # noqa: E731

  def attn(prefix, name):
    c = shapes[(name, "q", "bias")][0]
    hc = kwargs["head_channels"]
    heads = c // hc if hc else kwargs["num_heads"]
    return _attn(prefix, (name,), heads=heads, legacy=not new_attention_order)

  def resample(prefix, name, up):
    if kwargs["resblock_updown"]:
      return _res(prefix, (name,), skip(name))
    return module_rules("conv", f"{prefix}.{'conv' if up else 'op'}", (name, "conv"), {})

  out = module_rules("conv", "input_blocks.0.0", ("conv_in",), {})
  out += module_rules("dense", "time_embed.0", ("time_mlp_0",), {})
  out += module_rules("dense", "time_embed.2", ("time_mlp_1",), {})
  if "class_emb" in top:
    out.append(mapping.embedding("label_emb.weight", ("class_emb", "embedding")))
  levels, nrb = len(kwargs["ch_mult"]), kwargs["num_res_blocks"]
  n = 0
  for i in range(levels):
    for j in range(nrb):
      n += 1
      name = f"down_{i}_res_{j}"
      out += _res(f"input_blocks.{n}.0", (name,), skip(name))
      if f"down_{i}_attn_{j}" in top:
        out += attn(f"input_blocks.{n}.1", f"down_{i}_attn_{j}")
    if i != levels - 1:
      n += 1
      out += resample(f"input_blocks.{n}.0", f"down_{i}_downsample", up=False)
  out += _res("middle_block.0", ("mid_res_0",), skip("mid_res_0"))
  out += attn("middle_block.1", "mid_attn")
  out += _res("middle_block.2", ("mid_res_1",), skip("mid_res_1"))
  m = 0
  for i in reversed(range(levels)):
    for j in range(nrb + 1):
      name = f"up_{i}_res_{j}"
      out += _res(f"output_blocks.{m}.0", (name,), skip(name))
      has_attn = f"up_{i}_attn_{j}" in top
      if has_attn:
        out += attn(f"output_blocks.{m}.1", f"up_{i}_attn_{j}")
      if i and j == nrb:
        out += resample(f"output_blocks.{m}.{2 if has_attn else 1}", f"up_{i}_upsample", up=True)
      m += 1
  out += module_rules("norm", "out.0", ("norm_out",), {})
  out += module_rules("conv", "out.2", ("conv_out",), {})
  return out


def parse_flags(text: str) -> dict:
  """'--image_size 64 --class_cond True ...' (the READMEs' MODEL_FLAGS) -> a flags dict."""
  tokens = text.split()
  if len(tokens) % 2:
    raise PretrainedError(f"ADM flags must be '--name value' pairs, got {text!r}")
  out = {}
  for name, value in zip(tokens[::2], tokens[1::2], strict=True):
    if not name.startswith("--"):
      raise PretrainedError(f"ADM flags: expected --name, got {name!r} in {text!r}")
    out[name[2:]] = _value(value)
  return out


def _value(v: str):
  if v in ("True", "true"):
    return True
  if v in ("False", "false"):
    return False
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v
