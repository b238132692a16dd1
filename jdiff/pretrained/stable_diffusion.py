"""Stable Diffusion pipelines (diffusers layout) as jdiff modules, and prompt -> image.

  sd = load_stable_diffusion("/models/stable-diffusion-v1-5")   # or a hub name
  images = text_to_image(sd, ["a red bicycle"], seeds=[0], guidance=7.5, num_steps=50)

A pipeline directory holds `model_index.json` and the components `unet/`
(UNet2DConditionModel -> `UNet` with cross-attention), `vae/` (AutoencoderKL ->
`jdiff.models.AutoencoderKL` with its `scaling_factor`), `text_encoder/` (CLIPTextModel ->
`jdiff.models.clip.CLIPTextEncoder`), `tokenizer/` (CLIP BPE, read by transformers) and
`scheduler/` (the training schedule and parameterisation, `schedulers.from_diffusers`).
Weights are read from .safetensors with numpy (no torch); the U-Net and the text encoder
are placed straight onto their shardings one array at a time (`mapping.to_params`).

Sampling is jdiff's: the samplers of `jdiff.samplers.registry` on the pipeline's schedule;
classifier-free guidance takes the negative prompt's (default: the empty prompt's) context
as the null condition ([CFG] eq. 6, as diffusers' pipelines). The publisher's timestep
spacing is not taken over: jdiff's timestep samplers start at the last training timestep
('trailing' by default; diffusers' SD schedulers use 'leading' with steps_offset=1).

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models, 2022.
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance, 2022.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.autoencoder import AutoencoderKL
from jdiff.models.autoencoder_convert import (
  ldm_state_dict_from_diffusers,
  params_from_ldm_state_dict,
)
from jdiff.models.clip import CLIPTextEncoder
from jdiff.pretrained import clip_convert, load, mapping, schedulers
from jdiff.pretrained.mapping import PretrainedError
from jdiff.samplers.registry import make_sample_fn

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
HUB_FILES = (
  "model_index.json",
  "unet/config.json",
  "unet/diffusion_pytorch_model.safetensors",
  "vae/config.json",
  "vae/diffusion_pytorch_model.safetensors",
  "text_encoder/config.json",
  "text_encoder/model.safetensors",
  "tokenizer/vocab.json",
  "tokenizer/merges.txt",
  "tokenizer/tokenizer.json",
  "tokenizer/tokenizer_config.json",
  "tokenizer/special_tokens_map.json",
  "scheduler/scheduler_config.json",
)
# AutoencoderKL options jdiff's autoencoder expresses only at these values.
_VAE_REQUIRED = {
  "act_fn": "silu",
  "use_quant_conv": True,
  "use_post_quant_conv": True,
  "mid_block_add_attention": True,
  "shift_factor": None,
  "latents_mean": None,
  "latents_std": None,
}


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
  """An imported Stable Diffusion pipeline.

  Attributes:
    unet: the `load.Pretrained` U-Net (module, params, latent shape, schedule settings).
    vae: the `AutoencoderKL`.
    vae_params: its params.
    scaling_factor: the diffusion model sees latents `z * scaling_factor`.
    latent_shape: (h, w, c) of the U-Net's latents.
    text_encoder: the `CLIPTextEncoder`.
    text_params: its params.
    tokenizer: the pipeline's CLIP tokenizer (transformers).
    settings: `schedulers.Settings` of scheduler_config.json.
    source: the directory.
  """

  unet: load.Pretrained
  vae: AutoencoderKL
  vae_params: Any
  scaling_factor: float
  latent_shape: tuple[int, int, int]
  text_encoder: CLIPTextEncoder
  text_params: Any
  tokenizer: Any
  settings: schedulers.Settings
  source: str


def vae_kwargs(config: Mapping[str, Any]) -> tuple[dict, float]:
  """(`AutoencoderKL` kwargs, scaling_factor) of a diffusers AutoencoderKL config.json."""
  for key, value in _VAE_REQUIRED.items():
    if config.get(key, value) != value:
      raise PretrainedError(f"vae/config.json: {key}={config[key]!r} is not supported ({value!r})")
  chans = [int(c) for c in config.get("block_out_channels", (64,))]
  if any(c % chans[0] for c in chans):
    raise PretrainedError(f"vae/config.json: block_out_channels={chans} are not multiples")
  kwargs = dict(
    ch=chans[0],
    ch_mult=tuple(c // chans[0] for c in chans),
    num_res_blocks=int(config.get("layers_per_block", 1)),
    z_channels=int(config.get("latent_channels", 4)),
    in_channels=int(config.get("in_channels", 3)),
    out_ch=int(config.get("out_channels", 3)),
    num_groups=int(config.get("norm_num_groups", 32)),
  )
  return kwargs, float(config.get("scaling_factor", 0.18215))


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {path}: not a diffusers Stable Diffusion pipeline directory")
  with open(path) as f:
    return json.load(f)


def _place(params, shardings):
  """`params` on `shardings` (see `mapping.to_params`), leaf by leaf; None: as they are."""
  if shardings is None:
    return params
  flat = flax.traverse_util.flatten_dict(params)
  placed = {
    p: jax.device_put(v, mapping._sharding_of(shardings, p, v.shape)) for p, v in flat.items()
  }  # noqa: SLF001
  return flax.traverse_util.unflatten_dict(placed)


def load_stable_diffusion(
  path: str, *, revision: str | None = None, shardings=None, **unet_overrides: Any
) -> StableDiffusion:
  """Loads a diffusers Stable Diffusion pipeline directory (or hub name).

  Args:
    path: the directory (with model_index.json) or a hub name 'owner/name' (its U-Net,
      VAE, text encoder, tokenizer and scheduler files only, through huggingface_hub).
    revision: hub revision.
    shardings: where each param goes (`mapping.to_params`): None, one Sharding, or a
      callable `(path, shape) -> Sharding`.
    **unet_overrides: U-Net fields that keep its parameters, e.g. dtype, conv_impl, remat.

  Raises:
    PretrainedError / FileNotFoundError: a component missing or not expressible, naming it.
    OSError: a hub name while offline, in one line.
  """
  directory = path
  if not os.path.exists(path):
    if not load.looks_like_hub_name(path):
      raise FileNotFoundError(f"{path!r} is neither a local directory nor a hub name owner/name")
    directory = load.hub_download(path, revision=revision, patterns=list(HUB_FILES))
  index = _read_json(os.path.join(directory, "model_index.json"))
  missing = [c for c in COMPONENTS if c not in index]
  if missing:
    raise PretrainedError(f"{directory}/model_index.json names no {missing}")
  join = lambda *p: os.path.join(directory, *p)  # noqa: E731
  unet_file = join("unet", load.WEIGHTS[0])
  unet = load.build(
    "diffusers",
    load.read_state_dict(unet_file),
    config=_read_json(join("unet", "config.json")),
    scheduler=None,
    shardings=shardings,
    source=unet_file,
    **unet_overrides,
  )
  if unet.module.context_dim is None:
    raise PretrainedError(f"{unet_file}: the U-Net takes no text context (not UNet2DCondition)")
  settings = schedulers.from_diffusers(_read_json(join("scheduler", "scheduler_config.json")))
  kwargs, scale = vae_kwargs(_read_json(join("vae", "config.json")))
  vae_module = AutoencoderKL(**kwargs)
  vae_sd = ldm_state_dict_from_diffusers(load.read_state_dict(join("vae", load.WEIGHTS[0])))
  vae_params = _place(params_from_ldm_state_dict(vae_sd, config=vae_module), shardings)
  encoder, text_params = clip_convert.load_text_encoder(join("text_encoder"), shardings=shardings)
  if encoder.width != unet.module.context_dim:
    raise PretrainedError(
      f"text encoder width {encoder.width} != the U-Net's cross_attention_dim "
      f"{unet.module.context_dim}"
    )
  tokenizer = clip_convert.load_tokenizer(join("tokenizer"))
  return StableDiffusion(
    unet,
    vae_module,
    vae_params,
    scale,
    tuple(unet.image_shape),
    encoder,
    text_params,
    tokenizer,
    settings,
    directory,
  )


def encode_prompts(sd: StableDiffusion, prompts: Sequence[str]) -> np.ndarray:
  """Token ids [len(prompts), 77] of the pipeline's tokenizer."""
  return clip_convert.tokenize(sd.tokenizer, prompts, max_length=sd.text_encoder.max_length)


