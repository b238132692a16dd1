"""Prompt -> image with an imported Stable Diffusion pipeline (jdiff/runs/text2image.py).

  python -m experiments.main --config=jdiff/configs/text2image.py --mode=sample \
      --config.pretrained.path=/models/stable-diffusion-v1-5 --workdir=runs/sd15 \
      --config.sample.prompts="('a red bicycle', 'a lighthouse at dusk')" \
      --config.sample.guidance_scale=7.5 --config.sample.sampler=dpmpp_2m

`pretrained.path` is a diffusers pipeline directory (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) or a hub name. Prompt i is sampled from seed
`sample.seeds[i]` (default `seed + i`); `sample.prompts_file` (one prompt a line) replaces
`sample.prompts`. Writes one PNG per prompt and an .npz (images, latents, prompts, seeds)
under workdir/samples/.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.pretrained = ml_collections.ConfigDict()
  c.pretrained.path = ""  # pipeline directory or hub name owner/name
  c.pretrained.revision = ""  # hub revision ('' = main)
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"  # the U-Net's compute dtype: float32 | bfloat16
  c.model.conv_impl = "auto"
  s = c.sample = ml_collections.ConfigDict()
  s.prompts = ("a photograph of an astronaut riding a horse",)
  s.prompts_file = ""  # one prompt a line; replaces sample.prompts
  s.negative_prompt = ""  # the null condition of guidance ('' = unconditional)
  s.guidance_scale = 7.5
  s.seeds = ml_collections.FieldReference(None, field_type=tuple)  # default: seed + i
  s.sampler = "ddim"
  s.num_steps = 50
  s.eta = ml_collections.FieldReference(None, field_type=float)
  s.spacing = "auto"
  return c
