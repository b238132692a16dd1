"""The base of the digits cascade: scikit-learn's digits at their native 8x8.

jdiff/configs/digits_sr.py super-resolves its samples to 16x16.
"""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.image_size = 8
  c.model.attn_resolutions = (2,)
  c.train.num_steps = 800
  return c
