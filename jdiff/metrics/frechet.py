"""The Frechet distance between two Gaussians, in float64 (the FID of Heusel et al., 2017)."""

from __future__ import annotations

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], as pytorch-fid.

  pytorch-fid computes `np.mean(act, axis=0), np.cov(act, rowvar=False)`.
  """
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {x.shape}")
  return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigh, clipped at 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr((sigma1 sigma2)^{1/2}) for covariance matrices, by symmetric eigendecompositions.

  sigma1 sigma2 is similar to s sigma2 s with s = sigma1^{1/2} (symmetric PSD), so the
  trace of its principal square root is the sum of the square roots of the eigenvalues
  of s sigma2 s. Unlike `scipy.linalg.sqrtm` of the non-symmetric product, this needs no
  complex arithmetic and no diagonal offset for singular (rank-deficient) covariances.
  """
  s = _sqrt_psd(np.asarray(sigma1, np.float64))
  m = s @ np.asarray(sigma2, np.float64) @ s
  w = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), in float64.

  Equal to pytorch-fid's `calculate_frechet_distance` (which uses `scipy.linalg.sqrtm`
  and, for a singular product, retries with 1e-6 added to the diagonals) up to the
  rounding of the matrix square root; see `trace_sqrt_product` for the method.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].

  Returns:
    The squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or mu1.ndim != 1:
    raise ValueError(f"means must be [D] of one shape, got {mu1.shape} and {mu2.shape}")
  d = mu1.shape[0]
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      f"covariances must be [{d}, {d}] to match the means, got {sigma1.shape} and {sigma2.shape}"
    )
  for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} has non-finite entries")
  diff = mu1 - mu2
  tr = float(np.trace(sigma1) + np.trace(sigma2))
  return float(diff @ diff + tr - 2.0 * trace_sqrt_product(sigma1, sigma2))
