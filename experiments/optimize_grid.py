r"""Fits a sigma grid to a trained model for few-step sampling and stores it beside the model.

Restores the workdir's EMA parameters (as ``benchmark_samplers --digits`` does), samples a
calibration batch of starting noises x_T, computes the reference solution from them (the
same sampler at ``--ref-steps`` steps on the log-SNR grid, through the config path's
`make_sample_fn` with x0 clipping as configured), and fits the ``--nfe``-call grid with
`jdiff.samplers.optimize.optimize_grid` (MSE to the reference; see that module for what the
objective is and is not). It then reports the MSE to the reference on a held-out batch for
the fitted grid and for every standard grid the sampler accepts, and writes
``<workdir>/grids/<sampler>_nfe<NFE>.json``. Sample with it via
``--config.sample.sampler=<sampler> --config.sample.num_steps=<N>
--config.sample.grid_file=<that path>``.

Usage::

  .venv/bin/python -m experiments.optimize_grid --workdir /work/runs/digits \
    --config jdiff/configs/digits.py --sampler dpmpp_2m --nfe 5 --n 64
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import jax
import jax.numpy as jnp

from jdiff import continuous
from jdiff.samplers import grid_files, optimize

# Deterministic samplers on sigma grids: a single reference solution exists for them.
SAMPLERS = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")


def steps_for(sampler: str, nfe: int) -> int:
  """Steps N of a grid ending with 0 whose model calls are `nfe` (heun: 2N - 1)."""
  n = (nfe + 1) // 2 if sampler == "heun" else nfe
  if optimize.nfe_of(sampler, n) != nfe:
    raise ValueError(f"{sampler} cannot take exactly NFE {nfe} (heun: odd NFE only)")
  return n


def fit(
  workdir: str,
  sampler: str,
  nfe: int,
  *,
  n: int = 64,
  n_test: int = 128,
  seed: int = 0,
  ref_steps: int = 200,
  sweeps: int = 4,
  candidates: int = 9,
  config=None,
) -> tuple[dict, str]:
  """Fits and evaluates the grid; returns (record fields, report text). Writes nothing."""
  from jdiff.configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from jdiff.runs.sample_options import sample_options  # pylint: disable=g-import-not-at-top
  from jdiff.runs.setup import Setup  # pylint: disable=g-import-not-at-top
  from jdiff.samplers import registry as sampling  # pylint: disable=g-import-not-at-top

  if sampler not in SAMPLERS:
    raise ValueError(f"--sampler must be one of {SAMPLERS} (deterministic), got {sampler!r}")
  num_steps = steps_for(sampler, nfe)
  config = config or digits_config.get_config()
  with Setup(config, workdir, kind="diffusion") as setup:
    params, step = setup.restore_params("ema_params")
    module, schedule, shape = setup.module, setup.schedule, setup.image_shape
  opts = sample_options(config.sample)
  common = dict(
    sampler=sampler,
    prediction=config.diffusion.prediction,
    clip_x0=opts["clip_x0"],
    dynamic_threshold=opts["dynamic_threshold"],
  )
  rng = jax.random.key(seed + 1)

  def run(x_T, **kw):
    return sampling.make_sample_fn(module, schedule, **common, **kw)(params, x_T, rng, None)

  reference = jax.jit(lambda x: run(x, num_steps=ref_steps, spacing="log_snr"))
  x_cal = jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float32)
  x_test = jax.random.normal(jax.random.key(seed + 1000), (n_test, *shape), jnp.float32)
  t0 = time.perf_counter()
  ref_cal, ref_test = reference(x_cal), reference(x_test)
  s_min, s_max = (float(s) for s in continuous.sigma_min_max(schedule))
  loss = optimize.mse_loss(lambda g, x: run(x, num_steps=num_steps, grid=g), x_cal, ref_cal)
  res = optimize.optimize_grid(
    loss,
    optimize.log_snr_init(s_min, s_max, num_steps),
    sigma_min=s_min,
    sweeps=sweeps,
    candidates=candidates,
  )
  fit_s = time.perf_counter() - t0

  def test_mse(**kw) -> float:
    x = jax.jit(lambda x: run(x, num_steps=num_steps, **kw))(x_test)
    return float(jnp.mean((x - ref_test) ** 2))

  spacings = sampling.SAMPLERS[sampler].spacings
  held_out = {f"{sp}": test_mse(spacing=sp) for sp in spacings}
  held_out["optimised"] = test_mse(grid=jnp.asarray(res.grid))
  lines = [
    f"{sampler}, NFE {nfe} ({num_steps} steps), workdir {workdir} (step {step}, EMA); "
    f"reference: {sampler} {ref_steps} steps on log_snr; calibration n = {n} (seed {seed}), "
    f"held-out n = {n_test}; {sweeps} sweeps x {candidates} candidates, {fit_s:.0f} s.",
    f"calibration MSE: log_snr {res.loss_init:.5f} -> optimised {res.loss:.5f} "
    f"(per sweep {', '.join(f'{h:.5f}' for h in res.history)})",
    "optimised sigmas: " + ", ".join(f"{s:.4g}" for s in res.grid),
    "held-out MSE to the reference: " + ", ".join(f"{k} {v:.5f}" for k, v in held_out.items()),
  ]
  record = dict(
    grid=res.grid,
    sampler=sampler,
    loss_before=res.loss_init,
    loss_after=res.loss,
    checkpoint_step=int(step),
    reference=f"{sampler} {ref_steps} steps log_snr",
    calibration_batch=n,
    seed=seed,
    sweeps=sweeps,
    candidates=candidates,
    held_out_mse={k: float(v) for k, v in held_out.items()},
    clip_x0=opts["clip_x0"],
  )
  return record, "\n".join(lines)


def load_config(path: str):
  """`get_config()` of a config file, as `--config=PATH` of experiments.main."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path!r}: no such config file")
  spec = importlib.util.spec_from_file_location("jdiff_grid_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument(
    "--config",
    default="jdiff/configs/digits.py",
    help="the config file the workdir was trained with",
  )
  p.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLERS)
  p.add_argument("--nfe", type=int, default=5)
  p.add_argument("--n", type=int, default=64, help="calibration batch")
  p.add_argument("--n-test", type=int, default=128, help="held-out batch")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ref-steps", type=int, default=200)
  p.add_argument("--sweeps", type=int, default=4)
  p.add_argument("--candidates", type=int, default=9)
  p.add_argument("--out", default="", help="default: <workdir>/grids/<sampler>_nfe<NFE>.json")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  path = args.out or grid_files.grid_path(
    args.workdir, args.sampler, steps_for(args.sampler, args.nfe)
  )
  if os.path.exists(path) and not args.overwrite:  # before the fit, not after
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
  record, report = fit(
    args.workdir,
    args.sampler,
    args.nfe,
    n=args.n,
    n_test=args.n_test,
    seed=args.seed,
    ref_steps=args.ref_steps,
    sweeps=args.sweeps,
    candidates=args.candidates,
    config=load_config(args.config),
  )
  print(report)
  written = grid_files.save_grid(path, record.pop("grid"), overwrite=args.overwrite, **record)
  grid_files.load_grid(written, sampler=args.sampler)  # what sample.grid_file will read
  print(f"wrote {written}")


if __name__ == "__main__":
  main()
