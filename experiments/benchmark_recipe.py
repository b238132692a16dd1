"""The main job's recipe: DDPM-eps vs flow matching vs EDM at its own budget, two seeds.

  python -m experiments.benchmark_recipe --out=/tmp/bench_recipe [--seeds=0,1] \
      [--reuse=ddpm:0=runs/digits]

Each objective's digits config (`digits.py`, `flow_digits.py`, `edm_digits.py`: the same
1.1M-parameter U-Net, 1,500 steps at batch 64, the same data order for a seed) is trained
through the README's command with `--config.seed=<seed>` (a finished workdir is reused; so is
a `--reuse` one, e.g. the main job's own run for DDPM-eps at seed 0). Each run is then scored
by `--mode=fid` (the digits classifier's FD / IS against the 1,597 training digits, float
samples, --num_samples of them) with each of its objective's samplers below, all at
NFE <= 20. Wall times include start-up and compilation, as a user sees them.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments.commands import fid, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "/tmp/bench_recipe", "Where the runs and logs go.")
flags.DEFINE_list("seeds", ["0", "1"], "Training seeds (config.seed).")
flags.DEFINE_list("objectives", ["ddpm", "flow", "edm"], "Objectives to compare.")
flags.DEFINE_list("reuse", [], "objective:seed=workdir of runs already trained.")
flags.DEFINE_integer("num_samples", 2000, "Samples per fid row.")
flags.DEFINE_list("samplers", [], "objective:sampler:steps:nfe rows instead of SAMPLERS' (e.g. "
                  "the first seed's best per objective for the second seed).")  # fmt: skip

CONFIGS = {
  "ddpm": "jdiff/configs/digits.py",
  "flow": "jdiff/configs/flow_digits.py",
  "edm": "jdiff/configs/edm_digits.py",
}
# (sampler, steps, NFE): each objective's candidates at NFE <= 20.
SAMPLERS = {
  "ddpm": [("ddim", 20, 20), ("dpmpp_2m_sde", 10, 10), ("dpmpp_2m_sde", 20, 20)],
  "flow": [("flow_euler", 20, 20), ("dpmpp_2m", 10, 10), ("dpmpp_2m", 20, 20)],
  "edm": [("heun", 10, 19), ("dpmpp_2m", 10, 10), ("dpmpp_2m", 20, 20)],
}  # fmt: skip


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  reuse = dict(r.split("=", 1) for r in FLAGS.reuse)
  times_path = os.path.join(FLAGS.out, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  samplers = SAMPLERS
  if FLAGS.samplers:
    samplers = {}
    for row in FLAGS.samplers:
      objective, sampler, steps, nfe = row.split(":")
      samplers.setdefault(objective, []).append((sampler, int(steps), int(nfe)))
  rows = []
  for seed in FLAGS.seeds:
    for objective in FLAGS.objectives:
      name = f"{objective}:{seed}"
      workdir = reuse.get(name, os.path.join(FLAGS.out, f"{objective}_seed{seed}"))
      if name not in reuse and name not in times:
        args = [f"--config={CONFIGS[objective]}", f"--workdir={workdir}"]
        args += [f"--config.seed={seed}", "--config.eval.quality_samples=0"]
        times[name], _ = run_main(args, os.path.join(FLAGS.out, f"{objective}_seed{seed}.log"))
        with open(times_path, "w") as f:
          json.dump(times, f)
      for sampler, steps, nfe in samplers.get(objective, []):
        log = os.path.join(FLAGS.out, f"{objective}_seed{seed}_{sampler}{steps}.log")
        seed_arg = [f"--config.seed={seed}"]  # the seed binds the workdir
        r = fid(CONFIGS[objective], workdir, sampler, steps, log, FLAGS.num_samples, seed_arg)
        rows.append(dict(objective=objective, seed=seed, sampler=sampler, nfe=nfe, **r))
        print(
          f"| {objective} | {seed} | {sampler} | {nfe} | {r['fd']:.2f} | {r['is_']:.2f} | "
          f"{r['precision']:.3f} | {r['recall']:.3f} | {times.get(name, float('nan')):.0f} |",
          flush=True,
        )
      with open(os.path.join(FLAGS.out, f"results_{','.join(FLAGS.seeds)}.json"), "w") as f:
        json.dump({"times": times, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
