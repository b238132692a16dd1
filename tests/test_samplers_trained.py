"""Every registered sampler on a trained network: through `make_sample_fn` and `--mode=sample`.

The tiny config is trained once per session through the CLI (a few hundred steps: the
samples are digit-like blobs, enough for their pixel statistics to be far from noise). Then
every sampler of the registry, on its default grid and on each other grid it accepts, draws
N images from the EMA parameters through `jdiff.runs.diffusion.generate`, i.e. `config.sample`
-> `sample_options` -> `make_sample_fn`, and its pixel statistics are compared with a long
run (every timestep) of DDIM on the same model:

  * eta = 0 (the probability-flow ODE) for the deterministic samplers,
  * eta = 1 (the ancestral chain: DDIM with eta = 1 on every timestep is DDPM) for the
    stochastic ones. The two limits differ for an imperfect model, which is why each family
    is compared with its own (on this model by ~0.07 in the pixel mean, 3 standard errors).
    EDM with churn lies between them and is compared with the nearer one.

Tolerance: MC_K combined standard errors (each statistic's standard error from a bootstrap
over the images of both runs: N sampled images, N_REF reference images) plus a discretisation
allowance for the few steps taken (`STEPS` solver steps against the long run's 50; the
samplers converge to the long run as the steps grow, and the allowance covers what the
20-step runs of the accepted grids miss on this model: up to ~0.08 in the saturated fraction
(Karras grid, over-sharp) and ~0.04 in the std. A broken sampler is far outside it: Heun on
the uniform-in-t grid of the cosine schedule, which the registry now rejects, moved the
saturated fraction by 0.4 and the mean-image RMS to 0.4). The Monte-Carlo part alone is
checked to hold between two reference runs with different seeds, so it is not tighter than
the spread it claims to cover.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jdiff.configs import tiny
from jdiff.runs import diffusion as runs_diffusion
from jdiff.runs.setup import Setup
from jdiff.samplers.registry import AUTO, FLOW_SAMPLERS, SAMPLERS
from tests.conftest import main_args, run_python

TRAIN = {
  "train.num_steps": 300,
  "train.batch_size": 32,
  "train.ckpt_every": 300,
  "train.log_every": 100,
}
N, N_REF = 64, 256
STEPS = 20
MC_K = 5.0
# Discretisation / model allowance on (mean, std, saturated fraction, mean-image RMS).
ALLOW = np.array([0.05, 0.05, 0.10, 0.05])
STOCHASTIC = {"ddpm", "pc", "euler_a", "dpmpp_2m_sde"}
EITHER = {"edm"}


def _config(digits_dir: str, **sample):
  c = tiny.get_config()
  c.data.data_dir = digits_dir
  for key, value in TRAIN.items():
    section, name = key.split(".")
    c[section][name] = value
  c.sample.batch_size = N
  for key, value in sample.items():
    c.sample[key] = value
  return c


@pytest.fixture(scope="session")
def trained(digits_dir, tmp_path_factory):
  """(setup, EMA params, workdir) of the tiny config trained through the CLI."""
  workdir = str(tmp_path_factory.mktemp("trained_tiny"))
  run_python(main_args("train", workdir, digits_dir, **TRAIN), fast_compile=False)  # 300 steps
  with Setup(_config(digits_dir), workdir, kind="diffusion") as setup:
    params, _ = setup.restore_params("ema_params")
    yield setup, params, workdir


def _generate(trained, n: int, seed: int, **overrides) -> np.ndarray:
  setup, params, _ = trained
  return runs_diffusion.generate(setup, params, n, jax.random.key(seed), **overrides)


def _stats(x: np.ndarray, ref_image: np.ndarray) -> np.ndarray:
  """(mean, std, fraction |x| > 0.99, RMS of the per-pixel mean image minus ref_image)."""
  return np.array(
    [x.mean(), x.std(), np.mean(np.abs(x) > 0.99), np.sqrt(np.mean((x.mean(0) - ref_image) ** 2))]
  )


def _bootstrap_se(x: np.ndarray, ref_image: np.ndarray, reps: int = 64) -> np.ndarray:
  rng = np.random.default_rng(0)
  boots = [_stats(x[rng.integers(0, len(x), len(x))], ref_image) for _ in range(reps)]
  return np.std(boots, axis=0)


@pytest.fixture(scope="session")
def references(trained):
  """Long DDIM runs (every timestep): ODE (two seeds) and ancestral."""
  t = trained[0].schedule.num_steps
  ode = _generate(trained, N_REF, 1, sampler="ddim", num_steps=t, eta=0.0)
  ode_b = _generate(trained, N_REF, 2, sampler="ddim", num_steps=t, eta=0.0)
  sde = _generate(trained, N_REF, 3, sampler="ddim", num_steps=t, eta=1.0)
  return {"ode": ode, "ode_b": ode_b, "sde": sde}


def _distance(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(|stats(x) - stats(ref)|, tolerance) for the 4 statistics."""
  img = ref.mean(0)
  diff = np.abs(_stats(x, img) - _stats(ref, img))
  # The RMS of the mean-image difference is ~sqrt(var/N + var/N_REF) even for equal laws:
  # its reference value is 0, and its noise is its own scale.
  se = np.sqrt(_bootstrap_se(x, img) ** 2 + _bootstrap_se(ref, img) ** 2)
  noise_rms = np.sqrt(np.mean(x.var(0) / len(x) + ref.var(0) / len(ref)))
  tol = MC_K * se + ALLOW
  tol[3] = 1.5 * noise_rms + ALLOW[3]
  return diff, tol


