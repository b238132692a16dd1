"""diffusers' `UNet2DModel` (config.json + state dict) <-> `jdiff.models.UNet`.

Covers the DDPM architectures that diffusers ports (google/ddpm-cifar10-32,
ddpm-celebahq-256, ddpm-ema-church-256, ddpm-cat/bedroom-256) and the other
`UNet2DModel`s built from `DownBlock2D` / `AttnDownBlock2D` / `UpBlock2D` /
`AttnUpBlock2D` with conv resampling, 'default' or 'scale_shift' time conditioning and
an optional class embedding. What `UNet` cannot express is an error naming the option
(e.g. Fourier time embeddings, `ResnetDownsampleBlock2D`, `mid_block_scale_factor` != 1).

Module correspondence (diffusers -> jdiff, level i, block j; up blocks count from the
deepest level, k = levels - 1 - i):

  conv_in, conv_norm_out, conv_out            conv_in, norm_out, conv_out
  time_embedding.linear_{1,2}                 time_mlp_{0,1}
  class_embedding                             class_emb (+ a zero null-label row)
  down_blocks.i.resnets.j / attentions.j      down_{i}_res_{j} / down_{i}_attn_{j}
  down_blocks.i.downsamplers.0.conv           down_{i}_downsample/conv
  mid_block.resnets.{0,1} / attentions.0      mid_res_{0,1} / mid_attn
  up_blocks.k.resnets.j / attentions.j        up_{i}_res_{j} / up_{i}_attn_{j}
  up_blocks.k.upsamplers.0.conv               up_{i}_upsample/conv
  resnet norm1 conv1 time_emb_proj norm2 conv2 conv_shortcut
                                              norm1 conv1 emb_proj norm2 conv2 skip
  attention group_norm to_q to_k to_v to_out.0 (before diffusers 0.14: query key value
    proj_attn)                                norm q k v proj_out
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jdiff.pretrained import mapping
from jdiff.pretrained.mapping import PretrainedError, Rule, module_rules

# UNet2DModel's constructor defaults (diffusers 0.2x-0.3x), used for keys a config omits.
DEFAULTS: Mapping[str, Any] = {
  "sample_size": None,
  "in_channels": 3,
  "out_channels": 3,
  "center_input_sample": False,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "freq_shift": 0,
  "flip_sin_to_cos": True,
  "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
  "mid_block_type": "UNetMidBlock2D",
  "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  "block_out_channels": (224, 448, 672, 896),
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "downsample_padding": 1,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "dropout": 0.0,
  "act_fn": "silu",
  "attention_head_dim": 8,
  "norm_num_groups": 32,
  "attn_norm_num_groups": None,
  "norm_eps": 1e-5,
  "resnet_time_scale_shift": "default",
  "add_attention": True,
  "class_embed_type": None,
  "num_class_embeds": None,
  "num_train_timesteps": None,
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True, "CrossAttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True, "CrossAttnUpBlock2D": True}
_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
_REQUIRED = {
  "time_embedding_type": "positional",
  "mid_block_type": "UNetMidBlock2D",
  "mid_block_scale_factor": 1,
  "downsample_type": "conv",
  "upsample_type": "conv",
  "class_embed_type": None,
}


# UNet2DConditionModel (Stable Diffusion 1.x / 2.x): its options beyond UNet2DModel's
# with their defaults, and the values jdiff's UNet can express (None: any).
COND_DEFAULTS: Mapping[str, Any] = {
  **DEFAULTS,
  "in_channels": 4,
  "out_channels": 4,
  "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
  "block_out_channels": (320, 640, 1280, 1280),
  "cross_attention_dim": 1280,
  "num_attention_heads": None,
  "transformer_layers_per_block": 1,
  "use_linear_projection": False,
  "upcast_attention": False,  # softmax in float32 either way
}
_COND_REQUIRED = {
  **{k: v for k, v in _REQUIRED.items() if k != "mid_block_type"},
  "mid_block_type": "UNetMidBlock2DCrossAttn",
  "only_cross_attention": False,
  "dual_cross_attention": False,
  "reverse_transformer_layers_per_block": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "addition_embed_type": None,  # SDXL's 'text_time': see the module docstring
  "addition_time_embed_dim": None,
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "projection_class_embeddings_input_dim": None,
  "attention_type": "default",
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "cross_attention_norm": None,
  "addition_embed_type_num_heads": 64,
}


def unet_kwargs(config: Mapping[str, Any]) -> tuple[dict, tuple[int, int, int]]:
  """`UNet` constructor kwargs and the input shape (H, W, C) from a `config.json` dict.

  Raises:
    PretrainedError: naming the option `UNet` cannot express, or an inconsistent value.
  """
  name = config.get("_class_name", "UNet2DModel")
  if name not in _CLASSES:
    raise PretrainedError(f"config.json: _class_name={name!r}; supported: {list(_CLASSES)}")
  text = name == "UNet2DConditionModel"
  defaults = {**COND_DEFAULTS, **_COND_REQUIRED} if text else DEFAULTS
  unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
  if unknown:
    raise PretrainedError(f"config.json: options unknown to this importer: {unknown}")
  c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
  for key, value in (_COND_REQUIRED if text else _REQUIRED).items():
    if c[key] != value and not (key == "mid_block_only_cross_attention" and not c[key]):
      raise PretrainedError(f"config.json: {key}={c[key]!r} is not supported (only {value!r})")
  if c["act_fn"] not in ("silu", "swish"):
    raise PretrainedError(f"config.json: act_fn={c['act_fn']!r} is not supported (only silu)")
  if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
    raise PretrainedError(
      f"config.json: attn_norm_num_groups={c['attn_norm_num_groups']} differs from "
      f"norm_num_groups={c['norm_num_groups']} (UNet's middle attention uses norm_num_groups)"
    )
  if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
    raise PretrainedError(
      f"config.json: resnet_time_scale_shift={c['resnet_time_scale_shift']!r} is not "
      "supported ('default' or 'scale_shift')"
    )
  if c["num_class_embeds"] is not None and c["class_embed_type"] is not None:
    raise PretrainedError(
      f"config.json: class_embed_type={c['class_embed_type']!r} is not supported"
    )
  chans = [int(b) for b in c["block_out_channels"]]
  ch = chans[0]
  if any(b % ch for b in chans):
    raise PretrainedError(
      f"config.json: block_out_channels={chans} must all be multiples of the first ({ch})"
    )
  if c["time_embedding_dim"] not in (None, 4 * ch):
    raise PretrainedError(f"config.json: time_embedding_dim={c['time_embedding_dim']} != 4 * {ch}")
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  if len(down) != len(chans) or len(up) != len(chans):
    raise PretrainedError(
      f"config.json: {len(down)} down and {len(up)} up block types for {len(chans)} levels"
    )
  cross = lambda b: b.startswith("CrossAttn")  # noqa: E731
  bad = sorted(
    {b for b in down if b not in _DOWN or (_DOWN[b] and cross(b) != text)}
    | {b for b in up if b not in _UP or (_UP[b] and cross(b) != text)}
  )
  if bad:
    raise PretrainedError(
      f"config.json: block types {bad} are not supported (only {sorted(_DOWN)} / {sorted(_UP)})"
    )
  attn_levels = [i for i, b in enumerate(down) if _DOWN[b]]
  if attn_levels != [i for i, b in enumerate(reversed(up)) if _UP[b]]:
    raise PretrainedError(
      f"config.json: attention in down blocks {down} and up blocks {up} is not mirrored"
    )
  size = c["sample_size"]
  if size is None:
    raise PretrainedError("config.json: sample_size is needed (it places the attention levels)")
  h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
  heads = None if text else c["attention_head_dim"]
  kwargs = dict(
    ch=ch,
    ch_mult=tuple(b // ch for b in chans),
    num_res_blocks=int(c["layers_per_block"]),
    attn_resolutions=tuple(h // 2**i for i in attn_levels),
    num_heads=1,
    head_channels=None if heads is None else int(heads),
    dropout=float(c["dropout"]),
    num_groups=int(c["norm_num_groups"]),
    use_scale_shift_norm=c["resnet_time_scale_shift"] == "scale_shift",
    resblock_updown=False,
    conv_resample=True,
    num_classes=None if c["num_class_embeds"] is None else int(c["num_class_embeds"]),
    out_channels=int(c["out_channels"]),
    learn_sigma=False,
    norm_eps=float(c["norm_eps"]),
    flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
    freq_shift=float(c["freq_shift"]),
    downsample_padding=int(c["downsample_padding"]),
    mid_attention=bool(c["add_attention"]),
    # UNetMidBlock2D: attn_groups = attn_norm_num_groups, or if None resnet_groups for
    # 'default' time conditioning and no GroupNorm at all for 'scale_shift'.
    mid_attn_norm=c["attn_norm_num_groups"] is not None
    or c["resnet_time_scale_shift"] == "default",
    center_input=bool(c["center_input_sample"]),
  )
  if text:
    kwargs.update(_context_kwargs(c, chans))
  return kwargs, (h, w, int(c["in_channels"]))


def _per_level(c: Mapping[str, Any], key: str, levels: int) -> list[int]:
  v = c[key]
  v = [int(v)] * levels if isinstance(v, int) else [int(a) for a in v]
  if len(v) != levels:
    raise PretrainedError(f"config.json: {key}={c[key]} does not give one value per level")
  return v


def _context_kwargs(c: Mapping[str, Any], chans: list[int]) -> dict:
  """The cross-attention fields of `UNet` for a UNet2DConditionModel config.

  diffusers' `attention_head_dim` is, in UNet2DConditionModel, the number of heads
  (`num_attention_heads` falls back to it); jdiff's is the channels per head.
  """
  key = "num_attention_heads" if c["num_attention_heads"] is not None else "attention_head_dim"
  heads = _per_level(c, key, len(chans))
  if any(ch % n for ch, n in zip(chans, heads)):
    raise PretrainedError(f"config.json: {key}={c[key]} does not divide {chans}")
  depth = set(_per_level(c, "transformer_layers_per_block", len(chans)))
  if len(depth) != 1:
    raise PretrainedError(
      f"config.json: transformer_layers_per_block={c['transformer_layers_per_block']} varies "
      "by level; UNet has one transformer_depth"
    )
  return dict(
    context_dim=int(c["cross_attention_dim"]),
    transformer_depth=depth.pop(),
    attention_head_dim=tuple(ch // n for ch, n in zip(chans, heads)),
    mid_attn_norm=True,
  )


def _res(prefix: str, path: tuple, has_skip: bool) -> list[Rule]:
  rules = []
  for jd, tn, kind in (
    ("norm1", "norm1", "norm"),
    ("conv1", "conv1", "conv"),
    ("emb_proj", "time_emb_proj", "dense"),
    ("norm2", "norm2", "norm"),
    ("conv2", "conv2", "conv"),
  ) + ((("skip", "conv_shortcut", "conv"),) if has_skip else ()):
    rules += module_rules(kind, f"{prefix}.{tn}", (*path, jd), {})
  return rules


def _conv1x1(key: str, path: tuple) -> Rule:
  """A 1x1 conv weight [O, I, 1, 1] <-> a Dense kernel [I, O] (Transformer2D's projections)."""
  return Rule((key,), (path,), lambda w: (w[:, :, 0, 0].T,), lambda w: (w.T[:, :, None, None],))


def _transformer(prefix: str, path: tuple, depth: int, linear: bool) -> list[Rule]:
  """Transformer2DModel <-> `Transformer2D` (`linear`: use_linear_projection)."""
  out = module_rules("norm", f"{prefix}.norm", (*path, "norm"), {})
  for name in ("proj_in", "proj_out"):
    if linear:
      out += module_rules("dense", f"{prefix}.{name}", (*path, name), {})
    else:
      out += [_conv1x1(f"{prefix}.{name}.weight", (*path, name, "kernel"))]
      out += [mapping.same(f"{prefix}.{name}.bias", (*path, name, "bias"))]
  for d in range(depth):
    tp, jp = f"{prefix}.transformer_blocks.{d}", f"block_{d}_"
    for n in ("norm1", "norm2", "norm3"):
      out += [mapping.same(f"{tp}.{n}.weight", (*path, jp + n, "scale"))]
      out += [mapping.same(f"{tp}.{n}.bias", (*path, jp + n, "bias"))]
    for a in ("attn1", "attn2"):
      out += [
        mapping.dense(f"{tp}.{a}.to_{x}.weight", (*path, jp + a, f"to_{x}", "kernel"))
        for x in "qkv"
      ]
      out += module_rules("dense", f"{tp}.{a}.to_out.0", (*path, jp + a, "to_out"), {})
    out += module_rules("dense", f"{tp}.ff.net.0.proj", (*path, jp + "ff_proj"), {})
    out += module_rules("dense", f"{tp}.ff.net.2", (*path, jp + "ff_out"), {})
  return out


def _attn(prefix: str, path: tuple, deprecated: bool, *, norm: bool = True) -> list[Rule]:
  names = ((("norm", "group_norm", "norm"),) if norm else ()) + (
    ("q", "query" if deprecated else "to_q", "dense"),
    ("k", "key" if deprecated else "to_k", "dense"),
    ("v", "value" if deprecated else "to_v", "dense"),
    ("proj_out", "proj_attn" if deprecated else "to_out.0", "dense"),
  )
  rules = []
  for jd, tn, kind in names:
    rules += module_rules(kind, f"{prefix}.{tn}", (*path, jd), {})
  return rules


def rules(
  kwargs: Mapping[str, Any],
  shapes: Mapping[tuple, tuple],
  *,
  deprecated_attention: bool = False,
  linear_projection: bool = False,
) -> list[Rule]:
  """The rules between a `UNet2DModel` state dict and the `UNet(**kwargs)` params.

  Args:
    kwargs: from `unet_kwargs`.
    shapes: `mapping.param_shapes` of that UNet (it tells where attention and 1x1
      shortcuts are).
    deprecated_attention: attention keys named query/key/value/proj_attn (checkpoints
      saved before diffusers 0.14, e.g. the google/ddpm-* hub files).
    linear_projection: a UNet2DConditionModel's `use_linear_projection` (SD 2.x): the
      transformers' proj_in / proj_out are linear [O, I], else 1x1 convs [O, I, 1, 1].
  """
  top = {p[0] for p in shapes}
  attn = _attn
  if kwargs.get("context_dim") is not None:  # UNet2DConditionModel: Transformer2DModels
    depth = kwargs["transformer_depth"]

    def attn(prefix, path, _, norm=True):
      return _transformer(prefix, path, depth, linear_projection)

  has = lambda name: name in top  # noqa: E731
  skip = lambda name: (name, "skip", "kernel") in shapes  # noqa: E731
  out = []
  out += module_rules("conv", "conv_in", ("conv_in",), {})
  out += module_rules("dense", "time_embedding.linear_1", ("time_mlp_0",), {})
  out += module_rules("dense", "time_embedding.linear_2", ("time_mlp_1",), {})
  if has("class_emb"):
    out.append(mapping.embedding("class_embedding.weight", ("class_emb", "embedding")))
  levels = len(kwargs["ch_mult"])
  for i in range(levels):
    for j in range(kwargs["num_res_blocks"]):
      name = f"down_{i}_res_{j}"
      out += _res(f"down_blocks.{i}.resnets.{j}", (name,), skip(name))
      if has(f"down_{i}_attn_{j}"):
        out += attn(
          f"down_blocks.{i}.attentions.{j}", (f"down_{i}_attn_{j}",), deprecated_attention
        )
    if i != levels - 1:
      out += module_rules(
        "conv", f"down_blocks.{i}.downsamplers.0.conv", (f"down_{i}_downsample", "conv"), {}
      )
  for j in range(2):
    out += _res(f"mid_block.resnets.{j}", (f"mid_res_{j}",), skip(f"mid_res_{j}"))
  if has("mid_attn"):
    out += attn(
      "mid_block.attentions.0",
      ("mid_attn",),
      deprecated_attention,
      norm=("mid_attn", "norm", "norm", "scale") in shapes,
    )
  for i in range(levels):
    k = levels - 1 - i
    for j in range(kwargs["num_res_blocks"] + 1):
      name = f"up_{i}_res_{j}"
      out += _res(f"up_blocks.{k}.resnets.{j}", (name,), skip(name))
      if has(f"up_{i}_attn_{j}"):
        out += attn(f"up_blocks.{k}.attentions.{j}", (f"up_{i}_attn_{j}",), deprecated_attention)
    if i != 0:
      out += module_rules(
        "conv", f"up_blocks.{k}.upsamplers.0.conv", (f"up_{i}_upsample", "conv"), {}
      )
  out += module_rules("norm", "conv_norm_out", ("norm_out",), {})
  out += module_rules("conv", "conv_out", ("conv_out",), {})
  return out


def uses_deprecated_attention(keys) -> bool:
  """Whether attention weights are named query/key/value/proj_attn (diffusers < 0.14)."""
  return any(k.endswith(".proj_attn.weight") for k in keys)
