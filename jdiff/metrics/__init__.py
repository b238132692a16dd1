"""Sample-quality metrics: pure functions on features and class probabilities.

FID (Heusel et al., 2017), Inception Score (Salimans et al., 2016), improved
precision and recall (Kynkaenniemi et al., 2019) and KID (Binkowski et al., 2018),
plus streaming feature statistics that merge across devices and processes.
"""

from jdiff.metrics.frechet import frechet_distance, gaussian_stats
from jdiff.metrics.reference import load_reference, save_reference
from jdiff.metrics.scores import (
  inception_score,
  kid,
  pairwise_distances,
  precision_recall,
)
from jdiff.metrics.streaming import (
  FeatureStats,
  ScoreStats,
  accumulate,
  accumulate_scores,
  init_scores,
  init_stats,
  mean_cov,
  merge,
  score_from_stats,
)

__all__ = [
  "FeatureStats",
  "ScoreStats",
  "accumulate",
  "accumulate_scores",
  "frechet_distance",
  "gaussian_stats",
  "inception_score",
  "init_scores",
  "init_stats",
  "kid",
  "load_reference",
  "mean_cov",
  "merge",
  "pairwise_distances",
  "precision_recall",
  "save_reference",
  "score_from_stats",
]
