"""Reference statistics files: jdiff's own, pytorch-fid's and guided-diffusion's `.npz`.

* jdiff (`save_reference`): `mu` [D], `sigma` [D, D], optionally `features` [K, D] (a
  subset for precision/recall and KID), `count`, and `feature_net` (a string naming the
  network, checked on load).
* pytorch-fid (`python -m pytorch_fid --save-stats`): `mu`, `sigma`.
* guided-diffusion's reference batches (e.g. VIRTUAL_imagenet64_labeled.npz): `arr_0`
  uint8 images [N, H, W, 3], `mu`, `sigma` (pool3) and `mu_s`, `sigma_s` (spatial).

Statistics from other code are only comparable where its network sees what jdiff's does.
guided-diffusion's (and TTUR's) come from TensorFlow's Inception graph, which takes uint8
pixels, resizes with TF's bilinear kernel and scales by (x - 128) / 128; jdiff follows
pytorch-fid. So `load_reference` drops `mu`/`sigma` where `arr_0` images are there to
recompute them from with jdiff's network, and warns where only foreign statistics are.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
from absl import logging

from jdiff.io import atomic_write


class Reference(NamedTuple):
  """Loaded reference: mu [D], sigma [D, D], features [K, D] or None, images or None
  (uint8 [N, H, W, C] of a guided-diffusion batch), feature_net ('' if unknown).

  mu and sigma are None where the caller must compute them from `images`."""

  mu: np.ndarray | None
  sigma: np.ndarray | None
  features: np.ndarray | None
  images: np.ndarray | None
  feature_net: str
  count: int | None = None  # examples the statistics were computed from (jdiff's files)


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

  Returns:
    The reference; with `arr_0` images, mu and sigma None (the file's own were computed
    by TensorFlow's graph; see the module docstring).

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
    count = int(f["count"]) if "count" in keys else None
  if (mu is None or sigma is None) and images is None:
    raise ValueError(
      f"{path}: expected 'mu' and 'sigma' (pytorch-fid / jdiff) or 'arr_0' images "
      f"(guided-diffusion reference batch); found keys {sorted(keys)}"
    )
  if feature_net and net and net != feature_net:
    raise ValueError(f"{path} holds statistics of feature network {net!r}, not {feature_net!r}")
  if images is not None and (images.ndim != 4 or images.dtype != np.uint8):
    raise ValueError(f"{path}: arr_0 must be uint8 images [N, H, W, C], got {images.shape}")
  if images is not None:
    if mu is not None:
      logging.info(
        "%s: computing the reference statistics from its %d arr_0 images with jdiff's "
        "feature network; the file's mu/sigma (TensorFlow's Inception graph) are not used",
        path,
        len(images),
      )
    mu = sigma = None
  elif "mu_s" in keys:
    logging.warning(
      "%s: guided-diffusion statistics without arr_0 images; its mu/sigma come from "
      "TensorFlow's Inception graph (uint8 input, TF's bilinear resize, (x - 128) / 128), "
      "not from jdiff's network (pytorch-fid's), so the FID against them differs from "
      "the FID against jdiff's own; use the reference batch with arr_0, or --mode=fid_ref",
      path,
    )
  elif not net:
    logging.warning(
      "%s: mu/sigma of another implementation, taken as pytorch-fid's (the network jdiff "
      "follows); statistics of TensorFlow's Inception graph (TTUR, guided-diffusion) "
      "differ from jdiff's and give another FID",
      path,
    )
  return Reference(mu, sigma, feats, images, net, count)


def heldout_scores(path: str) -> dict[str, float]:
  """The `heldout_*` scalars of a jdiff reference file ({} for other files)."""
  with np.load(path) as f:
    return {k: float(f[k]) for k in f.files if k.startswith("heldout_")}
