"""objective = ddpm | edm | flow and model.arch = unet | dit through the runs: train, sample, eval
and reflow on tiny configs (one session fixture trains each combination once)."""

import numpy as np
import pytest

from jdiff.configs import tiny
from jdiff.runs import diffusion, reflow

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


@pytest.mark.parametrize("name", list(COMBOS))
def test_train_sample_eval(trained, name):
  wd, cfg = trained[name]
  images = np.load(diffusion.sample(cfg, wd))["images"]
  assert images.shape == (8, 16, 16, 1) and np.all(np.isfinite(images))
  results = diffusion.evaluate(cfg, wd)
  assert np.isfinite(results["eval/loss"]) and results["eval/examples"] > 0
  assert ("eval/bpd_bound" in results) == (cfg.objective == "ddpm")


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
