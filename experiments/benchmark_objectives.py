"""DDPM-eps vs EDM vs flow matching on the digits, and DiT vs U-Net train throughput.

  python -m experiments.benchmark_objectives --workdir=/tmp/bench_objectives [--steps=600]

Part 1: the default digits U-Net (16x16) trained with each objective for the same number of
steps (same network, same batch, one forward/backward per step: the same wall-clock budget up to
noise; the measured training time is reported), then sampled at several NFE with each
objective's samplers. Quality: the digits sample-quality metric of `--mode=fid`:
the Frechet distance (FD) and Inception-Score-like IS of the cached digits classifier's
features / class probabilities (`jdiff.runs.feature_nets`), against the same cached reference
statistics of the 1,597 training digits (`jdiff.runs.fid.load_or_compute_reference`), with
precision / recall (k = 3), on --num_samples samples per row; the FD of each half of them
(two disjoint sets of noise draws) shows the metric's sampling noise at half that size. The
objectives' own eval losses are printed too, but they are not comparable across objectives
(different targets and weightings).

Part 2: train-step throughput of a DiT with patch 2 (64 tokens at 16x16) sized to the U-Net's
parameter count (within 2 %), against the U-Net, same batch: both steps are compiled first
(compile time reported apart), then --rounds interleaved rounds of --timed_steps steps each;
the step time is the median over all timed steps of a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jdiff import metrics
from jdiff.configs import default
from jdiff.runs import diffusion, feature_nets, fid
from jdiff.runs.setup import Setup
from jdiff.training.state import param_count
from jdiff.training.step import make_train_step

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/bench_objectives", "Where the three runs go.")
flags.DEFINE_integer("steps", 600, "Training steps per objective.")
flags.DEFINE_integer("num_samples", 1000, "Samples per (objective, sampler, NFE); even.")
flags.DEFINE_integer("seed", 0, "config.seed of the three runs (init, data order, noise).")
flags.DEFINE_bool("skip_train", False, "Reuse the runs in --workdir.")
flags.DEFINE_bool("small", True, "Part 1 on a small U-Net (ch 16, two levels) for a short budget.")
flags.DEFINE_integer("rounds", 3, "Part 2: interleaved timing rounds per model.")
flags.DEFINE_integer("timed_steps", 5, "Part 2: timed steps per model and round.")
flags.DEFINE_enum("only", "", ["", "quality", "throughput"], "Run one part only.")

# objective -> [(sampler, num_steps, NFE)]
PLAN = {
  "ddpm": [("ddim", 10, 10), ("ddim", 50, 50), ("dpmpp_2m", 10, 10)],
  "edm": [("heun", 5, 9), ("dpmpp_2m", 10, 10), ("heun", 18, 35)],
  "flow": [("flow_euler", 10, 10), ("dpmpp_2m", 10, 10), ("flow_heun", 18, 35)],
}  # fmt: skip


def config_for(objective: str, steps: int):
  c = default.get_config()
  c.objective = objective
  c.seed = FLAGS.seed
  c.train.num_steps = steps
  c.train.ckpt_every = 0
  c.train.log_every = 100
  c.sample.sampler = {"ddpm": "ddim", "edm": "heun", "flow": "flow_euler"}[objective]
  c.sample.batch_size = 250
  c.eval.pr_samples = FLAGS.num_samples  # keep every sample's features: precision / recall
  c.eval.bound_examples = 0  # the loss only (the bound is DDPM's, and slow)
  c.model.conv_impl = "xla"  # compiles in a fraction of Winograd's time on this loaded CPU
  if FLAGS.small:
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 16, (1, 2), (8,)
  return c


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
      net = feature_nets.load_feature_net(cfg, setup.pixel_shape)
      ref, ref_path = fid.load_or_compute_reference(cfg, setup, net)
      rows = []
      for sampler, n, nfe in PLAN[objective]:
        rng = jax.random.fold_in(setup.keys.stream("sample"), 7)
        t1 = time.perf_counter()
        col = fid.generate_features(
          setup, params, net, num, rng, sampler=sampler, num_steps=n, shift=None
        )
        r = fid.summarize(col, ref, cfg.eval.pr_k)
        # The two halves are disjoint noise draws: their FDs show the metric's sampling noise.
        feats = col.gather()[2]
        halves = [
          metrics.frechet_distance(*metrics.gaussian_stats(h), ref.mu, ref.sigma)
          for h in np.split(feats, 2)
        ]
        rows.append(
          dict(
            sampler=sampler, steps=n, nfe=nfe, fd=r["fd"], fd_halves=halves, is_=r["is"],
            is_std=r["is_std"], precision=r.get("precision"), recall=r.get("recall"),
            num_samples=r["num_samples"], sample_s=time.perf_counter() - t1,
          )
        )  # fmt: skip
        print(objective, json.dumps(rows[-1]), flush=True)
    results[objective] = dict(
      train_s=train_s, eval_loss=loss, rows=rows, feature_net=net.name, reference=ref_path,
      **net.info,
    )  # fmt: skip
  return results


def compiled_step(cfg, setup) -> dict:
  """The jitted train step of `cfg`, its state and batch, after one (timed) compiling call."""
  state = setup.init_state()
  step = jax.jit(
    make_train_step(setup.module, setup.optimizer, **diffusion.loss_kwargs(cfg)),
    donate_argnums=(0,),
  )
  batch = {"image": jnp.zeros((cfg.train.batch_size, *setup.image_shape))}
  t0 = time.perf_counter()
  state, m = step(state, batch, setup.schedule, setup.keys.train)
  jax.block_until_ready(m)
  return dict(
    step=step, state=state, batch=batch, setup=setup, params=param_count(state.params),
    compile_s=time.perf_counter() - t0, times=[],
  )  # fmt: skip


def time_steps(m: dict, n: int) -> None:
  for _ in range(n):
    t0 = time.perf_counter()
    m["state"], out = m["step"](m["state"], m["batch"], m["setup"].schedule, m["setup"].keys.train)
    jax.block_until_ready(out)
    m["times"].append(time.perf_counter() - t0)


def part2() -> dict:
  unet = default.get_config()
  unet.model.conv_impl = "xla"
  dit = default.get_config()
  dit.model.arch = "dit"
  # The U-Net's parameter count within 2 %: DiT-S/2's patch and layout with width 92, 7 blocks
  # and 4 heads of 23.
  dit.dit.hidden, dit.dit.depth, dit.dit.num_heads = 92, 7, 4
  models, stack = {}, contextlib.ExitStack()
  for name, cfg in (("unet", unet), ("dit", dit)):
    setup = stack.enter_context(Setup(cfg, f"/tmp/bench_objectives_throughput_{name}"))
    models[name] = compiled_step(cfg, setup)
    print(name, "params", models[name]["params"], "compile_s", models[name]["compile_s"])
  for _ in range(FLAGS.rounds):  # interleaved, so background load hits both alike
    for name, m in models.items():
      time_steps(m, FLAGS.timed_steps)
      print(name, "step_s", m["times"][-FLAGS.timed_steps :], flush=True)
  summary = {}
  for name, m in models.items():
    med = float(np.median(m["times"]))
    summary[name] = dict(
      params=m["params"], compile_s=m["compile_s"], step_s=med,
      img_per_s=unet.train.batch_size / med, times=m["times"],
    )  # fmt: skip
  summary["dit_over_unet_throughput"] = summary["unet"]["step_s"] / summary["dit"]["step_s"]
  summary["dit_over_unet_params"] = summary["dit"]["params"] / summary["unet"]["params"]
  summary["load_avg"] = os.getloadavg()
  stack.close()
  return summary


def main(argv):
  del argv
  os.makedirs(FLAGS.workdir, exist_ok=True)
  res = {"load_avg_start": os.getloadavg()}
  if FLAGS.only in ("", "throughput"):
    res["part2"] = part2()
    print(json.dumps(res["part2"], indent=1), flush=True)
  if FLAGS.only in ("", "quality"):
    res["part1"] = part1(FLAGS.workdir, FLAGS.steps, FLAGS.num_samples)
  res["load_avg_end"] = os.getloadavg()
  with open(
    os.path.join(FLAGS.workdir, f"results{FLAGS.only and '_' + FLAGS.only}.json"), "w"
  ) as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))


if __name__ == "__main__":
  app.run(main)
