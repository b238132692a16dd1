"""The networks of a config: the diffusion model (`config.model`, `model.arch`, `objective`)
and the stage-1 autoencoder (`config.autoencoder`). The config is validated before
(`jdiff.runs.validate`): these only build.
"""

from __future__ import annotations

import functools

import numpy as np

from jdiff.data import captions
from jdiff.data.latents import latent_shape_of
from jdiff.models.autoencoder import AutoencoderKL, make_autoencoder
from jdiff.models.clip import CLIPTextEncoder
from jdiff.models.layers import DTYPES
from jdiff.models.text_unet import TextUNet
from jdiff.models.unet import UNet
from jdiff.runs import objectives


def build_model(config, *, num_classes: int | None, channels: int) -> UNet:
  """The U-Net from `config.model` (its fields are UNet's constructor arguments); with a
  `config.text` section, a `TextUNet`: the U-Net cross-attending to its own text encoder."""
  kwargs = dict(config.model)  # checked by jdiff.runs.validate
  kwargs.pop("arch", None)
  kwargs.pop("residual_dtype", None)  # DiT's (objectives.build_network reads it)
  dtype = kwargs.pop("dtype", "float32")
  kwargs["num_classes"] = num_classes if config.conditional else None
  kwargs["out_channels"] = channels
  if config.get("superres") is not None and config.superres.factor:
    kwargs["image_cond_channels"] = channels + 1  # [augmented upsampled low-res, level]
  for key in ("ch_mult", "attn_resolutions"):
    kwargs[key] = tuple(kwargs[key])
  if config.get("objective", "ddpm") != "ddpm" or config.model.get("arch", "unet") != "unet":
    return objectives.build_network(config, kwargs, dtype=DTYPES[dtype])
  if config.get("text") is None:
    return UNet(dtype=DTYPES[dtype], **kwargs)
  t = config.text
  kwargs.update(num_classes=None, context_dim=t.width)
  encoder = CLIPTextEncoder(
    vocab_size=len(captions.VOCAB),
    width=t.width,
    num_layers=t.num_layers,
    heads=t.heads,
    mlp_dim=t.mlp_dim,
    max_length=t.max_length,
    act="gelu",
    dtype=DTYPES[dtype],
  )
  return TextUNet(UNet(dtype=DTYPES[dtype], **kwargs), encoder, pad_id=captions.PAD)


def text_conditioning(config, num_classes: int):
  """(caption_fn(labels, rng) -> ids [B, L], the null prompt's ids [L], the prompt of each
  label [K, L]) of a `config.text` model, or (None, None, None) without one."""
  if config.get("text") is None:
    return None, None, None
  length = config.text.max_length
  table = captions.caption_table(num_classes, max_length=length)
  prompts = np.asarray(table[captions.PROMPT_TEMPLATE])
  return functools.partial(captions.caption_ids, table), captions.null_ids(length), prompts


def build_autoencoder(config, image_shape) -> AutoencoderKL:
  """The AutoencoderKL of `config.autoencoder` (preset + non-None overrides).

  `in_channels` defaults to the data's channel count.
  """
  overrides = {k: v for k, v in config.autoencoder.overrides.items() if v is not None}
  if "ch_mult" in overrides:
    overrides["ch_mult"] = tuple(overrides["ch_mult"])
  if "dtype" in overrides:  # a name checked by jdiff.runs.validate
    overrides["dtype"] = DTYPES[overrides["dtype"]]
  overrides.setdefault("in_channels", int(image_shape[-1]))
  module = make_autoencoder(config.autoencoder.preset, **overrides)
  latent_shape_of(module, image_shape)  # validates size and channels
  return module
