r"""Sample quality vs NFE of jdiff's samplers on an analytic 2-D Gaussian mixture.

The model is the exact eps of the data (a mixture of 8 Gaussians on a ring, unequal weights)
under the DDPM linear schedule (T = 1000), so every error comes from the sampler. Quality is
the sliced 2-Wasserstein distance (128 fixed random directions, 1-D W2 from sorted samples)
between n sampler outputs and n exact samples of the data; the noise floor is the same
distance between two independent exact sample sets. NFE = model calls.

With ``--peer`` (needs torch + diffusers) diffusers' PyTorch schedulers are driven with the
same exact eps model (float64 NumPy, fractional timesteps interpolated the same way), from
the same starting noise x_T, at the same NFE, and reported in a second table. (Sharing x_T
matters: with independent draws the distance moves by ~0.002-0.003 between draws, as much
as the gaps being compared.)

With ``--digits WORKDIR`` it instead samples the trained digits model of a workdir (the
README's ``experiments.main --config=jdiff/configs/digits.py``) with every sampler of
the registry (`jdiff.samplers.registry.SAMPLERS`, on its default grid, through the config
path's `make_sample_fn`) at NFE 10, 20 and 50, without thresholding, with x0 clipping and
with dynamic thresholding, and compares pixel statistics with the held-out digits (the test
split): mean, std, fraction of saturated pixels (|x| > 0.99), the 1-D Wasserstein distance
between the sample and data pixel histograms, and the Frechet distance between Gaussian fits
of the samples and the data in pixel space (256-D; like FID without the Inception network,
biased upwards at small n, equally for every sampler). Wall-clock per sample is the jitted
call's time after compilation, divided by n.

Usage::

  .venv/bin/python -m experiments.benchmark_samplers            # jdiff only
  .venv/bin/python -m experiments.benchmark_samplers --peer     # + diffusers
  .venv/bin/python -m experiments.benchmark_samplers --digits /work/runs/digits --n 256
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import continuous, schedules
from jdiff.samplers.registry import SAMPLERS, sample

NFES = (5, 10, 20, 50)
K = 8
ANGLES = 2 * np.pi * np.arange(K) / K
MEANS = np.stack([0.8 * np.cos(ANGLES), 0.8 * np.sin(ANGLES)], 1)
WEIGHTS = np.linspace(1.0, 2.0, K) / np.linspace(1.0, 2.0, K).sum()
STD = 0.08


def mixture_eps(ab, x):
  """Exact E[eps | x_t] for the mixture at alpha_bar ab (scalar or [B]); jnp or np arrays."""
  xp = jnp if isinstance(x, jax.Array) else np
  ab = xp.reshape(xp.asarray(ab), (-1, 1, 1))
  mean_k = xp.sqrt(ab) * MEANS[None]  # [B|1, K, 2]
  var = ab * STD**2 + 1.0 - ab  # [B|1, 1, 1]
  diff = x[:, None, :] - mean_k
  logits = np.log(WEIGHTS)[None] - 0.5 * xp.sum(diff**2, -1) / var[..., 0]
  logits = logits - logits.max(axis=1, keepdims=True)
  r = xp.exp(logits)
  r = r / r.sum(axis=1, keepdims=True)
  return xp.sum(r[..., None] * xp.sqrt(1.0 - ab) * diff / var, axis=1)


def exact_samples(rng: np.random.Generator, n: int) -> np.ndarray:
  k = rng.choice(K, size=n, p=WEIGHTS)
  return MEANS[k] + STD * rng.standard_normal((n, 2))


def sliced_w2(a: np.ndarray, b: np.ndarray, *, num_dirs: int = 128, seed: int = 0) -> float:
  """Sliced 2-Wasserstein distance between equal-size point clouds [n, 2]."""
  theta = np.random.default_rng(seed).uniform(0, np.pi, num_dirs)
  dirs = np.stack([np.cos(theta), np.sin(theta)], 1)
  pa, pb = np.sort(a @ dirs.T, axis=0), np.sort(b @ dirs.T, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))


# ----------------------------------------------------------------------------- jdiff


def jdiff_samplers():
  """name -> (sample_fn(schedule, model, x_T, rng, nfe) or None if nfe unreachable, note)."""

  def steps(name, per_step=1, extra=0, **kw):
    if SAMPLERS[name].space == "ve":  # the library's plain grid: Karras, full range, ends at 0
      kw = dict(spacing="karras", sigma_max=None, final_sigma="zero") | kw

    def run(sched, model, x_T, rng, nfe):
      n = (nfe + extra) // per_step
      return sample(name, sched, model, x_T, rng, num_steps=n, **kw), n * per_step - extra

    return run

  # unipc with final sigma_min lands on D(x; sigma_min): one call more (extra=-1).
  return {
    "DDIM (trailing)": steps("ddim", spacing="trailing"),
    "DDPM ancestral, respaced (trailing)": steps("ddim", eta=1.0, spacing="trailing"),
    "Euler (Karras)": steps("euler"),
    "Heun / EDM Alg. 1 (Karras)": steps("heun", per_step=2, extra=1),
    "Euler-ancestral (Karras)": steps("euler_a"),
    "EDM Alg. 2, S_churn=10 (Karras)": steps(
      "edm", per_step=2, extra=1, s_churn=10.0, s_tmin=0.05, s_tmax=10.0
    ),
    "DPM-Solver++(2M) (Karras)": steps("dpmpp_2m"),
    "DPM-Solver++(2M) (log-SNR)": steps("dpmpp_2m", spacing="log_snr"),
    "DPM-Solver++(3M) (Karras)": steps("dpmpp_3m"),
    "DPM-Solver++(3M) (log-SNR)": steps("dpmpp_3m", spacing="log_snr"),
    "DPM-Solver++(3M) (log-SNR, lower_order_final)": steps(
      "dpmpp_3m", spacing="log_snr", lower_order_final=True
    ),
    "DPM-Solver++(2M) (log-SNR, final sigma_min)": steps(
      "dpmpp_2m", spacing="log_snr", final_sigma="sigma_min"
    ),
    "UniPC-2 bh2 (log-SNR)": steps("unipc", spacing="log_snr"),
    "UniPC-2 bh2 (log-SNR, final sigma_min)": steps(
      "unipc", extra=-1, spacing="log_snr", final_sigma="sigma_min"
    ),
    "UniPC-3 bh2 (log-SNR, final sigma_min)": steps(
      "unipc", extra=-1, order=3, spacing="log_snr", final_sigma="sigma_min"
    ),
    "DPM-Solver++(2M) SDE (Karras)": steps("dpmpp_2m_sde"),
    "PC: ancestral + 1 Langevin (snr 0.1)": steps("pc", per_step=2, n_corrector=1, snr=0.1),
  }


def run_jdiff(n: int, seed: int, ref: np.ndarray):
  sched = schedules.linear(1000)

  def model(x, t, cond=None):
    return mixture_eps(continuous.alpha_bar_at(sched, t), x).astype(x.dtype)

  x_T = start_noise(n, seed)
  rng = jax.random.PRNGKey(seed + 1)
  rows = {}
  for name, fn in jdiff_samplers().items():
    row = {}
    for nfe in NFES:
      out, used = jax.jit(lambda x, r, fn=fn, nfe=nfe: fn(sched, model, x, r, nfe))(x_T, rng)
      row[nfe] = (sliced_w2(np.asarray(out, np.float64), ref), int(used))
    rows[name] = row
    print(f"  {name}: " + ", ".join(f"{v[1]}:{v[0]:.4f}" for v in row.values()), flush=True)
  return rows


# ----------------------------------------------------------------------------- diffusers


def start_noise(n: int, seed: int) -> jax.Array:
  """The starting noise x_T [n, 2] shared by jdiff and the peer."""
  return jax.random.normal(jax.random.PRNGKey(seed), (n, 2))


def run_peer(n: int, seed: int, ref: np.ndarray):
  import diffusers
  import torch

  ab64 = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
  log_sig = 0.5 * np.log((1.0 - ab64) / ab64)

  def eps_model(x: torch.Tensor, t) -> torch.Tensor:
    t = float(t)
    ab = 1.0 / (1.0 + np.exp(2 * np.interp(t, np.arange(1000), log_sig)))
    return torch.from_numpy(mixture_eps(ab, x.double().numpy()))

  common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
  configs = {
    "DDIMScheduler (trailing)": (diffusers.DDIMScheduler, dict(timestep_spacing="trailing")),
    "DDPMScheduler (trailing)": (diffusers.DDPMScheduler, dict(timestep_spacing="trailing")),
    "EulerDiscrete (Karras)": (diffusers.EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    "EulerAncestralDiscrete": (
      diffusers.EulerAncestralDiscreteScheduler,
      dict(timestep_spacing="trailing"),
    ),
    "HeunDiscrete (Karras)": (diffusers.HeunDiscreteScheduler, dict(use_karras_sigmas=True)),
    "DPMSolverMultistep 2M (default)": (diffusers.DPMSolverMultistepScheduler, {}),
    "DPMSolverMultistep 2M (Karras)": (
      diffusers.DPMSolverMultistepScheduler,
      dict(use_karras_sigmas=True),
    ),
    "DPMSolverMultistep 2M (lu_lambdas)": (
      diffusers.DPMSolverMultistepScheduler,
      dict(use_lu_lambdas=True),
    ),
    "DPMSolverMultistep 3M": (diffusers.DPMSolverMultistepScheduler, dict(solver_order=3)),
    "DPMSolverMultistep 3M (lu_lambdas)": (
      diffusers.DPMSolverMultistepScheduler,
      dict(solver_order=3, use_lu_lambdas=True),
    ),
    "DPMSolverMultistep 2M SDE (Karras)": (
      diffusers.DPMSolverMultistepScheduler,
      dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
    ),
    "DPMSolverMultistep 2M (final sigma_min)": (
      diffusers.DPMSolverMultistepScheduler,
      dict(final_sigmas_type="sigma_min"),
    ),
    "UniPCMultistep (bh2)": (diffusers.UniPCMultistepScheduler, {}),
    "UniPCMultistep (bh2, final sigma_min)": (
      diffusers.UniPCMultistepScheduler,
      dict(final_sigmas_type="sigma_min"),
    ),
    "UniPCMultistep 3 (bh2, final sigma_min)": (
      diffusers.UniPCMultistepScheduler,
      dict(solver_order=3, final_sigmas_type="sigma_min"),
    ),
    "UniPCMultistep (bh2, Karras)": (
      diffusers.UniPCMultistepScheduler,
      dict(use_karras_sigmas=True),
    ),
    "DEISMultistep": (diffusers.DEISMultistepScheduler, {}),
  }
  x_T = torch.from_numpy(np.asarray(start_noise(n, seed), np.float64))
  rows = {}
  for name, (cls, kw) in configs.items():
    row = {}
    for nfe in NFES:
      sch = cls(**common, **kw)
      n_steps = (nfe + 1) // 2 if cls is diffusers.HeunDiscreteScheduler else nfe
      sch.set_timesteps(n_steps)
      gen = torch.Generator().manual_seed(seed)
      x = x_T * sch.init_noise_sigma
      calls = 0
      for t in sch.timesteps:
        inp = sch.scale_model_input(x, t)
        eps = eps_model(inp, t)
        calls += 1
        try:
          x = sch.step(eps, t, x, generator=gen).prev_sample
        except TypeError:
          x = sch.step(eps, t, x).prev_sample
      row[nfe] = (sliced_w2(x.double().numpy(), ref), calls)
    rows[name] = row
    print(f"  {name}: " + ", ".join(f"{v[1]}:{v[0]:.4f}" for v in row.values()), flush=True)
  return rows, f"diffusers {diffusers.__version__}, torch {torch.__version__}"


# ----------------------------------------------------------------------------- report


def table(rows, title: str) -> str:
  lines = [
    f"| {title} | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
    "|---|" + "---|" * len(NFES),
  ]
  best = {nfe: min(r[nfe][0] for r in rows.values()) for nfe in NFES}
  for name, row in rows.items():
    cells = []
    for nfe in NFES:
      d, used = row[nfe]
      cell = f"{d:.4f}" + ("" if used == nfe else f" ({used})")
      cells.append(f"**{cell}**" if d == best[nfe] else cell)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- digits model

DIGIT_NFES = (10, 20, 50)
THRESHOLDS = {
  "none": dict(clip_x0=None),
  "clip": dict(clip_x0=1.0),
  "dynamic": dict(clip_x0=1.0, dynamic_threshold=0.99),
}


def heldout_digits(image_size: int = 16) -> np.ndarray:
  """The test split of the embedded digits in [-1, 1], [n, H, W, 1] float64."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  from jdiff.data import digits  # pylint: disable=g-import-not-at-top

  images = load_digits().images[digits.split_indices()["test"]]
  return (
    np.stack([digits.resize_digit(im, image_size=image_size) for im in images]).astype(np.float64)
    / 127.5
    - 1.0
  )


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between Gaussian fits of a [n, d] and b [m, d]."""
  from scipy import linalg  # pylint: disable=g-import-not-at-top

  ma, mb = a.mean(0), b.mean(0)
  ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = np.real(linalg.sqrtm(ca @ cb))
  return float(np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2.0 * root))


def pixel_metrics(x: np.ndarray, data: np.ndarray) -> dict:
  xs, ds = np.sort(x.ravel()), np.sort(data.ravel())
  q = np.linspace(0.0, 1.0, 2001)
  return {
    "mean": float(x.mean()),
    "std": float(x.std()),
    "sat": float(np.mean(np.abs(x) > 0.99)),
    "hist_w1": float(np.mean(np.abs(np.quantile(xs, q) - np.quantile(ds, q)))),
    "fd": frechet(x.reshape(len(x), -1), data.reshape(len(data), -1)),
  }


def steps_for_nfe(name: str, nfe: int) -> int:
  """Solver steps whose model calls are `nfe` (heun / edm: 2N - 1; pc with 1 corrector: 2N)."""
  if name in ("heun", "edm"):
    return (nfe + 1) // 2
  if name == "pc":
    return nfe // 2
  return nfe


def run_digits(
  workdir: str, n: int, seed: int, *, samplers=None, cells=None, spacings=None, grid_files=None
) -> str:
  """The digits table.

  Args:
    workdir, n, seed: the trained model, samples per cell, seed of x_T.
    samplers: registry names (default: all but ddpm).
    cells: (threshold name, NFE) pairs, all by default.
    spacings: grids per sampler ('auto' = its default; names it does not accept are
      skipped); default ['auto'].
    grid_files: stored grid records (experiments/optimize_grid.py); each adds a row for its
      sampler in the cells of its NFE.
  """
  from jdiff.configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from jdiff.runs.setup import Setup  # pylint: disable=g-import-not-at-top
  from jdiff.samplers import grid_files  # pylint: disable=g-import-not-at-top
  from jdiff.samplers import registry as sampling  # pylint: disable=g-import-not-at-top

  config = digits_config.get_config()
  with Setup(config, workdir, kind="diffusion") as setup:
    params, step = setup.restore_params("ema_params")
    module, schedule, shape = setup.module, setup.schedule, setup.image_shape
  data = heldout_digits(shape[0])
  x_T = jax.random.normal(jax.random.key(seed), (n, *shape), jnp.float32)
  rng = jax.random.key(seed + 1)
  lines = [
    f"Digits model {workdir} (step {step}, EMA), n = {n} samples per cell, held-out "
    f"data: {len(data)} test digits. Data: {pixel_metrics(data, data)}.",
    "",
    "| sampler (grid) | threshold | NFE | FD | hist W1 | mean | std | sat | ms/sample |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  cells = cells or [(thr, nfe) for thr in THRESHOLDS for nfe in DIGIT_NFES]
  # ddpm takes all T = 1000 steps: the NFE 10-50 range is for the others.
  names = samplers or [k for k in sampling.SAMPLERS if k != "ddpm"]
  records = {f: grid_files.load_grid(f) for f in grid_files or []}
  spacings = spacings or ["auto"]
  for thr, nfe in cells:  # cell-major: a cut-short run still has every sampler's first cells
    for name, grid, kw in _digit_variants(names, nfe, spacings, records):
      fn = jax.jit(
        sampling.make_sample_fn(
          module,
          schedule,
          sampler=name,
          num_steps=steps_for_nfe(name, nfe),
          **kw,
          **THRESHOLDS[thr],
        )
      )
      compiled = fn.lower(params, x_T, rng, None).compile()
      t0 = time.perf_counter()
      x = np.asarray(jax.block_until_ready(compiled(params, x_T, rng, None)), np.float64)
      ms = 1e3 * (time.perf_counter() - t0) / n
      m = pixel_metrics(x, data)
      line = (
        f"| {name} ({grid}) | {thr} | {nfe} | {m['fd']:.2f} | {m['hist_w1']:.4f} | "
        f"{m['mean']:+.3f} | {m['std']:.3f} | {m['sat']:.3f} | {ms:.1f} |"
      )
      lines.append(line)
      print(line, flush=True)
  return "\n".join(lines)


def _digit_variants(names, nfe, spacings, records):
  """(sampler, grid label, make_sample_fn kwargs) for each row of one digits cell."""
  from jdiff.samplers import registry as sampling  # pylint: disable=g-import-not-at-top

  for name in names:
    spec = sampling.SAMPLERS[name]
    for sp in spacings:
      if sp == "auto":
        yield name, spec.default_spacing or "all t", {}
      elif sp in spec.spacings:
        yield name, sp, dict(spacing=sp)
    for path, rec in records.items():
      if rec["sampler"] == name and rec["nfe"] == nfe:
        yield name, f"optimised, {os.path.basename(path)}", dict(grid_file=path)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=20000, help="samples per run")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--peer", action="store_true", help="also run diffusers' schedulers")
  p.add_argument(
    "--digits",
    default="",
    help="workdir of a trained digits model: benchmark "
    "the registry's samplers on it instead of the analytic mixture",
  )
  p.add_argument("--samplers", default="", help="--digits: comma-separated subset")
  p.add_argument(
    "--cells",
    default="",
    help="--digits: comma-separated THRESHOLD:NFE "
    f"(thresholds {sorted(THRESHOLDS)}); default: all with NFE {DIGIT_NFES}",
  )
  p.add_argument(
    "--spacings", default="auto", help="--digits: comma-separated grids ('auto': default)"
  )
  p.add_argument(
    "--grid-files", default="", help="--digits: comma-separated grid records (optimize_grid)"
  )
  args = p.parse_args(argv)
  if args.digits:
    cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",") if c]
    samplers = [x for x in args.samplers.split(",") if x]
    table_text = run_digits(
      args.digits,
      args.n,
      args.seed,
      samplers=samplers,
      cells=cells,
      spacings=[x for x in args.spacings.split(",") if x],
      grid_files=[x for x in args.grid_files.split(",") if x],
    )
    print("\n" + table_text)
    return

  rng = np.random.default_rng(args.seed + 100)
  ref = exact_samples(rng, args.n)
  floor = sliced_w2(exact_samples(rng, args.n), ref)
  t0 = time.time()
  print("jdiff:", flush=True)
  ours = run_jdiff(args.n, args.seed, ref)
  print(f"(jdiff runs took {time.time() - t0:.0f} s including compilation)")
  out = [
    f"Sliced W2 to exact samples (n = {args.n}, 128 directions; noise floor "
    f"{floor:.4f}); 8-Gaussian ring (std {STD}), linear schedule T = 1000, exact eps. "
    "Bold: best in column; (k): the sampler's actual NFE when it differs.",
    "",
    table(ours, "jdiff sampler"),
  ]
  if args.peer:
    print("diffusers:", flush=True)
    peer, version = run_peer(args.n, args.seed, ref)
    out += ["", f"Peer ({version}), same model, same NFE:", "", table(peer, "diffusers scheduler")]
    summary = ["", "| NFE | best jdiff | best diffusers |", "|---|---|---|"]
    for nfe in NFES:
      bo = min(ours.items(), key=lambda kv: kv[1][nfe][0])
      bp = min(peer.items(), key=lambda kv: kv[1][nfe][0])
      summary.append(f"| {nfe} | {bo[1][nfe][0]:.4f} ({bo[0]}) | {bp[1][nfe][0]:.4f} ({bp[0]}) |")
    out += summary
  print("\n" + "\n".join(out))


if __name__ == "__main__":
  main()
