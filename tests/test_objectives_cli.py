"""objective = ddpm | edm | flow and model.arch = unet | dit through the runs: train, sample, eval
and reflow on tiny configs (one session fixture trains each combination once)."""

import jax
import numpy as np
import pytest
from scipy.special import expit

from jdiff.configs import tiny
from jdiff.runs import diffusion, reflow
from jdiff.runs.setup import Setup

TINY_DIT = {"model.arch": "dit", "dit.hidden": 16, "dit.depth": 1, "dit.num_heads": 2}
COMBOS = {
  "edm_unet": {"objective": "edm", "sample.sampler": "heun", "sample.num_steps": 3},
  "flow_dit": {"objective": "flow", "sample.sampler": "flow_euler", **TINY_DIT},
  "ddpm_dit": {
    "model.learn_sigma": True,
    "diffusion.variance": "learned_range",
    "eval.bound_examples": 2,
    **TINY_DIT,
  },  # fmt: skip
}


def config(data_dir, **overrides):
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.train.num_steps = 2
  c.train.ckpt_every = 0
  c.eval.batch_size = 200
  for key, value in overrides.items():
    *path, field = key.split(".")
    target = c
    for part in path:
      target = target[part]
    target[field] = value
  return c


@pytest.fixture(scope="session")
def trained(tmp_path_factory, digits_dir):
  """{combo: (workdir, config)} after 2 training steps each."""
  out = {}
  for name, overrides in COMBOS.items():
    wd = str(tmp_path_factory.mktemp(name))
    cfg = config(digits_dir, **overrides)
    diffusion.train_and_evaluate(cfg, wd)
    out[name] = (wd, cfg)
  return out


def _independent_eval_loss(cfg, wd) -> tuple[float, float]:
  """(eval loss, examples) of an edm / flow run, recomputed in float64 from the closed forms.

  Only the plumbing is shared with `diffusion.evaluate` (restored EMA params, the padded eval
  batches, the key of batch i, fold_in(stream 'eval', i), split into (dropout, loss) and the
  loss key into (t, noise)); t's law, x_t, the target and the weighting are written here:
  edm: sigma = exp(P_mean + P_std n), x_t = x0 + sigma eps, target x0, lambda = (sigma^2 +
  sd^2) / (sigma sd)^2 ([EDM] Table 1); flow: t = sigmoid(m + s n), x_t = (1 - t) x0 + t eps,
  target eps - x0, weight 1 ([SD3] eq. 19).
  """
  edm = cfg.objective == "edm"
  total, count = 0.0, 0.0
  with Setup(cfg, wd, kind=diffusion.KIND) as setup:
    params, _ = setup.restore_params("ema_params" if cfg.eval.use_ema else "params")
    base = setup.keys.stream("eval")
    apply = jax.jit(lambda p, x, t: setup.module.apply({"params": p}, x, t, None, train=False))
    for i, batch in enumerate(setup.eval_iterator(cfg.eval.batch_size)):
      x0 = np.asarray(batch["image"], np.float64)
      _, loss_rng = jax.random.split(jax.random.fold_in(base, i))
      t_rng, n_rng = jax.random.split(loss_rng)
      n = np.asarray(jax.random.normal(t_rng, (x0.shape[0],)), np.float64)
      eps = np.asarray(jax.random.normal(n_rng, x0.shape), np.float64)
      if edm:
        t = np.exp(cfg.edm.p_mean + cfg.edm.p_std * n)
        x_t, target, scale = x0 + t[:, None, None, None] * eps, x0, 1.0
        sd = cfg.edm.sigma_data
        weight = (t**2 + sd**2) / (t * sd) ** 2
      else:
        t = expit(cfg.flow.p_mean + cfg.flow.p_std * n)
        tb = t[:, None, None, None]
        x_t, target, scale, weight = (1 - tb) * x0 + tb * eps, eps - x0, 1000.0, 1.0
      t_in = np.asarray(t * scale, np.float32)
      out = apply(params, np.float32(x_t), t_in)
      per_ex = weight * np.mean((np.asarray(out, np.float64) - target) ** 2, axis=(1, 2, 3))
      mask = np.asarray(batch["mask"], np.float64)
      total, count = total + np.sum(per_ex * mask), count + np.sum(mask)
  return total / count, count


@pytest.mark.parametrize("name", list(COMBOS))
def test_train_sample_eval(trained, name):
  wd, cfg = trained[name]
  images = np.load(diffusion.sample(cfg, wd))["images"]
  assert images.shape == (8, 16, 16, 1) and np.all(np.isfinite(images))
  results = diffusion.evaluate(cfg, wd)
  assert np.isfinite(results["eval/loss"]) and results["eval/examples"] > 0
  assert ("eval/bpd_bound" in results) == (cfg.objective == "ddpm")
  if cfg.objective != "ddpm":  # the loss itself, recomputed from the closed forms
    want, count = _independent_eval_loss(cfg, wd)
    assert results["eval/examples"] == count
    np.testing.assert_allclose(results["eval/loss"], want, rtol=2e-5)


def test_flow_samples_with_dpm_solver_and_reflow_trains(trained, tmp_path):
  wd, cfg = trained["flow_dit"]
  cfg.unlock()
  cfg.sample.sampler = "dpmpp_2m"
  assert np.load(diffusion.sample(cfg, wd))["images"].shape == (8, 16, 16, 1)
  cfg.flow.reflow_num_pairs, cfg.flow.reflow_steps = 8, 2
  path = reflow.write_pairs(cfg, wd)
  assert np.load(path)["pairs"].shape == (8, 16, 16, 2)
  student = config(cfg.data.data_dir, **COMBOS["flow_dit"], **{"flow.reflow_pairs": path})
  state = diffusion.train_and_evaluate(student, str(tmp_path / "reflow"))
  assert int(state.step) == 2
