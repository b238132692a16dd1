"""Stage 1 of latent diffusion on the embedded digits: a small KL autoencoder at 32x32.

  python -m experiments.main --mode=train_autoencoder \
      --config=jdiff/configs/ae_digits.py --workdir=runs/ae_digits

The 'tiny_f4' preset (f = 4, 4 latent channels) maps 32x32x1 digits to 8x8x4 latents
(4x fewer numbers, 16x fewer positions), which jdiff/configs/ldm_digits.py trains on.
"""

import ml_collections

from jdiff.configs import default


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # default.py's data section (the embedded digits), at 32x32.
  c.data = ml_collections.ConfigDict(default.get_config().data.to_dict())
  c.data.image_size = 32

  # jdiff.models.autoencoder.make_autoencoder(preset, **overrides); None keeps the preset's
  # value; in_channels defaults to the data's channel count.
  c.autoencoder = ml_collections.ConfigDict()
  c.autoencoder.preset = "tiny_f4"
  c.autoencoder.overrides = ml_collections.ConfigDict()
  o = c.autoencoder.overrides
  o.ch = ml_collections.FieldReference(None, field_type=int)
  o.ch_mult = ml_collections.FieldReference(None, field_type=tuple)
  o.num_res_blocks = ml_collections.FieldReference(None, field_type=int)
  o.z_channels = ml_collections.FieldReference(None, field_type=int)
  o.embed_dim = ml_collections.FieldReference(None, field_type=int)
  o.in_channels = ml_collections.FieldReference(None, field_type=int)
  o.num_groups = ml_collections.FieldReference(None, field_type=int)
  o.dtype = ml_collections.FieldReference(None, field_type=str)  # float32 | bfloat16

  # LDM's first-stage loss without LPIPS and the GAN (jdiff/models/autoencoder_losses.py).
  c.loss = ml_collections.ConfigDict()
  c.loss.recon_loss = "l1"  # l1 (LDM) | l2
  c.loss.kl_weight = 1e-6  # LDM / SD
  c.loss.perceptual_weight = 0.0  # must stay 0: no pretrained LPIPS network available
  c.loss.adversarial_weight = 0.0  # must stay 0: no discriminator implemented

  # Arguments of jdiff.training.optim.make_optimizer: the diffusion default's, at lr 1e-3.
  c.optim = ml_collections.ConfigDict(default.get_config().optim.to_dict())
  c.optim.lr = 1e-3

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2000
  c.train.batch_size = 64  # global, over all devices and processes
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.keep_checkpoints = 3
  # The generator of the training stream (dropout masks, timesteps, noise): threefry (the same
  # numbers on every backend, device count and sharding) | rbg | unsafe_rbg (cheaper bits on
  # GPU/TPU, reproducible only on the same backend; jdiff/training/prng.py).
  c.train.prng_impl = "threefry"
  # Restore a checkpoint whose checksum record is missing or unreadable, unverified.
  c.train.allow_unverified_checkpoints = False

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 100
  c.eval.num_recon_images = 16  # originals over reconstructions in recon/recon_<step>.png

  c.lock()
  return c
