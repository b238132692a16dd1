"""jdiff.metrics against pytorch-fid, closed forms and independent computations."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jdiff import metrics
from jdiff.metrics import reference, streaming

fid_score = pytest.importorskip("pytorch_fid.fid_score")


def _random_stats(rng, d, n):
  x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
  return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("d,n", [(8, 50), (64, 300), (64, 40)])
def test_frechet_distance_matches_pytorch_fid(d, n):
  """Random statistics, full rank and (n < d) rank-deficient covariances."""
  rng = np.random.default_rng(d + n)
  mu1, s1 = _random_stats(rng, d, n)
  mu2, s2 = _random_stats(rng, d, n)
  ours = metrics.frechet_distance(mu1, s1, mu2, s2)
  ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(ours, ref, rtol=1e-6 if n > d else 1e-4)


def test_frechet_distance_closed_form():
  """Diagonal Gaussians: sum (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2; zero for equal stats."""
  rng = np.random.default_rng(0)
  m1, m2, v1, v2 = (
    rng.normal(size=5),
    rng.normal(size=5),
    rng.uniform(1, 2, 5),
    rng.uniform(1, 2, 5),
  )
  want = np.sum((m1 - m2) ** 2 + (np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(metrics.frechet_distance(m1, np.diag(v1), m2, np.diag(v2)), want)
  assert abs(metrics.frechet_distance(m1, np.diag(v1), m1, np.diag(v1))) < 1e-10
  with pytest.raises(ValueError, match="covariances must be"):
    metrics.frechet_distance(m1, np.eye(4), m2, np.eye(5))


def test_streaming_equals_one_shot():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(103, 7)) * 3 + 5
  mask = rng.uniform(size=103) > 0.2
  parts = [
    metrics.accumulate(metrics.init_stats(7), x[i : i + 20], mask[i : i + 20])
    for i in range(0, 103, 20)
  ]
  mu, cov = metrics.mean_cov(metrics.merge(*parts))
  mu_ref, cov_ref = metrics.gaussian_stats(x[mask])  # np.mean / np.cov as pytorch-fid
  np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
  np.testing.assert_allclose(cov, cov_ref, rtol=1e-10, atol=1e-12)


def _is_reference(p, splits):
  """Salimans et al.'s code (openai/improved-gan inception_score/model.py), its slices
  `preds[(i * N // splits):((i + 1) * N // splits)]` included."""
  scores = []
  for i in range(splits):
    part = p[i * len(p) // splits : (i + 1) * len(p) // splits]
    py = part.mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_streaming_and_reference():
  rng = np.random.default_rng(2)
  p = rng.dirichlet(np.full(6, 0.3), size=120)
  want = _is_reference(p, 4)
  np.testing.assert_allclose(metrics.inception_score(p, splits=4), want, rtol=1e-10)
  st = metrics.init_scores(6, 4)
  for i in range(0, 120, 50):  # batches that straddle the splits
    idx = np.arange(i, min(i + 50, 120))
    st = metrics.accumulate_scores(st, p[idx], streaming.split_of(idx, 120, 4))
  np.testing.assert_allclose(metrics.score_from_stats(st), want, rtol=1e-10)
  # one-hot predictions spread evenly over K classes score K; identical ones score 1
  np.testing.assert_allclose(metrics.inception_score(np.eye(6)[np.arange(60) % 6], splits=2)[0], 6)
  np.testing.assert_allclose(metrics.inception_score(np.full((10, 6), 1 / 6), splits=1)[0], 1)


@pytest.mark.parametrize("n,splits", [(10, 3), (23, 4), (7, 7)])
def test_inception_score_splits_when_n_is_not_divisible(n, splits):
  """N = 10, 3 splits: the reference's splits hold 3, 3, 4 samples (not 4, 3, 3)."""
  p = np.random.default_rng(n).dirichlet(np.full(5, 0.5), size=n)
  want = _is_reference(p, splits)
  np.testing.assert_allclose(metrics.inception_score(p, splits=splits), want, rtol=1e-10)
  split = streaming.split_of(np.arange(n), n, splits)
  sizes = [(i + 1) * n // splits - i * n // splits for i in range(splits)]
  np.testing.assert_array_equal(np.bincount(split, minlength=splits), sizes)
  st = metrics.init_scores(5, splits)
  for i in range(0, n, 3):  # streamed in batches of 3
    st = metrics.accumulate_scores(st, p[i : i + 3], split[i : i + 3])
  np.testing.assert_allclose(metrics.score_from_stats(st), want, rtol=1e-10)


def test_precision_recall_known_clouds():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(200, 5))
  assert metrics.precision_recall(real, real) == (1.0, 1.0)
  assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)
  # half the fakes are real points (inside), half far away (outside): precision 1/2
  fake = np.concatenate([real[:50], rng.normal(size=(50, 5)) + 100.0])
  assert metrics.precision_recall(real, fake, batch_size=17)[0] == 0.5
  np.testing.assert_allclose(
    metrics.pairwise_distances(real[:7], fake[:9], batch_size=3),
    np.linalg.norm(real[:7, None] - fake[None, :9], axis=-1),
    rtol=1e-6,
    atol=1e-6,
  )


