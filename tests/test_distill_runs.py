"""`--mode=distill` and the samplers of distilled workdirs (jdiff/runs/distill.py, distilled.py,
jdiff/distill/sampling.py), against closed forms on Gaussian data N(MU, S^2 I):

  D(x, sigma) = MU + (x - MU) S^2 / (S^2 + sigma^2)          (the optimal VE denoiser),
  f(x, sigma) = c_skip x + (1 - c_skip) D(x, sigma),  c_skip = S_D^2 / ((sigma - s_min)^2 + S_D^2)

(the student's consistency function made of its denoiser, S_D = 0.5), and [CM] Alg. 1 /
[DDIM] chains recomputed in float64 NumPy with the same noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import continuous, schedules
from jdiff.configs import distill_digits
from jdiff.distill.sampling import denoiser_consistency_fn
from jdiff.runs import distilled, validate, validate_modes
from jdiff.samplers import editing
from jdiff.samplers.grids import timestep_grid
from jdiff.samplers.registry import make_sample_fn
from tests import analytic

MU, S, SD = 0.3, 0.5, 0.5
SCH = schedules.cosine(64)
KEY = jax.random.key(0)  # the deterministic samplers draw nothing from it


class GaussianEps(nn.Module):
  """The exact eps of N(MU, S^2) at integer or fractional t (a parameter-free flax module)."""

  @nn.compact
  def __call__(self, x, t, y=None, *, train=False):
    ab = continuous.alpha_bar_at(SCH, jnp.asarray(t, jnp.float32))
    shape = x.shape
    return analytic.gaussian_eps_at_alpha_bar(ab, x.reshape(shape[0], -1), MU, S).reshape(shape)


def _f64(x, sigma, s_min):
  """The student's f of the exact denoiser, float64."""
  d = MU + (x - MU) * S**2 / (S**2 + sigma**2)
  c_skip = SD**2 / ((sigma - s_min) ** 2 + SD**2)
  return c_skip * x + (1 - c_skip) * d


def _s_min():
  return float(np.sqrt((1 - SCH.alphas_cumprod[0]) / SCH.alphas_cumprod[0]))


def test_boundary_condition_is_exact():
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  bad = lambda x, s: jnp.full_like(x, jnp.nan)  # noqa: E731  (a network gone wrong)
  f = denoiser_consistency_fn(bad, sigma_min=0.01)
  np.testing.assert_array_equal(f(x, 0.01), x)
  assert np.all(np.isnan(np.asarray(f(x, 0.5))))


