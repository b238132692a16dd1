"""The embedded default: scikit-learn's 8x8 digits at 16x16, trained on a CPU in minutes."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.eval.quality_samples = 500  # FD / IS of the digits classifier at the end of training
  return c
