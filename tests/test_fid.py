"""--mode=fid / fid_ref and the quality score at the end of training, end to end on the
tiny config; sharded generation on 4 simulated devices against 1 device."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import main_args, run_python
from PIL import Image

from jdiff import metrics
from jdiff.configs import default, tiny
from jdiff.models.classifier import SmallClassifier
from jdiff.runs import feature_nets, fid, validate
from jdiff.training.writers import save_image_grid

# Small but real: the digits classifier (fewer steps than the default, its own cache key),
# 24 samples in 3 global batches (the last one padded), features kept for P/R and KID.
EVAL = {
  "eval.classifier_steps": 60,
  "eval.num_samples": 20,
  "eval.is_splits": 2,
  "eval.pr_samples": 20,
  "sample.batch_size": 8,
}


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _config(digits_dir, **overrides):
  c = tiny.get_config()
  c.data.data_dir = digits_dir
  for key, value in {**EVAL, **overrides}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory):
  """The tiny config trained through the CLI (6 steps), scoring 16 samples at the end."""
  workdir = str(tmp_path_factory.mktemp("fid_tiny"))
  run_python(main_args("train", workdir, digits_dir, **EVAL, **{"eval.quality_samples": 16}))
  return workdir


def test_train_ends_with_quality(trained):
  row = [r for r in _rows(trained) if "quality/fd" in r][-1]
  assert row["step"] == 6 and row["quality/num_samples"] == 16
  assert row["quality/fd"] > 0 and 1 <= row["quality/is"] <= 10
  # the held-out digits score far better than a 6-step model
  assert 0 < row["quality/heldout_fd"] < row["quality/fd"]
  assert 0.5 < row["quality/classifier_accuracy"] <= 1


def test_fid_sharded_equals_one_device(trained, digits_dir):
  """Same statistics (mu, sigma of the sample features) and scores on 4 devices as on 1."""
  stats = {}
  for devices in (1, 4):
    run_python(main_args("fid", trained, digits_dir, **EVAL), devices=devices)
    path = os.path.join(trained, "quality", "stats_ddim5_n20_step6.npz")
    stats[devices] = metrics.load_reference(path)
  np.testing.assert_allclose(stats[4].mu, stats[1].mu, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats[4].sigma, stats[1].sigma, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats[4].features, stats[1].features, rtol=1e-4, atol=1e-5)
  rows = [
    r for r in _rows(trained) if "quality/num_samples" in r and r["quality/num_samples"] == 20
  ]
  assert len(rows) == 2
  for key in ("fd", "is", "precision", "recall"):
    np.testing.assert_allclose(rows[1][f"quality/{key}"], rows[0][f"quality/{key}"], rtol=1e-3)


def test_score_npz_and_reference(trained, digits_dir, tmp_path):
  """An .npz of the held-out digits (uint8 arr_0) scores what the reference file records
  for them; the FD of the train split against its own statistics is 0."""
  c = _config(digits_dir)
  num, images_fn = fid.split_images(c, "test")
  u8 = np.round((images_fn(np.arange(num)) + 1) * 127.5).astype(np.uint8)
  npz = str(tmp_path / "heldout.npz")
  np.savez(npz, arr_0=u8)
  got = fid.fid(_config(digits_dir, **{"eval.samples_npz": npz}), trained)
  # guided-diffusion's layout: TF statistics beside arr_0 images; jdiff scores the images
  adm = str(tmp_path / "VIRTUAL_heldout.npz")
  np.savez(adm, arr_0=u8, mu=np.zeros(128), sigma=np.eye(128), mu_s=np.zeros(9), sigma_s=np.eye(9))
  same = fid.fid(_config(digits_dir, **{"eval.samples_npz": npz, "eval.ref_stats": adm}), trained)
  # The FD of a rank-deficient covariance (20 images, 128 features) against itself is the
  # sqrt of eigenvalue noise, ~1e-6 here; scoring the file's mu=0, sigma=I instead gives ~1e2.
  assert abs(same["fd"]) < 1e-5 * got["fd"], (same["fd"], got["fd"])
  ref_path = fid.fid_ref(c, trained)
  held = metrics.reference.heldout_scores(ref_path)
  np.testing.assert_allclose(got["fd"], held["heldout_fd"], rtol=1e-4)
  np.testing.assert_allclose(got["is"], held["heldout_is"], rtol=1e-4)
  ref = metrics.load_reference(ref_path)
  assert ref.features.shape == (20, 128)
  # rank-deficient covariance (20 < 128 features): the sqrt of ~1e-13 eigenvalue noise
  assert abs(metrics.frechet_distance(ref.mu, ref.sigma, ref.mu, ref.sigma)) < 1e-6 * np.trace(
    ref.sigma
  )


def test_cached_reference_with_too_few_features_is_recomputed(trained, digits_dir, tmp_path):
  """A cached reference written under eval.pr_samples=0 (another run on the same data) is
  rewritten when a run asks for 20 feature rows, so precision/recall are not dropped."""
  path = fid.fid_ref(_config(digits_dir, **{"eval.pr_samples": 0}), trained)
  assert len(metrics.load_reference(path).features) == 0
  c = _config(digits_dir)
  num, images_fn = fid.split_images(c, "test")
  npz = str(tmp_path / "heldout.npz")
  np.savez(npz, arr_0=np.round((images_fn(np.arange(num)) + 1) * 127.5).astype(np.uint8))
  got = fid.fid(_config(digits_dir, **{"eval.samples_npz": npz}), trained)
  assert 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1
  assert metrics.load_reference(path).features.shape == (20, 128)


def test_config_errors(trained, digits_dir, tmp_path):
  # The config's own rules (feature_net, num_samples, the files' names): tests/test_validate.py.
  c = _config(digits_dir, **{"eval.feature_net": "inception"})
  with pytest.raises(ValueError, match="config.eval.inception_weights is empty"):
    fid.fid(c, trained)
  c = _config(digits_dir, **{"eval.ref_stats": str(tmp_path / "none.npz")})
  with pytest.raises(FileNotFoundError, match="none.npz.*--mode=fid_ref"):
    fid.fid(c, trained)


def test_samples_score_as_their_pngs(tmp_path, monkeypatch):
  """Float samples (off the 8-bit grid, some outside [-1, 1]) give the feature network's
  exact features and probabilities of their PNG (jdiff's writer, read back with PIL), of
  its uint8 pixels and of the [-1, 1] floats the data pipeline makes of them."""
  module = SmallClassifier(width=4, features=8)
  params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]

  def apply(p, images):
    feats, logits = module.apply({"params": p}, images)
    return feats, jax.nn.softmax(logits)

  fake = feature_nets.FeatureNet("random_digits", apply, params, 8, 10, {})
  monkeypatch.setattr(feature_nets, "digits_classifier", lambda config, shape: fake)
  net = feature_nets.load_feature_net(_config("unused"), (16, 16, 1))
  x = np.random.default_rng(0).uniform(-1.2, 1.2, (6, 16, 16, 1)).astype(np.float32)
  grid = np.asarray(Image.open(save_image_grid(str(tmp_path / "s.png"), x, scale=1, ncols=6)))
  u8 = np.stack([grid[1:17, 1 + 17 * k : 17 + 17 * k, None] for k in range(6)])
  run = jax.jit(net.apply)
  want = run(params, x)
  for png in (u8, u8 / np.float32(127.5) - 1, u8.astype(np.float32) * np.float32(2 / 255) - 1):
    for got, w in zip(run(params, png), want):
      np.testing.assert_array_equal(got, w)
  assert not np.allclose(apply(params, x)[0], want[0], rtol=1e-3)  # the quantisation shows


def test_to_pixels_keeps_real_images_and_nan():
  """Real images ([-1, 1] floats of uint8 pixels, either formula) pass unchanged."""
  u8 = np.arange(256, dtype=np.uint8)
  pipeline = u8.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
  for x in (u8, pipeline, u8 / np.float32(127.5) - np.float32(1)):
    np.testing.assert_array_equal(feature_nets.to_pixels(x), pipeline)
  np.testing.assert_array_equal(feature_nets.to_pixels(np.float32([-7, 3, 0.999])), [-1, 1, 1])
  assert np.isnan(feature_nets.to_pixels(np.float32([np.nan]))).all()


def test_inception_conv_impl_auto(monkeypatch):
  """config.eval.inception_conv_impl defaults to 'auto': Winograd on XLA:CPU, XLA's
  convolutions on a GPU or TPU; an explicit choice stays."""
  c = default.get_config()
  assert c.eval.inception_conv_impl == "auto"
  validate.validate(c)
  assert jax.default_backend() == "cpu"
  assert feature_nets.inception_conv_impl(c) == "winograd"
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
    assert feature_nets.inception_conv_impl(c) == "xla"
  c.eval.inception_conv_impl = "winograd"
  assert feature_nets.inception_conv_impl(c) == "winograd"
  c.eval.inception_conv_impl = "cudnn"
  with pytest.raises(ValueError, match="config.eval.inception_conv_impl must be one of"):
    validate.validate(c)
