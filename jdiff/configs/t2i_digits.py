"""Text to image on the embedded digits: latent diffusion conditioned on generated captions.

  python -m experiments.main --mode=train_autoencoder \
      --config=jdiff/configs/ae_digits.py --workdir=runs/ae_digits
  python -m experiments.main --config=jdiff/configs/t2i_digits.py --workdir=runs/t2i_digits \
      --config.latent.autoencoder_workdir=runs/ae_digits
  python -m experiments.main --config=jdiff/configs/t2i_digits.py --workdir=runs/t2i_digits \
      --config.latent.autoencoder_workdir=runs/ae_digits --mode=sample \
      --config.sample.prompts="('the digit 3', 'a handwritten seven', 'nine')"

ldm_digits.py's latent U-Net (8x8x4 latents of the ae_digits autoencoder) cross-attends to
a 2-layer CLIP-style text encoder trained with it (`jdiff.models.text_unet.TextUNet`). Each
training example gets a caption of its digit drawn from `jdiff.data.captions.TEMPLATES`
("7", "seven", "the digit 7", "a handwritten seven", ...); 10% of them are replaced by the
empty prompt, the null condition of classifier-free guidance. Without `sample.prompts`,
samples and grids take the prompt of their class ("a handwritten seven", class = index mod
10), which `--mode=fid` scores with the digits classifier (`label_accuracy`).
"""

import ml_collections

from jdiff.configs import ldm_digits


def get_config():
  c = ldm_digits.get_config()
  c.unlock()
  c.conditional = True
  c.train.label_dropout = 0.1
  # Cross-attention at both latent levels (8x8 and 4x4) and in the middle.
  c.model.attn_resolutions = (8, 4)
  c.model.transformer_depth = 1
  c.model.attention_head_dim = 32
  # The text tower (jdiff.models.clip.CLIPTextEncoder, GELU) over the caption vocabulary.
  c.text = ml_collections.ConfigDict()
  c.text.captions = "digits"  # jdiff.data.captions: the digit's name in ten phrasings
  c.text.max_length = 10  # tokens: BOS + up to 8 words + EOS
  c.text.width = 64
  c.text.num_layers = 2
  c.text.heads = 4
  c.text.mlp_dim = 128
  # --mode=sample: one prompt per sample, cycling (empty: the prompt of each class).
  c.sample.prompts = ()
  c.sample.prompts_file = ""  # one prompt a line; replaces sample.prompts
  c.sample.negative_prompt = ""  # the null condition of guidance ('' = unconditional)
  c.sample.guidance_scale = 3.0
  c.lock()
  return c
