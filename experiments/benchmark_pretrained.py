r"""Sampling throughput of an imported google/ddpm-cifar10-32 U-Net: jdiff vs diffusers.

Builds diffusers' `UNet2DModel` with google/ddpm-cifar10-32's config.json (random
weights: throughput does not depend on them), saves it with `save_pretrained(...,
safe_serialization=True)`, and measures in one process:

- the weight load time of `jdiff.pretrained.load_pretrained` (config, safetensors read
  with numpy, mapping, device_put) and of diffusers' `UNet2DModel.from_pretrained`;
- 50-step DDIM sampling in images/s: jdiff's jitted `make_sample_fn` (one lax.scan)
  against diffusers' `DDIMPipeline` on the same CPU threads, interleaved, median of
  `--repeats` timed runs after a warm-up; jdiff's compile time is reported apart.

Usage::

  .venv/bin/python -m experiments.benchmark_pretrained --batch=8 --repeats=3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
# The peer's idle OpenMP workers must not spin on the cores while jdiff runs (as in
# benchmark_unet.py); set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CIFAR10_CONFIG = dict(  # google/ddpm-cifar10-32/config.json
  act_fn="silu",
  attention_head_dim=None,
  block_out_channels=(128, 256, 256, 256),
  center_input_sample=False,
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
  in_channels=3,
  layers_per_block=2,
  mid_block_scale_factor=1,
  norm_eps=1e-6,
  norm_num_groups=32,
  out_channels=3,
  sample_size=32,
  time_embedding_type="positional",
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER = dict(  # google/ddpm-cifar10-32/scheduler_config.json
  beta_start=0.0001,
  beta_end=0.02,
  beta_schedule="linear",
  clip_sample=True,
  num_train_timesteps=1000,
)


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median taken)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  p.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "winograd"))
  args = p.parse_args(argv)

  import diffusers  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch

  from jdiff.pretrained import load_pretrained
  from jdiff.training.sampling import make_sample_fn

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(**CIFAR10_CONFIG).eval()
  with tempfile.TemporaryDirectory() as d:
    unet.save_pretrained(d, safe_serialization=True)
    diffusers.DDPMScheduler(**SCHEDULER).save_config(d)
    load_s, _ = _median_time(lambda: load_pretrained(d, conv_impl=args.conv_impl), args.repeats)
    t_load_s, _ = _median_time(lambda: diffusers.UNet2DModel.from_pretrained(d), args.repeats)
    model = load_pretrained(d, conv_impl=args.conv_impl)
  s = model.settings
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.params))
  print(f"ddpm-cifar10-32 architecture: {n_params / 1e6:.1f}M parameters, batch {args.batch}")
  print(f"load: jdiff {load_s:.2f} s, diffusers from_pretrained {t_load_s:.2f} s (median)")

  sample = jax.jit(
    make_sample_fn(
      model.module,
      s.schedule,
      sampler="ddim",
      num_steps=args.steps,
      spacing="trailing",
      clip_x0=s.clip_x0 or None,
      prediction=s.prediction,
      variance=s.variance,
    )
  )
  x_T = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = sample.lower(model.params, x_T, rng, None).compile()
  compile_s = time.perf_counter() - t0
  run_jdiff = lambda: compiled(model.params, x_T, rng, None).block_until_ready()  # noqa: E731

  sched = diffusers.DDIMScheduler(**SCHEDULER, timestep_spacing="trailing")
  pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
  pipe.set_progress_bar_config(disable=True)

  def run_diffusers():
    with torch.no_grad():
      pipe(batch_size=args.batch, num_inference_steps=args.steps, eta=0.0, output_type="np")

  run_jdiff()  # warm-up
  run_diffusers()
  jd, dd = [], []
  for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
    jd.append(_median_time(run_jdiff, 1)[0])
    dd.append(_median_time(run_diffusers, 1)[0])
  jm, dm = statistics.median(jd), statistics.median(dd)
  print(f"jdiff compile {compile_s:.1f} s (conv_impl={args.conv_impl})")
  print(
    f"DDIM {args.steps} steps: jdiff {args.batch / jm:.3f} img/s ({jm:.1f} s/batch, runs "
    f"{[round(t, 1) for t in jd]}), diffusers DDIMPipeline {args.batch / dm:.3f} img/s "
    f"({dm:.1f} s/batch, runs {[round(t, 1) for t in dd]}, torch threads {args.threads})"
  )
  print(f"ratio jdiff / diffusers: {dm / jm:.2f}x")


if __name__ == "__main__":
  main()