@pytest.mark.parametrize("num_steps", [1, 3])
def test_consistency_sampler_is_alg1_on_the_karras_levels(num_steps):
  """The registry's 'consistency' sampler = [CM] Alg. 1 on [80, ..., sigma(t=0)] (Karras rho 7,
  K + 1 levels), from x_T sqrt(1 + 80^2), step i's noise from fold_in(rng, i), recomputed in
  float64; with K = 1 it is f(x, 80) of the optimal denoiser in closed form."""
  s_min, rho = _s_min(), 7.0
  i = np.arange(num_steps + 1) / num_steps
  levels = (80.0 ** (1 / rho) + i * (s_min ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
  fn = make_sample_fn(GaussianEps(), SCH, sampler="consistency", num_steps=num_steps, clip_x0=None)
  x_T = jax.random.normal(jax.random.key(1), (64, 2, 2, 1))
  rng = jax.random.key(2)
  got = np.asarray(jax.jit(fn)({}, x_T, rng), np.float64)
  x = np.asarray(x_T, np.float64) * math.sqrt(1 + 80.0**2)
  for k in range(num_steps):
    x = _f64(x, levels[k], s_min)
    if k + 1 < num_steps:  # the last level is the clean data: no noise
      z = np.asarray(jax.random.normal(jax.random.fold_in(rng, k), x_T.shape), np.float64)
      x = x + math.sqrt(levels[k + 1] ** 2 - s_min**2) * z
  np.testing.assert_allclose(got, x, rtol=2e-4, atol=2e-4)


def test_consistency_sampler_inpaints_the_known_pixels_exactly():
  known = jnp.full((4, 2, 2, 1), 0.75)
  mask = jnp.array([0.0, 0.0, 1.0, 1.0]).reshape(1, 2, 2, 1)
  fn = make_sample_fn(GaussianEps(), SCH, sampler="consistency", num_steps=2)
  out = np.asarray(fn({}, jax.random.normal(jax.random.key(3), known.shape), jax.random.key(4),
                      inpaint=editing.Inpaint(known, mask)))  # fmt: skip
  keep = np.broadcast_to(np.asarray(mask) == 0, out.shape)
  np.testing.assert_array_equal(out[keep], 0.75)
  assert np.abs(out[~keep] - 0.75).max() > 1e-3


def test_pd_student_samples_ddim_on_its_own_grid(tmp_path):
  """A PD workdir's record makes 'ddim' walk t(i / N) = i T / N - 1: with N | T that is the
  trailing grid (the same samples as ddim with num_steps = N); with N = 3 the grid is
  fractional and the chain equals a float64 DDIM of the exact eps."""
  distilled.write_record(str(tmp_path), {"method": "progressive", "num_steps": 4})
  kw = distilled.sample_overrides(str(tmp_path), SCH, "ddim")
  np.testing.assert_array_equal(kw["grid"], timestep_grid(64, 4, spacing="trailing"))
  resolved = distilled.resolve(_config(tmp_path), str(tmp_path))  # names its files ddim4
  assert (resolved.sample.sampler, resolved.sample.num_steps) == ("ddim", 4)
  x_T = jax.random.normal(jax.random.key(5), (32, 2, 2, 1))
  own = make_sample_fn(GaussianEps(), SCH, sampler="ddim", clip_x0=None, **kw)
  plain = make_sample_fn(GaussianEps(), SCH, sampler="ddim", num_steps=4, clip_x0=None)
  # float t reads alpha_bar through the log-sigma interpolation: equal to float32 rounding
  np.testing.assert_allclose(own({}, x_T, KEY), plain({}, x_T, KEY), rtol=1e-4, atol=1e-4)
  grid = np.linspace(63, -1, 4)  # 63, 41.67, 20.33, -1: fractional, as t(i / N) when N !| T
  out = make_sample_fn(GaussianEps(), SCH, sampler="ddim", grid=jnp.asarray(grid, jnp.float32),
                       clip_x0=None)({}, x_T, KEY)  # fmt: skip
  z = np.asarray(x_T, np.float64)
  for t, t_next in zip(grid[:-1], grid[1:]):
    ab = float(continuous.alpha_bar_at(SCH, jnp.float32(t)))
    ab_n = 1.0 if t_next < 0 else float(continuous.alpha_bar_at(SCH, jnp.float32(t_next)))
    x0 = MU + math.sqrt(ab) * S**2 * (z - math.sqrt(ab) * MU) / (ab * S**2 + 1 - ab)
    z = math.sqrt(ab_n) * x0 + math.sqrt(1 - ab_n) * (z - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
  np.testing.assert_allclose(np.asarray(out), z, rtol=1e-4, atol=1e-4)


def test_a_consistency_workdir_refuses_other_samplers(tmp_path):
  distilled.write_record(str(tmp_path), {"method": "consistency"})
  with pytest.raises(ValueError, match="holds a consistency model.*sampler='consistency'"):
    distilled.sample_overrides(str(tmp_path), SCH, "ddim")
  assert distilled.sample_overrides(str(tmp_path), SCH, "consistency") == {}
  assert distilled.sample_overrides(str(tmp_path / "none"), SCH, "ddim") == {}


def _config(teacher, **kw):
  c = distill_digits.get_config("tiny")
  with c.unlocked():
    c.update_from_flattened_dict({"distill.teacher_workdir": str(teacher), **kw})
  return c


def test_distill_config_errors_name_the_key(tmp_path):
  from jdiff.runs import distill  # pylint: disable=g-import-not-at-top

  # The teacher is read by --mode=distill only: the student's other modes do without it.
  validate.validate(_config(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match=r"config.distill.teacher_workdir='.*nowhere' is not a"):
    distill.distill(_config(tmp_path / "nowhere"), str(tmp_path / "student"))
  assert not (tmp_path / "student").exists()
  ok, edm = tmp_path / "ok", tmp_path / "edm"
  for workdir, objective in ((ok, "ddpm"), (edm, "edm")):
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"objective": objective}))
  with pytest.raises(ValueError, match=r"teacher_workdir='.*ok' has no checkpoint"):
    validate_modes.check_teacher(_config(ok))
  for workdir in (ok, edm):
    (workdir / "checkpoints" / "6").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"teacher_workdir=.* holds a teacher of objective 'edm'"):
    validate_modes.check_teacher(_config(edm))
  validate_modes.check_teacher(_config(ok))
  with pytest.raises(ValueError, match=r"config.objective='flow': distill.method='progressive'"):
    validate.validate(_config(ok, objective="flow"))
  validate.validate(_config(ok))
  with pytest.raises(ValueError, match=r"config.train.num_steps=1: .* among 2 rounds; need >= 2"):
    validate.validate(_config(ok, **{"train.num_steps": 1}))
  with pytest.raises(ValueError, match=r"config.distill.steps must be a power of two.*got 6"):
    validate.validate(_config(ok, **{"distill.steps": 6}))
  with pytest.raises(ValueError, match=r"config.distill.method must be one of"):
    validate.validate(_config(ok, **{"distill.method": "magic"}))
  with pytest.raises(ValueError, match=r"config.distill.solver must be one of"):
    validate.validate(_config(ok, **{"distill.solver": "rk4"}))
  assert distilled.sampler_of(_config(ok, **{"distill.method": "consistency"})) == "consistency"
  assert distilled.sampler_of(_config(ok)) == "ddim"
  # 'auto' follows the workdir's record: a consistency student sampled with the PD config.
  distilled.write_record(str(ok), {"method": "consistency_training"})
  assert distilled.sampler_of(_config(ok), str(ok)) == "consistency"
  assert distilled.sampler_of(_config(ok), str(edm)) == "ddim"
  (edm / distilled.RECORD_FILE).write_text("{not json")
  with pytest.raises(ValueError, match=r"distilled.json: damaged distillation record"):
    distilled.sampler_of(_config(ok), str(edm))


