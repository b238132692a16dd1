"""Streaming statistics: feature moments and Inception-Score sums, mergeable across shards.

Features arrive batch by batch (from any device or process); only float64 running sums
are kept, so 50,000 samples never sit in memory as features. Two partial statistics of
disjoint sample sets merge by addition (`merge`), e.g. across processes after gathering.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FeatureStats(NamedTuple):
  """Running moments of features [N, D].

  Attributes:
    count: float64 [] number of rows seen.
    total: float64 [D] sum of the rows.
    outer: float64 [D, D] sum of the rows' outer products x x^T.
  """

  count: np.ndarray
  total: np.ndarray
  outer: np.ndarray


def init_stats(dim: int) -> FeatureStats:
  """Empty statistics for D = `dim` features."""
  return FeatureStats(np.zeros((), np.float64), np.zeros(dim), np.zeros((dim, dim)))


def _rows(x, mask):
  x = np.asarray(x, np.float64)
  if mask is not None:
    x = x[np.asarray(mask, bool)]
  return x


def accumulate(stats: FeatureStats, features, mask=None) -> FeatureStats:
  """Adds the rows of features [B, D] (only those where mask [B] is True)."""
  x = _rows(features, mask)
  if x.ndim != 2 or x.shape[1] != stats.total.shape[0]:
    raise ValueError(f"features must be [B, {stats.total.shape[0]}], got shape {x.shape}")
  return FeatureStats(stats.count + x.shape[0], stats.total + x.sum(0), stats.outer + x.T @ x)


def merge(*parts):
  """Sums statistics (`FeatureStats` or `ScoreStats`) of disjoint sample sets."""
  return type(parts[0])(*(sum(np.asarray(p[i]) for p in parts) for i in range(len(parts[0]))))


def mean_cov(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (as `np.cov(x, rowvar=False)`)."""
  n = float(stats.count)
  if n < 2:
    raise ValueError(f"need at least 2 samples for a covariance, got {n:.0f}")
  mu = stats.total / n
  cov = (stats.outer - n * np.outer(mu, mu)) / (n - 1)
  return mu, (cov + cov.T) / 2


class ScoreStats(NamedTuple):
  """Per-split sums for the Inception Score of class probabilities p [N, C].

  Split s holds the samples floor(s N / S) <= i < floor((s + 1) N / S): contiguous, with
  the larger splits last when S does not divide N, as Salimans et al.'s code slices
  `preds[s * N // S:(s + 1) * N // S]` (StyleGAN2-ADA too). Per split s:

  Attributes:
    count: float64 [S] samples.
    p_sum: float64 [S, C] sum of p.
    plogp: float64 [S] sum over samples and classes of p log p.
  """

  count: np.ndarray
  p_sum: np.ndarray
  plogp: np.ndarray


def init_scores(num_classes: int, splits: int) -> ScoreStats:
  return ScoreStats(np.zeros(splits), np.zeros((splits, num_classes)), np.zeros(splits))


def split_of(index, num: int, splits: int) -> np.ndarray:
  """The split [B] of global sample indices [B] out of `num` samples (see `ScoreStats`).

  floor(s N / S) <= i  <=>  s N < (i + 1) S, so the last such s is ceil((i + 1) S / N) - 1.
  """
  return ((np.asarray(index, np.int64) + 1) * splits - 1) // num


def accumulate_scores(stats: ScoreStats, probs, split, mask=None) -> ScoreStats:
  """Adds class probabilities [B, C] whose samples belong to splits `split` [B]."""
  p = _rows(probs, mask)
  s = np.asarray(split, np.int64)
  if mask is not None:
    s = s[np.asarray(mask, bool)]
  splits = stats.count.shape[0]
  plogp = np.sum(p * np.log(np.clip(p, 1e-30, None)), axis=1)
  return ScoreStats(
    stats.count + np.bincount(s, minlength=splits),
    stats.p_sum + np.stack([p[s == k].sum(0) for k in range(splits)]),
    stats.plogp + np.bincount(s, weights=plogp, minlength=splits),
  )


def score_from_stats(stats: ScoreStats) -> tuple[float, float]:
  """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))).

  E_x KL = mean_x sum_y p log p - sum_y p(y) log p(y), with p(y) the split's mean.
  """
  if np.any(stats.count < 1):
    raise ValueError(f"every split needs samples, got counts {stats.count}")
  py = stats.p_sum / stats.count[:, None]
  kl = stats.plogp / stats.count - np.sum(py * np.log(np.clip(py, 1e-30, None)), axis=1)
  scores = np.exp(kl)
  return float(np.mean(scores)), float(np.std(scores))
