"""The embedded default: scikit-learn's 8x8 digits at 16x16, trained on a CPU in minutes."""

from jdiff.configs import default


def get_config():
  return default.get_config()
