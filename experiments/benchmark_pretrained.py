r"""Sampling throughput of an imported google/ddpm-cifar10-32 U-Net: jdiff vs diffusers.

Builds diffusers' `UNet2DModel` with google/ddpm-cifar10-32's config.json (random
weights: throughput does not depend on them), saves it with `save_pretrained(...,
safe_serialization=True)`, and measures in one process:

- the weight load time of `jdiff.pretrained.load_pretrained` (config, safetensors read
  with numpy, mapping, device_put) and of diffusers' `UNet2DModel.from_pretrained`;
- 50-step DDIM sampling in images/s, for each batch size of `--batches`: jdiff's
  jitted `make_sample_fn` (one lax.scan) against diffusers' `DDIMPipeline` on the same
  CPU threads, interleaved run by run, median of `--repeats` timed runs; jdiff's compile
  time is reported apart, and so is the 1-minute load average around each batch (the
  machine is shared: the ratio is only meaningful at the load it was measured at).
  Warm-ups are cheap: one 2-step call of the pipeline (torch's first-call setup) and
  none for jdiff's compiled executable beyond the median (a full 50-step warm-up would
  double the run time of the large batches).

With `--forward_only` it times one U-Net forward pass instead (no sampler), which is
where the Winograd variants of `--variants` are compared: each is
`TILE4_MIN_SIDE/CHUNK_MIB`, i.e. Winograd F(4x4, 3x3) for feature maps at least that
many pixels high (F(2x2, 3x3) below it; 99 = F(2x2) everywhere, the default) and the
inference chunk budget of `jdiff.ops.winograd` in MiB (256 = the default; 12 = the train
step's, which inference also used before), or `xla`.

Usage::

  .venv/bin/python -m experiments.benchmark_pretrained --batches=8,16,32 --repeats=3
  .venv/bin/python -m experiments.benchmark_pretrained --forward_only --batches=8 \
    --variants=99/256,99/12,4/256,32/256,xla --repeats=9
"""

from __future__ import annotations

import argparse
import contextlib
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


def _load() -> float:
  return os.getloadavg()[0]


@contextlib.contextmanager
def _winograd_variant(variant: str):
  """While tracing: Winograd F(4x4) on maps >= TILE4_MIN_SIDE high and a chunk budget.

  An experiment hook only (the library's defaults are F(2x2) and 256 MiB): it swaps
  `jdiff.ops.winograd`'s module attributes for the duration of one trace.
  """
  from jdiff.ops import winograd  # pylint: disable=g-import-not-at-top

  min_side, mib = (int(float(v)) for v in variant.split("/"))
  conv3x3, budget = winograd.winograd_conv3x3, winograd._INFER_CHUNK_BYTES  # noqa: SLF001

  def variant_conv3x3(x, w, tile=2):
    del tile
    return conv3x3(x, w, tile=4 if x.shape[1] >= min_side else 2)

  winograd.winograd_conv3x3, winograd._INFER_CHUNK_BYTES = variant_conv3x3, mib * 2**20  # noqa: SLF001
  try:
    yield
  finally:
    winograd.winograd_conv3x3, winograd._INFER_CHUNK_BYTES = conv3x3, budget  # noqa: SLF001


