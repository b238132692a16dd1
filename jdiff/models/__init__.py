"""Flax networks and the bridge to the library's `model_fn(x_t, t, cond)`."""

from jdiff.models.autoencoder import AutoencoderKL, autoencoder_presets, make_autoencoder
from jdiff.models.autoencoder_convert import (
  ldm_state_dict_from_diffusers,
  ldm_state_dict_from_params,
  ldm_state_dict_keys,
  params_from_ldm_state_dict,
)
from jdiff.models.bridge import make_model_fn
from jdiff.models.clip import CLIPTextEncoder
from jdiff.models.distributions import DiagonalGaussian
from jdiff.models.dit import DiT, make_dit
from jdiff.models.edm import EDMPrecond
from jdiff.models.guidance import cfg_model_fn
from jdiff.models.transformer2d import Transformer2D
from jdiff.models.unet import UNet, make_unet