def test_reference_runs_agree_within_the_tolerance(references):
  diff, tol = _distance(references["ode_b"], references["ode"])
  assert np.all(diff <= tol - ALLOW), (diff, tol - ALLOW)


CASES = [
  (name, spacing)
  for name, spec in SAMPLERS.items()
  if name not in FLOW_SAMPLERS  # flow models only: a clear error on this DDPM model (below)
  for spacing in (AUTO,) + tuple(s for s in spec.spacings if s != (spec.default_spacing or AUTO))
]


def test_flow_samplers_refuse_a_ddpm_model(trained):
  for name in FLOW_SAMPLERS:
    with pytest.raises(ValueError, match=f"sampler '{name}' steps in t on a rectified-flow"):
      _generate(trained, N, 10, sampler=name, num_steps=STEPS)


@pytest.mark.parametrize("name,spacing", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_every_sampler_and_grid_on_the_trained_model(trained, references, name, spacing):
  x = _generate(trained, N, 10, sampler=name, spacing=spacing, num_steps=STEPS)
  assert x.shape == (N, 16, 16, 1) and np.all(np.isfinite(x))
  # Clipping is on (config default clip_x0=1): samplers ending at sigma = 0 return the
  # clipped data prediction; unipc ends at sigma(t=0) (final_sigma='sigma_min') with that
  # much noise left on it.
  slack = (
    1e-5
    if name != "unipc"
    else 6.0
    * float(
      jax.numpy.sqrt(
        (1 - trained[0].schedule.alphas_cumprod[0]) / trained[0].schedule.alphas_cumprod[0]
      )
    )
  )
  assert np.abs(x).max() <= 1.0 + slack, np.abs(x).max()
  kinds = ["sde"] if name in STOCHASTIC else ["ode", "sde"] if name in EITHER else ["ode"]
  results = {k: _distance(x, references[k]) for k in kinds}
  if os.environ.get("JDIFF_PRINT_STATS"):
    print(name, spacing, {k: (np.round(d, 4), np.round(t, 4)) for k, (d, t) in results.items()})
  assert any(np.all(d <= t) for d, t in results.values()), (name, spacing, results)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_3m"])
def test_mode_sample_cli_at_defaults(trained, digits_dir, name):
  """`--mode=sample` with only the sampler overridden (one per family: ancestral, timestep
  grid, sigma grid): finite, clipped, not noise."""
  _, _, workdir = trained
  run_python(
    main_args(
      "sample",
      workdir,
      digits_dir,
      **TRAIN,
      **{"sample.sampler": name, "sample.num_samples": N, "sample.batch_size": N},
    )
  )
  t = 5  # tiny's sample.num_steps (ddpm takes all T but is filed under it)
  with np.load(os.path.join(workdir, "samples", f"samples_{name}{t}_step300.npz")) as f:
    x = f["images"]
  assert x.shape == (N, 16, 16, 1) and np.all(np.isfinite(x)) and np.abs(x).max() <= 1.0 + 1e-5
  # Digits are mostly background (-1): far from N(0, 1) noise or saturated +-1 noise.
  assert x.mean() < -0.05 and 0.3 < x.std() < 0.9, (x.mean(), x.std())
