"""Inception Score, improved precision/recall and KID on features held in memory."""

from __future__ import annotations

import numpy as np

from jdiff.metrics import streaming


def inception_score(probs, *, splits: int = 10) -> tuple[float, float]:
  """Inception Score (Salimans et al., 2016): mean and std over `splits` of
  exp(E_x KL(p(y|x) || p(y))), with p(y) the mean over each split.

  Args:
    probs: class probabilities [N, C] (rows sum to 1).
    splits: contiguous splits `probs[s * N // splits:(s + 1) * N // splits]`, as
      Salimans et al.'s code.

  Returns:
    (mean, std) over the splits.
  """
  p = np.asarray(probs, np.float64)
  if p.ndim != 2 or p.shape[0] < splits or splits < 1:
    raise ValueError(f"probs must be [N >= splits, C] with splits >= 1, got {p.shape}, {splits}")
  stats = streaming.accumulate_scores(
    streaming.init_scores(p.shape[1], splits),
    p,
    streaming.split_of(np.arange(len(p)), len(p), splits),
  )
  return streaming.score_from_stats(stats)


def pairwise_distances(a, b, *, batch_size: int = 1024) -> np.ndarray:
  """Euclidean distances [N, M] between rows of a [N, D] and b [M, D], in row batches
  (float64 accumulation of ||a||^2 + ||b||^2 - 2 a.b, clipped at 0)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  bb = np.sum(b * b, axis=1)
  out = np.empty((a.shape[0], b.shape[0]))
  for i in range(0, a.shape[0], batch_size):
    x = a[i : i + batch_size]
    d2 = np.sum(x * x, axis=1)[:, None] + bb[None, :] - 2.0 * (x @ b.T)
    out[i : i + batch_size] = np.sqrt(np.clip(d2, 0.0, None))
  return out


def _radii(x, k: int, batch_size: int) -> np.ndarray:
  """Distance of each row of x to its k-th nearest neighbour in x (itself excluded)."""
  r = np.empty(x.shape[0])
  for i in range(0, x.shape[0], batch_size):
    d = pairwise_distances(x[i : i + batch_size], x, batch_size=batch_size)
    r[i : i + batch_size] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return r


def _coverage(query, support, radii, batch_size: int) -> float:
  """Fraction of query rows inside at least one ball (support[j], radii[j])."""
  inside = 0
  for i in range(0, query.shape[0], batch_size):
    d = pairwise_distances(query[i : i + batch_size], support, batch_size=batch_size)
    inside += int(np.sum(np.any(d <= radii[None, :], axis=1)))
  return inside / query.shape[0]


def precision_recall(real, fake, *, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkaenniemi et al., 2019, k-NN manifolds).

  The real manifold is the union of balls around each real feature with radius its
  distance to its k-th nearest real neighbour; precision is the fraction of fakes inside
  it, recall the fraction of reals inside the fake manifold built the same way.

  Args:
    real: features [N, D]; fake: features [M, D]; both need more than k rows.
    k: neighbourhood size (3 in the paper).
    batch_size: rows per block of the pairwise distance matrix.

  Returns:
    (precision, recall) in [0, 1].
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  for name, x in (("real", real), ("fake", fake)):
    if x.ndim != 2 or x.shape[0] <= k:
      raise ValueError(f"{name} features must be [N > k={k}, D], got shape {x.shape}")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
  precision = _coverage(fake, real, _radii(real, k, batch_size), batch_size)
  recall = _coverage(real, fake, _radii(fake, k, batch_size), batch_size)
  return precision, recall


def kid(
  real, fake, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
  """Kernel Inception Distance (Binkowski et al., 2018): the unbiased MMD^2 with the
  polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets.

  Args:
    real: features [N, D]; fake: features [M, D].
    num_subsets: subsets drawn (without replacement within a subset).
    subset_size: rows per subset, capped at min(N, M).
    seed: of the subset draws (numpy).

  Returns:
    (mean, std) of the subsets' MMD^2 estimates.
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"features must be [N, D] and [M, D], got {real.shape} and {fake.shape}")
  m = min(subset_size, real.shape[0], fake.shape[0])
  if m < 2:
    raise ValueError(f"KID needs at least 2 rows per set, got {real.shape[0]}, {fake.shape[0]}")
  d = real.shape[1]
  rng = np.random.default_rng(seed)
  vals = []
  for _ in range(num_subsets):
    x = fake[rng.choice(fake.shape[0], m, replace=False)]
    y = real[rng.choice(real.shape[0], m, replace=False)]
    kxx, kyy, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = m * (m - 1)
    vals.append(
      (kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean()
    )
  return float(np.mean(vals)), float(np.std(vals))
