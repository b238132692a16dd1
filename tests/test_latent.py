"""Latent diffusion: stage-1 autoencoder training/eval, the latent codec, stage 2 end to end."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python
from PIL import Image

from jdiff.configs import ae_digits, tiny
from jdiff.data import latents, sources
from jdiff.models.autoencoder import AutoencoderKL
from jdiff.runs import autoencoder as aet
from jdiff.runs import diffusion, stage1
from jdiff.runs.setup import Setup
from jdiff.training.writers import image_grid

AE_STEPS = 6


def ae_config(data_dir: str, **overrides):
  """ae_digits at 16x16 with a tiny autoencoder (ch 8, f = 4: 4x4x4 latents)."""
  c = ae_digits.get_config()
  c.data.data_dir = data_dir
  c.data.image_size = 16
  c.autoencoder.overrides.ch = 8
  c.autoencoder.overrides.num_groups = 4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 2
  c.train.num_steps = AE_STEPS
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.eval.batch_size = 40
  c.eval.num_recon_images = 4
  _apply(c, overrides)
  return c


def ldm_config(data_dir: str, ae_workdir: str, **overrides):
  """tiny.py on the latents of the tiny autoencoder (4x4 latents: attention at 2x2)."""
  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.data.image_size = 16
  c.model.attn_resolutions = (2,)
  c.sample.clip_x0 = 0.0
  c.latent.autoencoder_workdir = ae_workdir
  _apply(c, overrides)
  return c


def _apply(c, overrides):
  for key, value in overrides.items():
    *path, field = key.split(".")
    target = c
    for part in path:
      target = target[part]
    target[field] = value


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restore_full_state(config, workdir):
  """The whole stage-1 AutoencoderState via `Checkpointer.restore` (not the partial restore
  of params that `stage1.load_codec` uses)."""
  with Setup(config, workdir) as setup:
    return setup.module, setup.checkpointer.restore(setup.abstract_state())


def pixels(data_dir, split, n=None):
  """Images in [-1, 1] and labels, read straight from the tfds source (no pipeline)."""
  src = sources.load_source("jdiff_digits/16x16", split=split, data_dir=data_dir)
  n = len(src) if n is None else n
  x = np.stack([src[i]["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1.0
  y = np.array([src[i]["label"] for i in range(n)])
  return x, y


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, digits_dir):
  """Stage 1 trained 4 steps, then resumed to 6; and an uninterrupted 6-step run."""
  root = tmp_path_factory.mktemp("latent")
  wd = str(root / "ae")
  aet.train_autoencoder(ae_config(digits_dir, **{"train.num_steps": 4}), wd)
  first = {
    "ckpts": sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int),
    "recon": sorted(os.listdir(os.path.join(wd, "recon"))),
  }
  aet.train_autoencoder(ae_config(digits_dir), wd)
  straight = str(root / "ae_straight")
  aet.train_autoencoder(ae_config(digits_dir), straight)
  return {"workdir": wd, "straight": straight, "first": first, "root": root}


# ----------------------------------------------------------------------------- stage 1


def test_stage1_checkpoints_resume_and_outputs(ae_run, digits_dir):
  wd = ae_run["workdir"]
  assert ae_run["first"]["ckpts"] == ["2", "4"]
  assert sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int) == ["2", "4", "6"]
  steps = [r["step"] for r in read_metrics(wd) if "train/loss" in r]
  assert steps == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) for r in read_metrics(wd) if "train/loss" in r)
  # Resumed 4 -> 6 ends bit-identical to 6 straight steps (same data stream and rngs).
  config = ae_config(digits_dir)
  _, resumed = restore_full_state(config, wd)
  _, straight = restore_full_state(config, ae_run["straight"])
  assert int(resumed.step) == int(straight.step) == AE_STEPS
  for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Reconstruction grids: 4 originals over 4 reconstructions, 16x16 each, scaled x4.
  assert ae_run["first"]["recon"] == ["recon_0000004.png"]
  assert sorted(os.listdir(os.path.join(wd, "recon"))) == ["recon_0000004.png", "recon_0000006.png"]
  png = np.asarray(Image.open(os.path.join(wd, "recon", "recon_0000006.png")))
  expected = image_grid(np.zeros((8, 16, 16, 1)), ncols=4).shape[:2]
  assert png.shape[:2] == (expected[0] * 4, expected[1] * 4)
  with open(os.path.join(wd, stage1.ARCH_FILE)) as f:
    arch = json.load(f)
  assert arch["preset"] == "tiny_f4" and arch["image_shape"] == [16, 16, 1]
  assert arch["latent_shape"] == [4, 4, 4] and arch["kwargs"]["ch"] == 8
  with open(os.path.join(wd, stage1.SCALE_FILE)) as f:
    scale = json.load(f)
  assert scale["step"] == AE_STEPS and scale["num_examples"] == 1597
  assert any(
    r.get("latent/scale_factor") == pytest.approx(scale["scale_factor"]) for r in read_metrics(wd)
  )


def test_scale_factor_gives_unit_std_train_latents(ae_run, digits_dir):
  wd = ae_run["workdir"]
  module, state = restore_full_state(ae_config(digits_dir), wd)
  x, _ = pixels(digits_dir, "train")
  post = module.apply({"params": state.params}, jnp.asarray(x), method=AutoencoderKL.encode)
  z = np.asarray(post.mean, np.float64)
  expected = 1.0 / z.std()
  with open(os.path.join(wd, stage1.SCALE_FILE)) as f:
    stored = json.load(f)["scale_factor"]
  np.testing.assert_allclose(stored, expected, rtol=1e-4)
  codec = stage1.load_codec(wd)
  assert codec.scale_factor == stored
  src = latents.encode_source(
    codec, "jdiff_digits", split="train", data_dir=digits_dir, image_size=16
  )
  assert len(src) == 1597 and src[0]["image"].dtype == np.float32
  assert src[0]["image"].shape == (4, 4, 4) and src[0]["label"].dtype == np.int32
  np.testing.assert_allclose(src.latents.std(dtype=np.float64), 1.0, rtol=1e-4)
  np.testing.assert_allclose(src.latents, z * stored, rtol=1e-4, atol=1e-5)


def test_evaluate_autoencoder_matches_numpy(ae_run, digits_dir):
  wd = ae_run["workdir"]
  config = ae_config(digits_dir)
  results = aet.evaluate_autoencoder(config, wd)
  module, state = restore_full_state(config, wd)
  x, _ = pixels(digits_dir, "test")
  recon, _ = module.apply({"params": state.params}, jnp.asarray(x), sample_posterior=False)
  err = np.mean((np.clip(np.asarray(recon, np.float64), -1, 1) - x) ** 2, axis=(1, 2, 3))
  assert results["eval/examples"] == 200  # 200 = 5 batches of 40, exact
  np.testing.assert_allclose(results["eval/mse"], err.mean(), rtol=1e-5)
  np.testing.assert_allclose(results["eval/psnr"], np.mean(10 * np.log10(4 / err)), rtol=1e-5)
  assert read_metrics(wd)[-1]["eval/mse"] == pytest.approx(results["eval/mse"])


def test_load_codec_round_trip(ae_run, digits_dir):
  wd = ae_run["workdir"]
  codec = stage1.load_codec(wd)
  assert codec.image_shape == (16, 16, 1) and codec.latent_shape == (4, 4, 4)
  x, _ = pixels(digits_dir, "test", n=8)
  z = jax.jit(lambda x: latents.encode(codec, x))(x)
  assert z.shape == (8, 4, 4, 4)
  x_hat = np.asarray(jax.jit(lambda z: latents.decode(codec, z))(z))
  module, state = restore_full_state(ae_config(digits_dir), wd)
  own, _ = module.apply({"params": state.params}, jnp.asarray(x), sample_posterior=False)
  np.testing.assert_allclose(x_hat, np.clip(np.asarray(own), -1, 1), atol=1e-5)
  assert np.abs(x_hat).max() <= 1.0
  # An explicit scale factor overrides the stored one and cancels out in the round trip.
  codec3 = stage1.load_codec(wd, scale_factor=3.0)
  assert codec3.scale_factor == 3.0
  z3 = latents.encode(codec3, x)
  np.testing.assert_allclose(
    np.asarray(z3), np.asarray(z) * 3.0 / codec.scale_factor, rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(latents.decode(codec3, z3)), x_hat, atol=1e-5)


# ----------------------------------------------------------------------------- stage 2


def test_stage2_trains_samples_and_evaluates_in_pixels(ae_run, digits_dir, tmp_path):
  wd = str(tmp_path / "ldm")
  config = ldm_config(digits_dir, ae_run["workdir"])
  with Setup(config, wd) as setup:
    assert setup.image_shape == (4, 4, 4) and setup.pixel_shape == (16, 16, 1)
  diffusion.train_and_evaluate(config, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints")), key=int) == ["3", "6"]
  assert all(np.isfinite(r["train/loss"]) for r in read_metrics(wd))
  grid = np.asarray(Image.open(os.path.join(wd, "samples", "grid_0000006.png")))
  expected = image_grid(np.zeros((8, 16, 16, 1))).shape[:2]
  assert grid.shape[:2] == (expected[0] * 4, expected[1] * 4)

  diffusion.sample(config, wd)
  images = np.load(os.path.join(wd, "samples", "samples_ddim5_step6.npz"))["images"]
  assert images.shape == (8, 16, 16, 1)
  assert np.all(np.isfinite(images)) and np.abs(images).max() <= 1.0

  results = diffusion.evaluate(config, wd)
  assert results["eval/examples"] == 200 and np.isfinite(results["eval/loss"])
  assert "eval/bpd_bound" not in results  # the bound is for 8-bit pixels, not latents


# ----------------------------------------------------------------------------- errors


def test_missing_autoencoder_workdir_and_checkpoint(ae_run, digits_dir, tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="nope"):
    stage1.load_codec(missing)
  with pytest.raises(FileNotFoundError, match="nope"):
    Setup(ldm_config(digits_dir, missing), str(tmp_path / "ldm"))
  # An architecture file without checkpoints: the error names the checkpoint directory.
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(os.path.join(ae_run["workdir"], stage1.ARCH_FILE), empty)
  with pytest.raises(FileNotFoundError, match=str(empty / "checkpoints")):
    stage1.load_codec(str(empty))
  with pytest.raises(FileNotFoundError, match=stage1.ARCH_FILE):
    stage1.load_codec(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    aet.evaluate_autoencoder(ae_config(digits_dir), str(tmp_path / "fresh"))
  with pytest.raises(ValueError, match="scale_factor"):
    stage1.load_codec(ae_run["workdir"], scale_factor=-1.0)


def test_shape_mismatch_and_bad_configs(ae_run, digits_dir, tmp_path):
  with pytest.raises(ValueError, match=r"\(16, 16, 1\).*\(32, 32, 1\)"):
    Setup(
      ldm_config(digits_dir, ae_run["workdir"], **{"data.image_size": 32}), str(tmp_path / "ldm")
    )
  codec = stage1.load_codec(ae_run["workdir"])
  with pytest.raises(ValueError, match="trained on"):
    latents.encode_source(codec, "jdiff_digits", split="test", data_dir=digits_dir, image_size=32)
  wd = str(tmp_path / "ae")
  with pytest.raises(ValueError, match="perceptual_weight"):
    aet.train_autoencoder(ae_config(digits_dir, **{"loss.perceptual_weight": 0.1}), wd)
  with pytest.raises(ValueError, match="adversarial_weight"):
    aet.train_autoencoder(ae_config(digits_dir, **{"loss.adversarial_weight": 0.5}), wd)
  with pytest.raises(ValueError, match="'l3'"):
    aet.train_autoencoder(ae_config(digits_dir, **{"loss.recon_loss": "l3"}), wd)
  with pytest.raises(ValueError, match="multiple of"):  # 16x16 images, f = 32
    aet.train_autoencoder(
      ae_config(digits_dir, **{"autoencoder.overrides.ch_mult": (1, 1, 1, 1, 1, 1)}), wd
    )
  # Resuming a workdir with a different architecture fails loudly.
  with pytest.raises(ValueError, match=r"autoencoder.overrides.z_channels: null → 2"):
    aet.train_autoencoder(
      ae_config(digits_dir, **{"autoencoder.overrides.z_channels": 2}), ae_run["workdir"]
    )


# ----------------------------------------------------------------------------- sharding


def test_stage1_on_four_devices_matches_one(ae_run, digits_dir, tmp_path):
  """The batch-sharded step over 4 fake devices gives the 1-device parameters."""
  wd = str(tmp_path / "ae4")
  code = (
    "import sys; sys.path.insert(0, 'tests');"
    "import jax; assert jax.device_count() == 4;"
    "from test_latent import ae_config;"
    "from jdiff.runs import autoencoder as aet;"
    f"aet.train_autoencoder(ae_config({digits_dir!r}), {wd!r})"
  )
  run_python(["-c", code], devices=4)
  # Adam's normalised update magnifies float reassociation in near-zero gradients, so
  # compare what the step computes (the losses) and the outcome, not bitwise params.
  rows4 = [r for r in read_metrics(wd) if "train/loss" in r]
  rows1 = [r for r in read_metrics(ae_run["straight"]) if "train/loss" in r]
  assert [r["step"] for r in rows4] == [r["step"] for r in rows1] == [2, 4, 6]
  np.testing.assert_allclose(
    [r["train/loss"] for r in rows4], [r["train/loss"] for r in rows1], rtol=1e-4
  )
  with (
    open(os.path.join(wd, stage1.SCALE_FILE)) as f,
    open(os.path.join(ae_run["straight"], stage1.SCALE_FILE)) as g,
  ):
    np.testing.assert_allclose(
      json.load(f)["scale_factor"], json.load(g)["scale_factor"], rtol=1e-2
    )
  # A checkpoint written on 4 devices loads as a codec on 1.
  assert stage1.load_codec(wd).latent_shape == (4, 4, 4)


def test_autoencoder_modes_through_the_cli(ae_run, digits_dir):
  """--mode=eval_autoencoder on a stage-1 workdir, and --mode=train_autoencoder resuming it."""
  wd = str(ae_run["root"] / "ae_cli")
  shutil.copytree(ae_run["workdir"], wd)
  common = [
    "-m",
    "experiments.main",
    "--config=jdiff/configs/ae_digits.py",
    f"--workdir={wd}",
    f"--config.data.data_dir={digits_dir}",
    "--config.data.image_size=16",
    "--config.autoencoder.overrides.ch=8",
    "--config.autoencoder.overrides.num_groups=4",
    "--config.optim.schedule=constant",
    "--config.optim.warmup_steps=2",
    "--config.train.batch_size=8",
    "--config.train.log_every=1",
    "--config.eval.batch_size=40",
    "--config.eval.num_recon_images=4",
  ]
  run_python(common + ["--mode=train_autoencoder", f"--config.train.num_steps={AE_STEPS + 1}"])
  assert str(AE_STEPS + 1) in os.listdir(os.path.join(wd, "checkpoints"))
  assert read_metrics(wd)[-1]["step"] == AE_STEPS + 1
  run_python(common + ["--mode=eval_autoencoder"])
  row = read_metrics(wd)[-1]
  assert row["eval/examples"] == 200.0 and np.isfinite(row["eval/psnr"])
