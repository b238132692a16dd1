"""Editing benchmark: inpainting (replacement vs RePaint at equal NFE) and SR3 vs bicubic.

Inpainting: held-out digits (test split, 16x16) with the centre 8x8 masked, completed by the
trained digits model (README's main job) with DDIM eta = 1 (ancestral); the error is the
MSE to the true pixels inside the mask. Quality: the digits sample-quality metric of
`--mode=fid`, through its public functions: the cached digits classifier's
features (`jdiff.runs.feature_nets.load_feature_net`) of the completed images give a Frechet
distance to the same features of the true held-out digits (FD vs truth), and to the
reference statistics of the 1,597 training digits that `--mode=fid` uses (FD vs train,
`jdiff.runs.fid.load_or_compute_reference`); the class probabilities give the IS. Rows
without sampling anchor the scale: the true digits themselves, and the centre left blank.
Also the *seam* error, the mean absolute difference across the mask's border (pairs of
neighbouring pixels, one inside and one outside) minus the same on the true images:
replacement's known failure is an inside that does not fit the outside ([RePaint] Sec. 4.1).

Super-resolution: the same held-out digits average-pooled to 8x8 and brought back to 16x16
by the digits_sr model (one sample, and the mean of 4 samples) and by bicubic / bilinear
upsampling; PSNR over [-1, 1] (peak-to-peak 2).

Usage:
  python -m experiments.benchmark_editing --digits_workdir=runs/digits --sr_workdir=runs/digits_sr
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import conditioning, metrics
from jdiff.configs import digits, digits_sr
from jdiff.runs import diffusion, feature_nets, fid
from jdiff.runs.setup import Setup
from jdiff.samplers import editing


def held_out(setup: Setup, n: int) -> np.ndarray:
  out = []
  for batch in setup.eval_iterator(setup.config.eval.batch_size):
    out.append(np.asarray(batch["image"])[np.asarray(batch["mask"]).astype(bool)])
    if sum(len(o) for o in out) >= n:
      break
  return np.concatenate(out)[:n]


def seam(x: np.ndarray, mask: np.ndarray) -> float:
  """Mean |x_in - x_out| over horizontally / vertically adjacent pairs across the border.

  Args:
    x: [N, H, W, 1] images; mask: [1, H, W, 1], 1 inside.
  """
  m, x = mask[0, ..., 0] > 0.5, x[..., 0]
  horiz = np.abs(x[:, :, :-1] - x[:, :, 1:])[:, m[:, :-1] != m[:, 1:]]
  vert = np.abs(x[:, :-1, :] - x[:, 1:, :])[:, m[:-1, :] != m[1:, :]]
  return float(np.mean(np.concatenate([horiz, vert], axis=1)))


class Quality:
  """Digits-classifier FD (vs the true images and vs --mode=fid's reference) and IS."""

  def __init__(self, cfg, setup: Setup, truth: np.ndarray):
    self.net = feature_nets.load_feature_net(cfg, setup.pixel_shape)
    self.ref, self.ref_path = fid.load_or_compute_reference(cfg, setup, self.net)
    self.splits = cfg.eval.is_splits
    self.apply = jax.jit(self.net.apply)
    self.truth_stats = metrics.gaussian_stats(self.features(truth)[0])

  def features(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f, p = self.apply(self.net.params, jnp.asarray(x))
    return np.asarray(f), np.asarray(p)

  def __call__(self, x: np.ndarray) -> dict:
    f, p = self.features(x)
    stats = metrics.gaussian_stats(f)
    return dict(
      fd_truth=metrics.frechet_distance(*stats, *self.truth_stats),
      fd_train=metrics.frechet_distance(*stats, self.ref.mu, self.ref.sigma),
      is_=metrics.inception_score(p, splits=self.splits)[0],
    )


def inpainting(args) -> dict:
  cfg = digits.get_config()
  cfg.sample.batch_size = args.num
  with Setup(cfg, args.digits_workdir, kind="diffusion") as setup:
    params, step = setup.restore_params("ema_params")
    truth = held_out(setup, args.num)
    mask = np.zeros((1, 16, 16, 1), np.float32)
    mask[:, 4:12, 4:12] = 1.0
    inside = np.broadcast_to(mask, truth.shape) > 0.5
    runs = {
      "replacement, 25 steps": dict(num_steps=25),
      "replacement, 85 steps": dict(num_steps=85),
      "RePaint j=5 r=4, 25 steps": dict(num_steps=25, jump_length=5, jump_n=4),
    }
    quality = Quality(cfg, setup, truth)
    blank = np.where(inside, -1.0, truth).astype(np.float32)  # -1: the digits' background
    results = {
      "checkpoint_step": step,
      "num": len(truth),
      "truth_seam": seam(truth, mask),
      "feature_net": quality.net.name,
      "reference": quality.ref_path,
      **quality.net.info,
      "true digits": quality(truth),
      "centre blank": dict(
        quality(blank), mse=float(np.mean((blank[inside] - truth[inside]) ** 2)),
        seam_excess=seam(blank, mask) - seam(truth, mask),
      ),
    }  # fmt: skip
    print(json.dumps(results), flush=True)
    for name, r in runs.items():
      jl, jn = r.get("jump_length", 1), r.get("jump_n", 1)
      fn = jax.jit(
        diffusion.sample_fn(setup, sampler="ddim", eta=1.0, num_steps=r["num_steps"]),
      )

      def run(seed, fn=fn, jl=jl, jn=jn):
        key = jax.random.key(seed)
        x_T = jax.random.normal(key, truth.shape, jnp.float32)
        inp = editing.Inpaint(jnp.asarray(truth), jnp.asarray(mask), jump_length=jl, jump_n=jn)
        return np.asarray(fn(params, x_T, jax.random.fold_in(key, 1), inpaint=inp))

      t0 = time.perf_counter()
      run(0)
      first = time.perf_counter() - t0
      mses, seams, times, quals = [], [], [], []
      for seed in range(1, args.runs + 1):
        t0 = time.perf_counter()
        out = run(seed)
        times.append(time.perf_counter() - t0)
        mses.append(float(np.mean((out[inside] - truth[inside]) ** 2)))
        seams.append(seam(out, mask) - results["truth_seam"])
        quals.append(quality(out))
      results[name] = dict(
        nfe=editing.num_model_steps(r["num_steps"], jl, jn),
        mse_median=float(np.median(mses)),
        mse_runs=mses,
        seam_excess_median=float(np.median(seams)),
        **{f"{k}_median": float(np.median([q[k] for q in quals])) for k in quals[0]},
        **{f"{k}_runs": [q[k] for q in quals] for k in quals[0]},
        run_s_median=float(np.median(times)),
        compile_s=first - float(np.median(times)),
      )
      print(name, json.dumps(results[name]), flush=True)
  return results


def psnr(x: np.ndarray, y: np.ndarray) -> float:
  return float(10.0 * np.log10(4.0 / np.mean((x - y) ** 2)))


def superres(args) -> dict:
  cfg = digits_sr.get_config()
  cfg.sample.batch_size = args.num
  with Setup(cfg, args.sr_workdir, kind="diffusion") as setup:
    params, step = setup.restore_params("ema_params")
    truth = held_out(setup, args.num)
    lowres = np.asarray(conditioning.downsample(jnp.asarray(truth), 2))
    res = {"checkpoint_step": step}
    for method in ("bicubic", "bilinear", "nearest"):
      up = np.asarray(conditioning.upsample(jnp.asarray(lowres), (16, 16), method=method))
      res[method] = psnr(np.clip(up, -1, 1), truth)
    samples, times = [], []
    for seed in range(max(args.runs, 4)):
      t0 = time.perf_counter()
      from jdiff.runs import edit  # pylint: disable=g-import-not-at-top

      samples.append(edit.superres(setup, params, lowres, jax.random.key(100 + seed)))
      times.append(time.perf_counter() - t0)
    one = [psnr(s, truth) for s in samples]
    res["sr_one_sample_median"] = float(np.median(one))
    res["sr_one_sample_runs"] = one
    res["sr_mean_of_4"] = psnr(np.mean(samples[:4], axis=0), truth)
    res["sr_run_s_median"] = float(np.median(times[1:]))
    print("superres", json.dumps(res), flush=True)
  return res


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--digits_workdir", default="runs/digits")
  p.add_argument("--sr_workdir", default="runs/digits_sr")
  p.add_argument("--num", type=int, default=200, help="held-out digits (the test split has 200)")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--only", default="", choices=["", "inpaint", "superres"])
  args = p.parse_args()
  out = {}
  if args.only in ("", "inpaint"):
    out["inpainting"] = inpainting(args)
  if args.only in ("", "superres"):
    out["superres"] = superres(args)
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
