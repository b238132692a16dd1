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
  c.model.update(ch=16, ch_mult=(1, 2), attn_resolutions=())
  c.train.update(num_steps=1500, batch_size=32, ckpt_every=500)
  c.sample.update(num_steps=20, grid_size=16, batch_size=16)
  return c
