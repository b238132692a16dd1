"""The embedded default: scikit-learn's 8x8 digits at 16x16, trained on a CPU in minutes.

DDPM-eps (the default U-Net, 1,500 steps) sampled with DPM-Solver++(2M) SDE in 10 steps: with
flow matching at 20 steps, the best of DDPM-eps, flow and EDM at this budget, each with its best
sampler at NFE <= 20, within the spread of two seeds (BENCHMARKS.md, "The main job's recipe").
"""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.sample.sampler = "dpmpp_2m_sde"
  c.sample.num_steps = 10
  c.eval.quality_samples = 500  # FD / IS of the digits classifier at the end of training
  return c
