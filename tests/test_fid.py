"""--mode=fid / fid_ref and the quality score at the end of training, end to end on the
tiny config; sharded generation on 4 simulated devices against 1 device."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jdiff import metrics
from jdiff.configs import tiny
from jdiff.runs import fid
from tests.conftest import main_args, run_python

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


def test_config_errors(trained, digits_dir, tmp_path):
  # The config's own rules (feature_net, num_samples, the files' names): tests/test_validate.py.
  c = _config(digits_dir, **{"eval.feature_net": "inception"})
  with pytest.raises(ValueError, match="config.eval.inception_weights is empty"):
    fid.fid(c, trained)
  c = _config(digits_dir, **{"eval.ref_stats": str(tmp_path / "none.npz")})
  with pytest.raises(FileNotFoundError, match="none.npz.*--mode=fid_ref"):
    fid.fid(c, trained)
