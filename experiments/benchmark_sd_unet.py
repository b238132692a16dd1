r"""Forward throughput of the SD 1.5-size U-Net (860M parameters) at 64x64 latents: jdiff
against diffusers' torch on the same CPU, in one run.

diffusers' `UNet2DConditionModel` with Stable Diffusion 1.5's config (random weights, no
download) is imported into jdiff (`jdiff.pretrained.build`, the same function within 1e-4,
tests/test_sd_import.py); both run the same batch of latents [B, 4, 64, 64], timesteps and
text context [B, 77, 768]. Reports each side's median seconds per forward over `--reps`
calls after one warm-up (jdiff: after compilation), the ratio, jdiff's import time and the
process's peak RSS.

Usage::

  .venv/bin/python -m experiments.benchmark_sd_unet --batch=1 --reps=3
"""

from __future__ import annotations

import argparse
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

SD15 = dict(
  sample_size=64,
  in_channels=4,
  out_channels=4,
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  cross_attention_dim=768,
  attention_head_dim=8,
)


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
  """The median wall time of `reps` calls of `fn` after `warmup` calls (jdiff: compilation)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--conv_impl", default="auto")
  ap.add_argument("--attention_impls", default="xla,chunked", help="jdiff sides, comma-separated")
  ap.add_argument("--ch", type=int, default=320, help="base width (SD 1.5: 320; 32: a smoke test)")
  args = ap.parse_args()
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from jdiff.pretrained import build  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  c = args.ch
  model = diffusers.UNet2DConditionModel(**{**SD15, "block_out_channels": (c, 2 * c, 4 * c, 4 * c)})
  model = model.eval()
  n_params = sum(p.numel() for p in model.parameters())
  config = {**dict(model.config), "_class_name": "UNet2DConditionModel"}
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  t0 = time.perf_counter()
  pt = build("diffusers", state, config=config, conv_impl=args.conv_impl)
  load_s = time.perf_counter() - t0
  del state
  rs = np.random.RandomState(0)
  x = rs.randn(args.batch, 4, 64, 64).astype(np.float32)
  ctx = rs.randn(args.batch, 77, 768).astype(np.float32)
  t = np.full((args.batch,), 500)
  xt, tt, ct = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)

  def torch_fwd():
    with torch.no_grad():
      return model(xt, tt, ct).sample

  xj, tj, cj = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)
  s_torch = median_seconds(torch_fwd, args.reps)
  ref = torch_fwd().numpy()
  results = {}
  for impl in args.attention_impls.split(","):
    module = pt.module.clone(attention_impl=impl)
    apply = jax.jit(lambda p, x, t, c, m=module: m.apply({"params": p}, x, t, c, train=False))
    jax_fwd = lambda a=apply: a(pt.params, xj, tj, cj).block_until_ready()  # noqa: E731
    t0 = time.perf_counter()
    out = np.asarray(jax_fwd()).transpose(0, 3, 1, 2)
    compile_s = time.perf_counter() - t0
    err = float(np.abs(out - ref).max() / np.abs(ref).max())
    results[impl] = (median_seconds(jax_fwd, args.reps), compile_s, err)
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"SD 1.5-layout U-Net: {n_params / 1e6:.0f}M parameters, batch {args.batch}, 64x64 latents")
  print(f"torch {torch.__version__} threads {torch.get_num_threads()}, jax {jax.__version__}")
  print(f"diffusers  {s_torch:.2f} s/forward  {args.batch / s_torch:.3f} images/s")
  for impl, (s_jax, compile_s, err) in results.items():
    print(
      f"jdiff attention_impl={impl}: {s_jax:.2f} s/forward  {args.batch / s_jax:.3f} images/s  "
      f"(first call {compile_s:.1f} s)  jdiff / diffusers: {s_torch / s_jax:.2f}x  "
      f"(max rel. diff {err:.1e})"
    )
  print(f"jdiff import {load_s:.1f} s; peak RSS {peak_gib:.1f} GiB (both models in one process)")


if __name__ == "__main__":
  main()
