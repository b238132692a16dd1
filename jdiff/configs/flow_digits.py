"""Flow matching (rectified flow) on the embedded digits with the default U-Net.

  python -m experiments.main --config=jdiff/configs/flow_digits.py --workdir=runs/flow_digits

x_t = (1 - t) x0 + t eps, velocity target eps - x0, logit-normal t ([SD3]); sampled with Euler
in t (flow_euler). Every sigma-grid sampler also works (e.g. --config.sample.sampler=dpmpp_2m).
"""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.objective = "flow"
  c.sample.sampler = "flow_euler"
  c.sample.num_steps = 20
  return c
