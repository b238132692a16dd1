"""Fine-tuning an imported Stable Diffusion U-Net on image-caption pairs from a local folder.

  python -m experiments.main --config=jdiff/configs/sd_finetune.py --workdir=runs/sd_ft \
      --config.pretrained.path=/models/stable-diffusion-v1-5 --config.text.folder=/data/pairs
  python -m experiments.main --config=jdiff/configs/sd_finetune.py --workdir=runs/sd_ft \
      --config.pretrained.path=/models/stable-diffusion-v1-5 --config.text.folder=/data/pairs \
      --mode=sample --config.sample.prompts="('a red bicycle',)"

The folder holds images with captions: `metadata.jsonl` (diffusers' ImageFolder: `file_name`,
`text`) or `<name>.txt` beside each image (`jdiff.data.caption_folder`). They are encoded
once with the pipeline's frozen VAE and text encoder; only the U-Net trains
(`jdiff.runs.sd_finetune`), with 10 % of the captions dropped for guidance. Images are
centre-cropped and resized to the U-Net's size (8 x its latent size: 512 for SD 1.5).
"""

import ml_collections

from jdiff.configs import pretrained


def get_config():
  c = pretrained.get_config()
  c.unlock()
  c.conditional = True
  c.data.update(name="caption_folder", image_size=0, random_flip=False)  # name: not read
  c.text = ml_collections.ConfigDict()
  c.text.captions = "folder"
  c.text.folder = ""  # the image-caption folder
  c.train.update(num_steps=1000, batch_size=8, label_dropout=0.1, sample_every=0)
  c.optim.update(lr=1e-5, warmup_steps=0, schedule="constant")
  c.model.remat = False
  c.sample.update(sampler="ddim", num_steps=50, guidance_scale=7.5, clip_x0=0.0)
  c.sample.update(num_samples=8, batch_size=8, grid_size=8)
  c.sample.prompts = ()  # --mode=sample: sample i takes prompt i mod P
  c.sample.prompts_file = ""
  c.sample.negative_prompt = ""
  c.eval.update(bound_examples=0, quality_samples=0, batch_size=8)
  c.lock()
  return c