def _interleaved(fns: dict, repeats: int) -> dict:
  """Runs each of fns once per repeat, in turn; returns the lists of times."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      times[k].append(_median_time(f, 1)[0])
  return times


def _forward_only(args, model, unet) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  for b in args.batches:
    x = jax.random.normal(jax.random.key(0), (b, 32, 32, 3))
    t = jnp.full((b,), 500)
    fns, load0 = {}, _load()
    for v in args.variants:
      module = model.module.clone(conv_impl="xla") if v == "xla" else model.module
      f = jax.jit(lambda p, x, t, m=module: m.apply({"params": p}, x, t, train=False))
      t0 = time.perf_counter()
      with contextlib.nullcontext() if v == "xla" else _winograd_variant(v):
        compiled = f.lower(model.params, x, t).compile()
      print(f"batch {b} {v}: compile {time.perf_counter() - t0:.1f} s", flush=True)
      fns[v] = lambda c=compiled, x=x, t=t: c(model.params, x, t).block_until_ready()
    xt, tt = torch.randn(b, 3, 32, 32), torch.full((b,), 500)

    def peer(xt=xt, tt=tt):
      with torch.no_grad():
        unet(xt, tt)

    fns["diffusers"] = peer
    for f in fns.values():  # warm-up
      f()
    times = _interleaved(fns, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
      f"forward, batch {b}, load {load0:.2f}-{_load():.2f}: "
      + ", ".join(f"{k} {b / m:.2f} img/s" for k, m in med.items())
      + " | ratio: "
      + ", ".join(f"{k} {med['diffusers'] / med[k]:.2f}x" for k in args.variants),
      flush=True,
    )


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="8", help="comma-separated batch sizes")
  p.add_argument("--steps", type=int, default=50, help="DDIM steps")
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median taken)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
  p.add_argument("--conv_impl", default="auto", choices=("auto", "xla", "winograd"))
  p.add_argument("--forward_only", action="store_true", help="time one forward pass")
  p.add_argument("--variants", default="99/256", help="--forward_only: see the docstring")
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(",")]
  args.variants = args.variants.split(",")

  import diffusers  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import torch

  from jdiff.pretrained import load_pretrained
  from jdiff.samplers.registry import make_sample_fn

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
  print(
    f"ddpm-cifar10-32 architecture: {n_params / 1e6:.1f}M parameters, torch {args.threads} threads"
  )
  print(f"load: jdiff {load_s:.2f} s, diffusers from_pretrained {t_load_s:.2f} s (median)")
  if args.forward_only:
    _forward_only(args, model, unet)
    return

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
  sched = diffusers.DDIMScheduler(**SCHEDULER, timestep_spacing="trailing")
  pipe = diffusers.DDIMPipeline(unet=unet, scheduler=sched)
  pipe.set_progress_bar_config(disable=True)
  rows = []
  for b in args.batches:
    x_T = jax.random.normal(jax.random.key(0), (b, 32, 32, 3))
    rng = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = sample.lower(model.params, x_T, rng, None).compile()
    compile_s = time.perf_counter() - t0

    def run_jdiff(c=compiled, x_T=x_T, rng=rng):
      c(model.params, x_T, rng, None).block_until_ready()

    def run_diffusers(b=b, steps=args.steps):
      with torch.no_grad():
        pipe(batch_size=b, num_inference_steps=steps, eta=0.0, output_type="np")

    run_diffusers(steps=2)  # warm-up
    load0 = _load()
    times = _interleaved({"jdiff": run_jdiff, "diffusers": run_diffusers}, args.repeats)
    jd, dd = times["jdiff"], times["diffusers"]
    jm, dm = statistics.median(jd), statistics.median(dd)
    pair = statistics.median(d / j for j, d in zip(jd, dd))
    rows.append((b, b / jm, b / dm, dm / jm, pair, load0, _load(), compile_s))
    print(
      f"batch {b}: jdiff compile {compile_s:.1f} s; DDIM {args.steps} steps: jdiff "
      f"{b / jm:.3f} img/s (runs {[round(t, 1) for t in jd]} s), diffusers {b / dm:.3f} img/s "
      f"(runs {[round(t, 1) for t in dd]} s); ratio of medians {dm / jm:.2f}x, median of "
      f"pairs {pair:.2f}x; load {load0:.2f}-{_load():.2f}",
      flush=True,
    )
  print(
    "| batch | jdiff img/s | diffusers img/s | ratio (medians) | ratio (pairs) | load | compile s |"
  )
  print("|---|---|---|---|---|---|---|")
  for b, j, d, r, pr, l0, l1, c in rows:
    print(f"| {b} | {j:.3f} | {d:.3f} | {r:.2f}x | {pr:.2f}x | {l0:.1f}-{l1:.1f} | {c:.1f} |")


if __name__ == "__main__":
  main()
