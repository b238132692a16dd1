r"""Training throughput on 1-D signals: jdiff against diffusers' `UNet1DModel` loop, one run.

The same network on both sides: a Dance Diffusion `UNet1DModel` (random weights) and its
import into jdiff (`jdiff.pretrained.diffusers_unet1d`, the same function within 1e-4,
tests/test_audio_pretrained.py). One training step = forward, the MSE to the noise, backward
and an Adam update, on batch B of mono signals of length L (the notes' 2,048 samples at
8 kHz by default) noised at uniform t. Reports the median seconds per step over `--reps`
steps after two warm-up steps (jdiff: after compilation), samples/s and the ratio.

Usage::

  OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m experiments.benchmark_audio --batch=32 --reps=5
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmark_sd_unet import median_seconds

DANCE = dict(
  in_channels=1,
  out_channels=1,
  extra_in_channels=16,
  time_embedding_type="fourier",
  use_timestep_embedding=False,
  flip_sin_to_cos=True,
  down_block_types=("DownBlock1DNoSkip", "DownBlock1D", "AttnDownBlock1D"),
  up_block_types=("AttnUpBlock1D", "UpBlock1D", "UpBlock1DNoSkip"),
  mid_block_type="UNetMidBlock1D",
  block_out_channels=(32, 32, 64),
  time_embedding_dim=16,
)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--length", type=int, default=2048)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from jdiff.pretrained.diffusers_unet1d import load_unet1d  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  model = diffusers.UNet1DModel(sample_size=args.length, **DANCE)
  n_params = sum(p.numel() for p in model.parameters())
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d, safe_serialization=True)
    module, params = load_unet1d(d)
  rs = np.random.RandomState(0)
  b, n = args.batch, args.length
  x0 = (0.3 * rs.randn(b, 1, n)).astype(np.float32)
  noise = rs.randn(b, 1, n).astype(np.float32)
  t = rs.rand(b).astype(np.float32)
  a = np.cos(t * np.pi / 2)[:, None, None]
  xt = (a * x0 + np.sqrt(1 - a**2) * noise).astype(np.float32)

  opt_t = torch.optim.Adam(model.parameters(), lr=1e-4)
  xt_t, t_t, noise_t = (torch.from_numpy(v) for v in (xt, t, noise))
  model.train()

  def torch_step():
    opt_t.zero_grad(set_to_none=True)
    loss = torch.mean((model(xt_t, t_t).sample - noise_t) ** 2)
    loss.backward()
    opt_t.step()
    return float(loss)

  opt = optax.adam(1e-4)
  state = [params, opt.init(params)]

  @jax.jit
  def jax_step(p, s, x, t, eps):
    loss_fn = lambda p: jnp.mean((module.apply({"params": p}, x, t) - eps) ** 2)  # noqa: E731
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  xj, tj, ej = (jnp.asarray(v) for v in (xt.transpose(0, 2, 1), t, noise.transpose(0, 2, 1)))

  def jdiff_step():
    p, s, loss = jax_step(state[0], state[1], xj, tj, ej)
    state[0], state[1] = p, s
    return float(loss)

  t0 = time.perf_counter()
  jdiff_step()
  compile_s = time.perf_counter() - t0
  s_torch = median_seconds(torch_step, args.reps, warmup=2)
  s_jax = median_seconds(jdiff_step, args.reps, warmup=2)
  print(f"Dance UNet1D: {n_params / 1e6:.2f}M parameters, batch {b} x {n} samples, Adam")
  print(f"torch {torch.__version__} threads {torch.get_num_threads()}, jax {jax.__version__}")
  print(f"diffusers  {s_torch:.3f} s/step  {b / s_torch:.1f} samples/s")
  print(f"jdiff      {s_jax:.3f} s/step  {b / s_jax:.1f} samples/s  (first step {compile_s:.1f} s)")
  print(f"jdiff / diffusers throughput: {s_torch / s_jax:.2f}x")


if __name__ == "__main__":
  main()