def make_text_to_image(
  sd: StableDiffusion,
  *,
  negative_prompt: str = "",
  guidance: float = 7.5,
  sampler: str = "ddim",
  num_steps: int = 50,
  eta: float | None = None,
  spacing: str = "auto",
):
  """`generate(prompts, *, seeds=None, latents_T=None) -> (images, latents)`, jitted once.

  Each prompt is sampled alone (a vmap over prompts): its image depends on its prompt and
  seed only, not on the other prompts of the call.

  Args:
    sd: from `load_stable_diffusion`.
    negative_prompt: the null condition of guidance ('' = the unconditional context).
    guidance: the CFG scale w (1: no guidance, one model call per step).
    sampler, num_steps, eta, spacing: `make_sample_fn`'s.

  `generate`'s arguments: N prompts; N `seeds` (default 0, 1, ...): prompt i starts from
  N(0, I) latents of `jax.random.key(seeds[i])` and its sampler noise is that of
  `fold_in(key, 1)`; or `latents_T` [N, h, w, c], the starting latents (e.g. another
  pipeline's). It returns (images [N, H, W, 3] float32 in [0, 1], final latents [N, h, w, c]).
  """
  s = sd.settings
  shape = sd.latent_shape
  null_ids = encode_prompts(sd, [negative_prompt])

  def run(unet_params, text_params, vae_params, ids, x_T, keys):
    text = lambda i: sd.text_encoder.apply({"params": text_params}, i)  # noqa: E731
    sample = make_sample_fn(
      sd.unet.module,
      s.schedule,
      sampler=sampler,
      num_steps=num_steps,
      eta=eta,
      spacing=spacing,
      clip_x0=None,
      prediction=s.prediction,
      guidance_scale=guidance,
      null_label=text(null_ids)[0],
    )
    one = lambda x, k, c: sample(unet_params, x[None], jax.random.fold_in(k, 1), c[None])[0]  # noqa: E731
    z0 = jax.vmap(one)(x_T, keys, text(ids))
    # [LDM] App. G: the decoder takes z / scaling_factor (as jdiff.data.latents.decode).
    x = sd.vae.apply({"params": vae_params}, z0 / sd.scaling_factor, method="decode")
    return jnp.clip(x / 2 + 0.5, 0.0, 1.0), z0

  jrun = jax.jit(run)

  def generate(prompts: Sequence[str], *, seeds=None, latents_T=None):
    n = len(prompts)
    seeds = list(range(n)) if seeds is None else [int(x) for x in seeds]
    if len(seeds) != n:
      raise ValueError(f"{len(seeds)} seeds for {n} prompts: give one seed per prompt")
    keys = jnp.stack([jax.random.key(x) for x in seeds])
    if latents_T is None:
      latents_T = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    elif tuple(np.shape(latents_T)) != (n, *shape):
      raise ValueError(f"latents_T must have shape {(n, *shape)}, got {np.shape(latents_T)}")
    ids = encode_prompts(sd, prompts)
    params = (sd.unet.params, sd.text_params, sd.vae_params)
    images, z0 = jrun(*params, ids, jnp.asarray(latents_T), keys)
    return np.asarray(images), np.asarray(z0)

  return generate


def text_to_image(
  sd: StableDiffusion, prompts: Sequence[str], *, seeds=None, latents_T=None, **options
) -> tuple[np.ndarray, np.ndarray]:
  """`make_text_to_image(sd, **options)(prompts, seeds=seeds, latents_T=latents_T)`."""
  return make_text_to_image(sd, **options)(prompts, seeds=seeds, latents_T=latents_T)