# ----------------------------------------------------------------------------- the chain


@pytest.mark.e2e
def test_teacher_distill_then_resume_is_bit_equal(tiny_run, tmp_path):
  """On the tiny teacher (the `tiny_run` workdir), in process: --mode=distill runs one
  progressive round (4 -> 2 steps) into <workdir>/steps_0002, an ordinary workdir with its
  record and sample grid; a copy without its step-6 checkpoint resumes from step 3 and ends
  bit-equal. (The CLI chain teacher -> distil -> sample -> fid: the README workflow, run by
  tests/test_readme.py.)"""
  from jdiff.runs import distill  # pylint: disable=g-import-not-at-top
  from jdiff.runs.diffusion import params_checksum  # pylint: disable=g-import-not-at-top

  over = {
    "data.data_dir": tiny_run.data_dir,
    "distill.steps": 4,
    "distill.final_steps": 2,
    "sample.grid_size": 4,
    "sample.batch_size": 8,
  }
  c = _config(tiny_run.workdir, **over)
  c.lock()
  work = str(tmp_path / "pd")
  state = distill.distill(c, work)
  round_dir = os.path.join(work, "steps_0002")
  rec = distilled.read_record(round_dir)
  assert rec["method"] == "progressive" and rec["num_steps"] == 2 and rec["finished_step"] == 6
  assert os.path.exists(os.path.join(round_dir, "samples", "grid_0000006.png"))
  # Resume: a copy without its step-6 checkpoint restarts from step 3 and ends bit-equal.
  again = str(tmp_path / "again")
  shutil.copytree(work, again)
  shutil.rmtree(os.path.join(again, "steps_0002", "checkpoints", "6"))
  os.remove(os.path.join(again, "steps_0002", distilled.RECORD_FILE))
  state2 = distill.distill(c, again)
  assert params_checksum(state2.params) == params_checksum(state.params)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state2.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
