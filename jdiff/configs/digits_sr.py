"""Super-resolution digits, 8x8 -> 16x16 (SR3 with noise-conditioning augmentation).

The U-Net sees x_t concatenated with the 8x8 digit (2x average-pooled), bilinearly upsampled
to 16x16 and noise-augmented, plus the augmentation level as a channel
(jdiff/conditioning.py). It chains after an 8x8 base model (jdiff/configs/digits8.py):

  python -m experiments.main --config=jdiff/configs/digits8.py --workdir=runs/digits8
  python -m experiments.main --config=jdiff/configs/digits_sr.py --workdir=runs/digits_sr
  python -m experiments.main --config=jdiff/configs/digits_sr.py --workdir=runs/digits_sr \
    --mode=edit --config.edit.task=superres \
    --config.edit.base_config=jdiff/configs/digits8.py --config.edit.base_workdir=runs/digits8
"""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.superres.factor = 2
  c.model.ch = 16
  c.model.ch_mult = (1, 2)
  c.model.attn_resolutions = ()
  c.train.num_steps = 1500
  c.train.batch_size = 32
  c.train.ckpt_every = 500
  c.sample.num_steps = 20
  c.sample.grid_size = 16
  c.sample.batch_size = 16
  return c