def test_kid_unbiased_mmd():
  """One subset holding every row: the unbiased MMD^2 written out pair by pair."""
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.5

  def k(a, b):
    return (a @ b / 3 + 1) ** 3

  n = 12
  xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n**2
  got, std = metrics.kid(y, x, num_subsets=3, subset_size=n)  # (real, fake)
  np.testing.assert_allclose(got, xx + yy - 2 * xy, rtol=1e-10)
  assert std < 1e-12  # every subset is the whole set


def _load_logged(caplog, path):
  caplog.clear()
  with caplog.at_level(logging.INFO):
    ref = metrics.load_reference(str(path))
  return ref, " ".join(r.getMessage() for r in caplog.records if str(path) in r.getMessage())


def test_foreign_statistics_are_recomputed_or_flagged(tmp_path, caplog):
  """guided-diffusion's mu/sigma come from TensorFlow's graph: with arr_0 images they are
  dropped (the caller computes jdiff's own), without them the log says they differ."""
  rng = np.random.default_rng(6)
  mu, sigma = rng.normal(size=4), np.eye(4)
  imgs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  gd = tmp_path / "VIRTUAL_ref.npz"  # guided-diffusion's reference batch layout
  np.savez(gd, arr_0=imgs, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
  ref, log = _load_logged(caplog, gd)
  np.testing.assert_array_equal(ref.images, imgs)
  assert ref.mu is None and ref.sigma is None
  assert "from its 3 arr_0 images" in log and "are not used" in log
  stats_only = tmp_path / "VIRTUAL_stats.npz"
  np.savez(stats_only, mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma)
  ref, log = _load_logged(caplog, stats_only)
  np.testing.assert_array_equal(ref.mu, mu)
  assert "TensorFlow's Inception graph" in log and "differs" in log
  pf = tmp_path / "pytorch_fid.npz"
  np.savez(pf, mu=mu, sigma=sigma)
  assert "another implementation" in _load_logged(caplog, pf)[1]
  ours = metrics.save_reference(str(tmp_path / "ours.npz"), mu, sigma, count=5, feature_net="a")
  assert _load_logged(caplog, ours)[1] == ""


def test_reference_files(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=4), np.eye(4)
  pf = tmp_path / "pytorch_fid.npz"  # what `python -m pytorch_fid --save-stats` writes
  np.savez(pf, mu=mu, sigma=sigma)
  ref = metrics.load_reference(str(pf), feature_net="inception_fid")
  np.testing.assert_array_equal(ref.mu, mu)
  assert ref.features is None and ref.feature_net == ""
  ours = metrics.save_reference(
    str(tmp_path / "ours.npz"),
    mu,
    sigma,
    features=np.ones((5, 4)),
    count=5,
    feature_net="a",
    extra={"heldout_fd": 1.5},
  )
  assert metrics.load_reference(ours).features.shape == (5, 4)
  assert reference.heldout_scores(ours) == {"heldout_fd": 1.5}
  with pytest.raises(ValueError, match="feature network 'a', not 'b'"):
    metrics.load_reference(ours, feature_net="b")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    metrics.load_reference(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "bad.npz", x=mu)
  with pytest.raises(ValueError, match="expected 'mu' and 'sigma'"):
    metrics.load_reference(str(tmp_path / "bad.npz"))
