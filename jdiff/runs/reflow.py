"""Reflow, rectified flow's second iteration ([RF] Sec. 2.3): pairs from a trained flow model.

  python -m experiments.main --mode=reflow_pairs --config=jdiff/configs/flow_digits.py \
      --workdir=runs/flow_digits                      # writes runs/flow_digits/reflow/pairs.npz
  python -m experiments.main --config=jdiff/configs/reflow_digits.py \
      --workdir=runs/reflow_digits --config.flow.reflow_pairs=runs/flow_digits/reflow/pairs.npz

`write_pairs` draws `config.flow.reflow_num_pairs` noises x1 (stream 'reflow' of the run's keys),
solves the teacher's ODE with `flow_heun` (`config.flow.reflow_steps` steps, in the model's own
space: latents stay latents) and stores [x0 | x1] on the channel axis with the labels. Training
with `flow.reflow_pairs` set then regresses the straight velocity x1 - x0 of those couplings.

References:
  [RF] Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with
    Rectified Flow, ICLR 2023, Alg. 1.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdiff import flow
from jdiff.runs.generate import sample_fn
from jdiff.runs.setup import Setup, log_process_info
from jdiff.training.progress import Progress
from jdiff.training.rng import stream
from jdiff.training.writers import save_npz


def write_pairs(config, workdir: str) -> str:
  """Writes `<workdir>/reflow/pairs.npz` ({'pairs': [N, H, W, 2C], 'labels': [N]}); its path."""
  log_process_info()
  if config.objective != "flow":
    raise ValueError(
      f"--mode=reflow_pairs needs a flow model (config.objective), got {config.objective!r}"
    )
  with Setup(config, workdir, kind="diffusion", reads_data=False) as setup:
    params, step = setup.restore_params("ema_params" if config.sample.use_ema else "params")
    fn = jax.jit(sample_fn(setup, sampler="flow_heun", num_steps=config.flow.reflow_steps))
    num, batch = config.flow.reflow_num_pairs, config.sample.batch_size
    base = stream(setup.keys.stream("reflow"), "x_T")
    pairs, labels = [], []
    progress = Progress(num, "reflow pairs")
    for k in range(math.ceil(num / batch)):
      key = jax.random.fold_in(base, k)
      x1 = jax.random.normal(key, (batch, *setup.image_shape), jnp.float32)
      y = jnp.arange(k * batch, (k + 1) * batch, dtype=jnp.int32) % (setup.num_classes or 1)
      pairs.append(np.asarray(flow.reflow_pairs(lambda x, r, y=y: fn(params, x, r, y), x1, key)))
      labels.append(np.asarray(y))
      progress.update(min(batch, num - k * batch))
    progress.close()
  out = os.path.join(setup.workdir, "reflow", "pairs.npz")
  if jax.process_index() == 0:
    extra = {"labels": np.concatenate(labels)[:num]} if setup.num_classes else {}
    out = save_npz(out, pairs=np.concatenate(pairs)[:num], step=np.int64(step), **extra)
    logging.info("wrote %d reflow pairs of the step-%d model to %s", num, step, out)
  return out
