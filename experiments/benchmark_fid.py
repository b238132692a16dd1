r"""Sample-quality evaluation benchmarks.

1. ``--inception``: FID-Inception feature throughput (images/s, resize to 299 included) of
   jdiff's Flax port (XLA convolutions and Winograd) against pytorch-fid's torch
   InceptionV3 on this CPU, in the same process, interleaved round by round; median of
   ``--runs`` timed calls after a warm-up call; jdiff's compile time reported apart. The
   weights are random (pytorch-fid's download is patched to return the network's own
   state dict, as in tests/test_inception.py): speed does not depend on their values.
2. ``--digits WORKDIR``: the digits FD / IS (digits classifier features, jdiff/runs/
   feature_nets.py) of the model in WORKDIR (the README's main job,
   jdiff/configs/digits.py) for each ``--samplers`` entry (name:steps), through
   ``--mode=fid``'s code path, with ``--n`` samples; and the held-out real digits' scores.

Usage::

  .venv/bin/python -m experiments.benchmark_fid --inception --batch 16 --runs 5
  .venv/bin/python -m experiments.benchmark_fid --digits runs/digits --n 500 \
      --samplers ddim:50,dpmpp_2m_sde:10,dpmpp_2m_sde:20
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--inception", action="store_true")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=32, help="input side (resized to 299)")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  p.add_argument("--impls", default="xla,winograd")
  p.add_argument("--digits", default="", help="workdir of a trained digits model")
  p.add_argument("--n", type=int, default=500)
  p.add_argument("--samplers", default="ddim:50,dpmpp_2m_sde:10,dpmpp_2m_sde:20")
  p.add_argument("--data_dir", default="")
  return p.parse_args(argv)


def random_torch_fid():
  """pytorch-fid's InceptionV3 (pool3) with random weights, and its state dict (numpy)."""
  import pytorch_fid.inception as pfi  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  built = {}
  make = pfi._inception_v3

  def capture(*a, **k):
    built["net"] = make(*a, **k)
    return built["net"]

  def own(url, progress=True):
    built["sd"] = built["net"].state_dict()
    return built["sd"]

  with (
    mock.patch.object(pfi, "_inception_v3", capture),
    mock.patch.object(pfi, "load_state_dict_from_url", own),
  ):
    model = pfi.InceptionV3([3]).eval()
  return model, {k: v.numpy() for k, v in built["sd"].items()}


def bench_inception(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from jdiff.models.inception import InceptionV3  # pylint: disable=g-import-not-at-top
  from jdiff.models.inception_convert import convert_state_dict  # pylint: disable=g-import-not-at-top

  if args.threads:
    torch.set_num_threads(args.threads)
  model, sd = random_torch_fid()
  params = jax.device_put(convert_state_dict(sd))
  x = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.size, args.size, 3))
  x = x.astype(np.float32)
  xt = torch.from_numpy((x.transpose(0, 3, 1, 2) + 1) / 2).contiguous()
  fns, times = {}, {}

  def run_torch():
    with torch.no_grad():
      return model(xt)[0]

  for impl in args.impls.split(","):
    net = InceptionV3(conv_impl=impl)
    t0 = time.perf_counter()
    fns[impl] = (
      jax.jit(lambda p, x, net=net: net.apply({"params": p}, x)).lower(params, x).compile()
    )
    print(f"jdiff[{impl}] compile {time.perf_counter() - t0:.1f} s", flush=True)
  run_torch()  # warm-up
  for f in fns.values():
    jax.block_until_ready(f(params, x))
  for _ in range(args.runs):  # interleaved rounds: load changes hit every contender alike
    t0 = time.perf_counter()
    run_torch()
    times.setdefault("torch", []).append(time.perf_counter() - t0)
    for impl, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, x))
      times.setdefault(impl, []).append(time.perf_counter() - t0)
  rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
  print(
    f"\nFID Inception features, batch {args.batch}, input {args.size}x{args.size} -> 299, "
    f"median of {args.runs} (torch threads {torch.get_num_threads()}, jax {jax.__version__}, "
    f"torch {torch.__version__})"
  )
  print("| implementation | img/s | ratio to torch |\n|---|---|---|")
  print(f"| pytorch-fid (torch) | {rate['torch']:.2f} | 1.00 |")
  for impl in fns:
    print(f"| jdiff ({impl}) | {rate[impl]:.2f} | {rate[impl] / rate['torch']:.2f} |")
  print("raw seconds per call:", {k: [round(t, 3) for t in v] for k, v in times.items()})


def bench_digits(args) -> None:
  from jdiff.configs import digits  # pylint: disable=g-import-not-at-top
  from jdiff.runs import fid  # pylint: disable=g-import-not-at-top

  rows = []
  for entry in args.samplers.split(","):
    sampler, steps = entry.split(":")
    c = digits.get_config()
    c.data.data_dir = args.data_dir
    c.sample.sampler, c.sample.num_steps = sampler, int(steps)
    c.eval.num_samples = args.n
    t0 = time.perf_counter()
    r = fid.fid(c, args.digits)
    rows.append((sampler, int(steps), r, time.perf_counter() - t0))
  print(f"\ndigits FD / IS, {args.n} samples, model {args.digits}")
  print(
    "| sampler | steps | FD | IS | precision | recall | KID | wall s |\n"
    "|---|---|---|---|---|---|---|---|"
  )
  for sampler, steps, r, sec in rows:
    print(
      f"| {sampler} | {steps} | {r['fd']:.3f} | {r['is']:.3f} ± {r['is_std']:.3f} | "
      f"{r['precision']:.3f} | {r['recall']:.3f} | {r['kid']:.3f} | {sec:.0f} |"
    )
  r = rows[0][2]
  print(
    f"| real held-out digits (200) | - | {r['heldout_fd']:.3f} | {r['heldout_is']:.3f} ± "
    f"{r['heldout_is_std']:.3f} | {r['heldout_precision']:.3f} | {r['heldout_recall']:.3f} | "
    f"{r['heldout_kid']:.3f} | - |"
  )
  print(f"classifier held-out accuracy {r['classifier_accuracy']:.4f}")


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.inception:
    bench_inception(args)
  if args.digits:
    bench_digits(args)


if __name__ == "__main__":
  main()
