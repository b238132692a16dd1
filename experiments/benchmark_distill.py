"""Few-step students of the README model: distillation wall time and FD / IS at 1, 2, 4, 8 steps.

  python -m experiments.benchmark_distill --teacher=runs/digits --out=/tmp/bench_distill \
      [--methods=progressive,consistency,consistency_training] [--num_samples=2000]

Runs the README's commands as subprocesses (`experiments.main`, one process per command, so
every wall time includes that command's start-up and compilation, as a user sees it):
  1. the teacher's `--mode=fid` with DDIM-50 and with the best 10-step sampler
     (`dpmpp_2m_sde`, BENCHMARKS "Samplers on the trained digits model");
  2. per method, `--mode=distill` from the teacher (`jdiff/configs/distill_digits.py`, its
     defaults plus --set overrides), timed;
  3. per method and step count, `--mode=fid` of the student: progressive students sample with
     DDIM on their own grid (the round `steps_<N>`), consistency students with [CM] Alg. 1 in
     N steps.
The FD / IS are the digits classifier's (`--mode=fid`, float samples) against the 1,597 training
digits; the real held-out digits' own FD is printed by each fid run as the floor. A finished
distillation run is reused (its wall time is then read from --out/times.json).
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from experiments.commands import fid, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", "runs/digits", "The README model's workdir (the teacher).")
flags.DEFINE_string("out", "/tmp/bench_distill", "Where the students' workdirs and logs go.")
flags.DEFINE_list("methods", ["progressive", "consistency", "consistency_training"], "Methods.")
flags.DEFINE_list("steps", ["1", "2", "4", "8"], "Student step counts to score.")
flags.DEFINE_integer("num_samples", 2000, "Samples per fid row.")
flags.DEFINE_multi_string("set", [], "Extra --config.<key>=<value> for the distill runs.")
flags.DEFINE_bool("skip_teacher", False, "Do not score the teacher.")

CONFIG = "jdiff/configs/distill_digits.py"


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  times_path = os.path.join(FLAGS.out, "times.json")
  times = json.load(open(times_path)) if os.path.exists(times_path) else {}
  rows = []

  def report(name, steps, r):
    rows.append((name, steps, r))
    print(
      f"| {name} | {steps} | {r['fd']:.2f} | {r['is_']:.2f} | {r['precision']:.3f} | "
      f"{r['recall']:.3f} | {r['wall'] or float('nan'):.0f} |",
      flush=True,
    )

  if not FLAGS.skip_teacher:
    for sampler, n in (("ddim", 50), ("dpmpp_2m_sde", 10)):
      log = os.path.join(FLAGS.out, f"teacher_{sampler}{n}.log")
      report(
        f"teacher {sampler}",
        n,
        fid("jdiff/configs/digits.py", FLAGS.teacher, sampler, n, log, FLAGS.num_samples),
      )
  teacher = os.path.abspath(FLAGS.teacher)
  for method in FLAGS.methods:
    workdir = os.path.join(FLAGS.out, method)
    if method not in times:
      args = [f"--config={CONFIG}", f"--workdir={workdir}", "--mode=distill"]
      args += [f"--config.distill.method={method}", f"--config.distill.teacher_workdir={teacher}"]
      args += [f"--config.{s}" for s in FLAGS.set]
      times[method], _ = run_main(args, os.path.join(FLAGS.out, f"{method}_distill.log"))
      with open(times_path, "w") as f:
        json.dump(times, f)
    print(f"{method}: distillation {times[method]:.0f} s wall", flush=True)
    for n in sorted(int(s) for s in FLAGS.steps):
      log = os.path.join(FLAGS.out, f"{method}_{n}.log")
      if method == "progressive":
        student = os.path.join(workdir, f"steps_{n:04d}")
        if not os.path.isdir(student):
          continue
        report(method, n, fid(CONFIG, student, "auto", n, log, FLAGS.num_samples))
      else:
        report(method, n, fid(CONFIG, workdir, "consistency", n, log, FLAGS.num_samples))
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump({"times": times, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
