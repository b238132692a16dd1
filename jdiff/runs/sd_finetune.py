"""Fine-tuning an imported Stable Diffusion U-Net on image-caption pairs from a local folder.

`config.text.captions = 'folder'` (jdiff/configs/sd_finetune.py) with `config.pretrained.path`
naming a diffusers SD pipeline. `attach(setup)` loads the pipeline and encodes the folder
once with the frozen VAE (posterior mean x `scaling_factor`, as `jdiff.data.latents`) and
the frozen text encoder (the caption contexts [77, D]); the train step then sees latents as
images and contexts as labels, and only the U-Net trains. 10 % (`train.label_dropout`) of
the contexts are replaced by the empty prompt's, the null condition of guidance. Training
grids take the folder's first captions; `--mode=sample` takes `sample.prompts`.

Every other part is the ordinary diffusion run: checkpoints and exact resume, the mesh and
FSDP, metrics, EMA, the samplers (latents decoded by the pipeline's VAE).
"""

from __future__ import annotations

import numpy as np
from absl import logging

from jdiff.data import caption_folder, sources
from jdiff.data.latents import LatentCodec, LatentSource, encode_mean
from jdiff.models.layers import DTYPES
from jdiff.pretrained.mapping import PretrainedError
from jdiff.runs.pretrained import apply_settings

ENCODE_BATCH = 16  # images (or captions) per call of the frozen encoders
GRID_CAPTIONS = 8  # training grids cycle over the folder's first captions


def enabled(config) -> bool:
  """Whether `config` fine-tunes an SD pipeline on a caption folder."""
  return config.get("text") is not None and config.text.captions == "folder"


def _batched(fn, array: np.ndarray) -> np.ndarray:
  return np.concatenate(
    [np.asarray(fn(array[i : i + ENCODE_BATCH])) for i in range(0, len(array), ENCODE_BATCH)]
  )


def attach(setup) -> None:
  """Loads the pipeline into `setup` (U-Net, schedule, latent codec, text encoding, and for
  the modes that read data the folder's encoded source)."""
  import jax  # pylint: disable=g-import-not-at-top

  from jdiff.pretrained.stable_diffusion import encode_prompts, load_stable_diffusion  # pylint: disable=g-import-not-at-top

  c = setup.config
  if c.latent.autoencoder_workdir:
    raise PretrainedError("a Stable Diffusion pipeline brings its own VAE: unset config.latent")
  sd = load_stable_diffusion(
    c.pretrained.path,
    revision=c.pretrained.get("revision") or None,
    shardings=setup.repl,
    dtype=DTYPES[c.model.dtype],
    conv_impl=c.model.conv_impl,
    remat=c.model.remat,
  )
  h, w, _ = sd.latent_shape
  f = sd.vae.downsample_factor
  pixel_shape = (h * f, w * f, 3)
  text = jax.jit(lambda ids: sd.text_encoder.apply({"params": sd.text_params}, ids))

  def encode_text(prompts) -> np.ndarray:
    """float32 [N, 77, D]: the frozen text encoder's contexts of `prompts`."""
    return _batched(text, encode_prompts(sd, list(prompts))).astype(np.float32)

  pairs = caption_folder.list_pairs(c.text.folder)
  captions = [t for _, t in pairs]
  c = c.copy_and_resolve_references()
  with c.unlocked():
    c.model.learn_sigma = False
    if sd.settings is not None:
      for note in apply_settings(c, sd.settings, scheduler_sampling=False):
        logging.warning("pretrained %s: %s", sd.source, note)
    c.sample.clip_x0 = 0.0  # latents, not [-1, 1] pixels
  c.lock()
  setup.config = c
  setup.pretrained = sd.unet  # init_state starts from its params
  setup.module = sd.unet.module
  if sd.settings is not None:
    setup.schedule = sd.settings.schedule
  setup.codec = LatentCodec(sd.vae, sd.vae_params, sd.scaling_factor, sd.latent_shape, pixel_shape)
  setup.pixel_shape, setup.image_shape = pixel_shape, tuple(sd.latent_shape)
  setup.num_classes = None
  setup.encode_text = encode_text
  setup.null_label = encode_text([""])[0]
  setup.cond_table = encode_text(captions[:GRID_CAPTIONS])
  n = len(pairs)
  setup._meta = sources.DatasetMetadata(  # pylint: disable=protected-access
    c.text.folder, pixel_shape, None, {c.data.train_split: n, c.data.eval_split: n}
  )
  if setup.reads_data:
    images, _ = caption_folder.read_caption_folder(c.text.folder, image_size=pixel_shape[0])
    x = images.astype(np.float32) / 127.5 - 1.0
    enc = jax.jit(lambda b: encode_mean(sd.vae, sd.vae_params, b))
    z = (_batched(enc, x) * np.float32(sd.scaling_factor)).astype(np.float32)
    desc = f"CaptionFolder({c.text.folder!r}, n={n}, latent_shape={tuple(sd.latent_shape)})"
    setup.prepared_source = LatentSource(latents=z, labels=encode_text(captions), description=desc)
  logging.info(
    "fine-tuning the U-Net of %s on %d image-caption pairs of %s (%s pixels -> %s latents); "
    "VAE and text encoder frozen",
    sd.source,
    n,
    c.text.folder,
    pixel_shape,
    tuple(sd.latent_shape),
  )
