"""A small latent DiT on the embedded digits: 8x8x4 latents of the ae_digits autoencoder.

  python -m experiments.main --mode=train_autoencoder \
      --config=jdiff/configs/ae_digits.py --workdir=runs/ae_digits
  python -m experiments.main --config=jdiff/configs/dit_latent_digits.py \
      --workdir=runs/dit_latent_digits --config.latent.autoencoder_workdir=runs/ae_digits

DiT with patch 2 (16 tokens), width 192, 6 blocks, 6 heads, class-conditional, trained as a flow
(DiT's own setup, DDPM eps with learn_sigma, is --config.objective=ddpm
--config.model.learn_sigma=True --config.diffusion.variance=learned_range).
"""

from jdiff.configs import ldm_digits


def get_config():
  c = ldm_digits.get_config()
  c.model.arch = "dit"
  c.dit.patch_size = 2
  c.dit.hidden = 192
  c.dit.depth = 6
  c.dit.num_heads = 6
  c.conditional = True
  c.objective = "flow"
  c.sample.sampler = "flow_euler"
  c.sample.num_steps = 20
  c.optim.lr = 5e-4
  return c
