"""`--mode=sample` for prompts: an imported Stable Diffusion pipeline, one image per prompt.

The config is jdiff/configs/text2image.py: `config.pretrained` names the pipeline,
`config.sample` the prompts, negative prompt, guidance scale, seeds and sampler. The
Python API of the same shape is `jdiff.pretrained.stable_diffusion.make_text_to_image`.
"""

from __future__ import annotations

import os
import re
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from jdiff.models.layers import DTYPES
from jdiff.runs.validate import check_text2image
from jdiff.training.writers import save_image_grid, save_npz, unique_stem


def enabled(config) -> bool:
  """Whether `config` samples prompts with an imported Stable Diffusion pipeline (it has
  `sample.prompts` and no `text` section: a trained text model samples in `diffusion`)."""
  return "sample" in config and "prompts" in config.sample and "text" not in config


def prompts_of(sample_cfg) -> list[str]:
  """The prompts of `config.sample`: its prompts file's lines, or `prompts`."""
  s = sample_cfg
  if s.prompts_file:
    with open(s.prompts_file, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  return list(s.prompts)


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes one PNG per prompt and an .npz (images, latents, prompts, seeds); returns it."""
  from jdiff.pretrained.stable_diffusion import load_stable_diffusion, make_text_to_image  # pylint: disable=g-import-not-at-top

  check_text2image(config)
  s = config.sample
  prompts = prompts_of(s)
  seeds = list(s.seeds) if s.seeds is not None else [config.seed + i for i in range(len(prompts))]
  t0 = time.perf_counter()
  sd = load_stable_diffusion(
    config.pretrained.path,
    revision=config.pretrained.revision or None,
    dtype=DTYPES[config.model.dtype],
    conv_impl=config.model.conv_impl,
  )
  logging.info("loaded %s in %.1fs", sd.source, time.perf_counter() - t0)
  options = {k: s[k] for k in ("negative_prompt", "sampler", "num_steps", "eta", "spacing")}
  generate = make_text_to_image(sd, guidance=s.guidance_scale, **options)
  t0 = time.perf_counter()
  images, z0 = generate(prompts, seeds=seeds)
  logging.info("sampled %d prompts in %.1fs", len(prompts), time.perf_counter() - t0)
  out = os.path.join(workdir, "samples", f"prompts_{s.sampler}{s.num_steps}")
  if jax.process_index() != 0:
    return out + ".npz"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  out = unique_stem(out, (".npz",))
  npz = save_npz(
    out + ".npz", images=images, latents=z0, prompts=np.asarray(prompts), seeds=np.asarray(seeds)
  )
  for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40] or "empty"
    save_image_grid(f"{out}_{i:03d}_{slug}_seed{seed}.png", images[i : i + 1] * 2 - 1, scale=1)
  logging.info("wrote %s and %d PNGs", npz, len(prompts))
  return npz
