"""Reference statistics files: jdiff's own, pytorch-fid's and guided-diffusion's `.npz`.

* jdiff (`save_reference`): `mu` [D], `sigma` [D, D], optionally `features` [K, D] (a
  subset for precision/recall and KID), `count`, and `feature_net` (a string naming the
  network, checked on load).
* pytorch-fid (`python -m pytorch_fid --save-stats`): `mu`, `sigma`.
* guided-diffusion's reference batches (e.g. VIRTUAL_imagenet64_labeled.npz): `arr_0`
  uint8 images [N, H, W, 3], `mu`, `sigma` (pool3) and `mu_s`, `sigma_s` (spatial).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from jdiff.io import atomic_write


class Reference(NamedTuple):
  """Loaded reference: mu [D], sigma [D, D], features [K, D] or None, images or None
  (uint8 [N, H, W, C] of a guided-diffusion batch), feature_net ('' if unknown)."""

  mu: np.ndarray | None
  sigma: np.ndarray | None
  features: np.ndarray | None
  images: np.ndarray | None
  feature_net: str


def save_reference(
  path: str, mu, sigma, *, features=None, count: int, feature_net: str, extra=None
) -> str:
  """Writes jdiff's reference `.npz` atomically (replacing `path`); returns the path.

  `extra`: further scalars, e.g. the held-out split's scores `heldout_fd`, `heldout_is`.
  """
  arrays = dict(mu=np.asarray(mu), sigma=np.asarray(sigma), count=np.int64(count))
  arrays.update({k: np.float64(v) for k, v in (extra or {}).items()})
  arrays["feature_net"] = np.asarray(feature_net)
  if features is not None:
    arrays["features"] = np.asarray(features, np.float32)

  def write(p):
    with open(p, "wb") as f:
      np.savez(f, **arrays)

  return atomic_write(path, write, overwrite=True)


def load_reference(path: str, *, feature_net: str | None = None) -> Reference:
  """Reads a reference `.npz` (jdiff's, pytorch-fid's or guided-diffusion's).

  Args:
    path: the file.
    feature_net: if given and the file names its network, they must agree.

  Raises:
    FileNotFoundError: naming the path. ValueError: a file with neither `mu`/`sigma`
    nor `arr_0` images, or statistics of another feature network.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"reference statistics file {path!r} does not exist")
  with np.load(path) as f:
    keys = set(f.files)
    get = lambda k: np.asarray(f[k]) if k in keys else None  # noqa: E731
    mu, sigma, feats, images = get("mu"), get("sigma"), get("features"), get("arr_0")
    net = str(f["feature_net"]) if "feature_net" in keys else ""
  if (mu is None or sigma is None) and images is None:
    raise ValueError(
      f"{path}: expected 'mu' and 'sigma' (pytorch-fid / jdiff) or 'arr_0' images "
      f"(guided-diffusion reference batch); found keys {sorted(keys)}"
    )
  if feature_net and net and net != feature_net:
    raise ValueError(f"{path} holds statistics of feature network {net!r}, not {feature_net!r}")
  if images is not None and (images.ndim != 4 or images.dtype != np.uint8):
    raise ValueError(f"{path}: arr_0 must be uint8 images [N, H, W, C], got {images.shape}")
  return Reference(mu, sigma, feats, images, net)


def heldout_scores(path: str) -> dict[str, float]:
  """The `heldout_*` scalars of a jdiff reference file ({} for other files)."""
  with np.load(path) as f:
    return {k: float(f[k]) for k in f.files if k.startswith("heldout_")}
