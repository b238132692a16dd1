"""Reflow: a second rectified flow trained on (noise, sample) pairs of flow_digits.py's model.

  python -m experiments.main --mode=reflow_pairs --config=jdiff/configs/flow_digits.py \
      --workdir=runs/flow_digits
  python -m experiments.main --config=jdiff/configs/reflow_digits.py \
      --workdir=runs/reflow_digits --config.flow.reflow_pairs=runs/flow_digits/reflow/pairs.npz

The pairs' velocity is straight, so few Euler steps suffice ([RF] Sec. 2.3): sample with 2.
"""

from jdiff.configs import flow_digits


def get_config():
  c = flow_digits.get_config()
  c.flow.t_sampler = "uniform"  # [RF]
  c.sample.num_steps = 2
  return c
