"""Pretrained U-Nets: diffusers `UNet2DModel` and openai ADM checkpoints, and their schedules."""

from jdiff.pretrained.load import Pretrained, build, hub_download, load_pretrained, read_state_dict
from jdiff.pretrained.mapping import PretrainedError, to_params, to_state_dict
from jdiff.pretrained.respace import adm_sample, space_timesteps
from jdiff.pretrained.schedulers import Settings, from_adm, from_diffusers
