"""DDPM-eps vs EDM vs flow matching on the digits, and DiT vs U-Net train throughput.

  python -m experiments.benchmark_objectives --workdir=/tmp/bench_objectives [--steps=600]

Part 1: the default digits U-Net (16x16) trained with each objective for the same number of
steps (same network, same batch, one forward/backward per step: the same wall-clock budget up to
noise; the measured training time is reported), then sampled at several NFE with each
objective's samplers. Quality proxy: the Frechet distance between 1000 samples and the training
images in raw pixel space (256-D; no digits classifier is available on this branch). The
objectives' own eval losses are printed too, but they are not comparable
across objectives (different targets and weightings).

Part 2: train-step throughput of a DiT with patch 2 (64 tokens at 16x16) sized to the U-Net's
parameter count, against the U-Net, same batch; median of timed steps, compile time apart.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from scipy import linalg

from jdiff.configs import default
from jdiff.runs import diffusion
from jdiff.runs.setup import Setup
from jdiff.training.state import param_count
from jdiff.training.step import make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/bench_objectives", "Where the three runs go.")
flags.DEFINE_integer("steps", 600, "Training steps per objective.")
flags.DEFINE_integer("num_samples", 1000, "Samples per (objective, sampler, NFE).")
flags.DEFINE_bool("skip_train", False, "Reuse the runs in --workdir.")
flags.DEFINE_bool("small", True, "Part 1 on a small U-Net (ch 16, two levels) for a short budget.")
flags.DEFINE_integer("rounds", 1, "Part 2: alternating timing rounds per model.")

# objective -> [(sampler, num_steps, NFE)]
PLAN = {
  "ddpm": [("ddim", 10, 10), ("ddim", 50, 50), ("dpmpp_2m", 10, 10)],
  "edm": [("heun", 5, 9), ("dpmpp_2m", 10, 10), ("heun", 18, 35)],
  "flow": [("flow_euler", 10, 10), ("dpmpp_2m", 10, 10), ("flow_heun", 18, 35)],
}  # fmt: skip


def config_for(objective: str, steps: int):
  c = default.get_config()
  c.objective = objective
  c.train.num_steps = steps
  c.train.ckpt_every = 0
  c.train.log_every = 100
  c.sample.sampler = {"ddpm": "ddim", "edm": "heun", "flow": "flow_euler"}[objective]
  c.sample.batch_size = 500
  c.eval.bound_examples = 0  # the loss only (the bound is DDPM's, and slow)
  c.model.conv_impl = "xla"  # compiles in a fraction of Winograd's time on this loaded CPU
  if FLAGS.small:
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 16, (1, 2), (8,)
  return c


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def train_images(setup) -> np.ndarray:
  from jdiff.data import pipeline  # pylint: disable=g-import-not-at-top

  it = pipeline.make_eval_iterator(
    setup.config.data.name, global_batch_size=500, split="train",
    data_dir=setup.data_dir, image_size=setup.image_size,
  )  # fmt: skip
  out = [b["image"][b["mask"] > 0] for b in it]
  return np.concatenate(out)


def part1(workdir: str, steps: int, num: int) -> dict:
  results = {}
  for objective in PLAN:
    wd = os.path.join(workdir, objective)
    cfg = config_for(objective, steps)
    t0 = time.perf_counter()
    if not FLAGS.skip_train:
      diffusion.train_and_evaluate(cfg, wd)
    train_s = time.perf_counter() - t0
    loss = diffusion.evaluate(cfg, wd)["eval/loss"]
    with Setup(cfg, wd) as setup:
      params, _ = setup.restore_params("ema_params")
      ref_images = train_images(setup)
      rng = jax.random.fold_in(setup.keys.stream("sample"), 7)
      shift = {"shift": None}
      rows = []
      for sampler, n, nfe in PLAN[objective]:
        t1 = time.perf_counter()
        x = diffusion.generate(setup, params, num, rng, sampler=sampler, num_steps=n, **shift)
        rows.append(
          dict(
            sampler=sampler, steps=n, nfe=nfe, fd_pixels=frechet(x, ref_images),
            sample_s=time.perf_counter() - t1,
          )
        )  # fmt: skip
        print(objective, rows[-1], flush=True)
    results[objective] = dict(
      train_s=train_s, eval_loss=loss, rows=rows,
    )  # fmt: skip
  return results


def step_times(cfg, n_timed: int = 5) -> dict:
  with Setup(cfg, "/tmp/bench_objectives_throughput_unused") as setup:
    state = setup.init_state()
    step = jax.jit(
      make_train_step(setup.module, setup.optimizer, **diffusion.loss_kwargs(cfg)),
      donate_argnums=(0,),
    )
    batch = {"image": jnp.zeros((cfg.train.batch_size, *setup.image_shape))}
    t0 = time.perf_counter()
    state, m = step(state, batch, setup.schedule, setup.keys.train)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(n_timed):
      t0 = time.perf_counter()
      state, m = step(state, batch, setup.schedule, setup.keys.train)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    return dict(
      params=param_count(state.params), compile_s=compile_s, step_s=float(np.median(times)),
      img_per_s=cfg.train.batch_size / float(np.median(times)),
    )  # fmt: skip


def part2() -> dict:
  unet = default.get_config()
  unet.model.conv_impl = "xla"
  dit = default.get_config()
  dit.model.arch = "dit"
  # ~ the U-Net's parameter count: DiT-S/2's shape with width 96 and 8 blocks (4 heads of 24).
  dit.dit.hidden, dit.dit.depth, dit.dit.num_heads = 96, 8, 4
  out = {}
  for _ in range(FLAGS.rounds):  # alternate, so background load hits both alike
    for name, cfg in (("unet", unet), ("dit", dit)):
      r = step_times(cfg)
      out.setdefault(name, []).append(r)
      print(name, r, flush=True)
  summary = {
    k: dict(v[0], step_s=float(np.median([r["step_s"] for r in v]))) for k, v in out.items()
  }
  summary["dit_over_unet_throughput"] = summary["unet"]["step_s"] / summary["dit"]["step_s"]
  return dict(summary=summary, runs=out)


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  res = {"part2": part2()}
  print(json.dumps(res["part2"]["summary"], indent=1), flush=True)
  res["part1"] = part1(FLAGS.workdir, FLAGS.steps, FLAGS.num_samples)
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  app.run(main)
