"""Stage 2 of latent diffusion on the embedded digits: a U-Net on 8x8x4 latents.

  python -m experiments.main --mode=train_autoencoder \
      --config=jdiff/configs/ae_digits.py --workdir=runs/ae_digits
  python -m experiments.main --config=jdiff/configs/ldm_digits.py \
      --workdir=runs/ldm_digits --config.latent.autoencoder_workdir=runs/ae_digits

The data are the (posterior-mean, 1/std-scaled) latents of the frozen stage-1
autoencoder; samples are decoded back to 32x32 pixels. data.image_size must match the
size the autoencoder was trained on (ae_digits: 32).
"""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.image_size = 32  # as in ae_digits.py; latents are 8x8x4 with f = 4
  # 8x8 latents: levels 8 -> 4 -> 2, attention at 4x4.
  # default.py's U-Net (ch 32, one res block per level): ~1M parameters.
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_groups = 8
  # LDM's latent schedule. With cosine, alpha_bar_T ~ 0 and, without clipping, the first
  # eps-step's x0 = (x_T - sqrt(1 - a) eps) / sqrt(a) explodes (samples with std ~1e3).
  c.diffusion.schedule = "scaled_linear"
  # Scaled latents have unit std, not a [-1, 1] range: clipping x0 would distort them.
  c.sample.clip_x0 = 0.0
  c.train.num_steps = 3000
  return c
