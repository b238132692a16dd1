"""A tiny super-resolution variant (8x8 -> 16x16) for tests and smoke runs."""

from jdiff.configs import tiny


def get_config():
  c = tiny.get_config()
  c.superres.factor = 2
  c.model.attn_resolutions = ()
  c.sample.grid_size = 4
  return c
