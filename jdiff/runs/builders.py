"""The networks of a config: the diffusion model (`config.model`, `model.arch`, `objective`)
and the stage-1 autoencoder (`config.autoencoder`). The config is validated before
(`jdiff.runs.validate`): these only build.
"""

from __future__ import annotations

from jdiff.data.latents import latent_shape_of
from jdiff.models.autoencoder import AutoencoderKL, make_autoencoder
from jdiff.models.layers import DTYPES
from jdiff.models.unet import UNet
from jdiff.runs import objectives


def build_model(config, *, num_classes: int | None, channels: int) -> UNet:
  """The U-Net from `config.model` (its fields are UNet's constructor arguments)."""
  kwargs = dict(config.model)  # checked by jdiff.runs.validate
  kwargs.pop("arch", None)
  dtype = kwargs.pop("dtype", "float32")
  kwargs["num_classes"] = num_classes if config.conditional else None
  kwargs["out_channels"] = channels
  if config.get("superres") is not None and config.superres.factor:
    kwargs["image_cond_channels"] = channels + 1  # [augmented upsampled low-res, level]
  for key in ("ch_mult", "attn_resolutions"):
    kwargs[key] = tuple(kwargs[key])
  if config.get("objective", "ddpm") != "ddpm" or config.model.get("arch", "unet") != "unet":
    return objectives.build_network(config, kwargs, dtype=DTYPES[dtype])
  return UNet(dtype=DTYPES[dtype], **kwargs)


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
