"""Class-conditional digits with label dropout, sampled with classifier-free guidance."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.conditional = True
  c.train.label_dropout = 0.1
  c.sample.guidance_scale = 2.0
  return c
