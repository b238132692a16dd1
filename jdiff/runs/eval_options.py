"""Validation of the sample-quality keys of `config.eval` (jdiff/runs/fid.py)."""

from __future__ import annotations

import os

from jdiff.ops.winograd import CONV_IMPLS

FEATURE_NETS = ("auto", "digits", "inception")


def validate_eval_config(eval_cfg) -> None:
  """Raises ValueError naming the bad `config.eval` key/value."""
  e = eval_cfg
  if e.feature_net not in FEATURE_NETS:
    raise ValueError(
      f"config.eval.feature_net must be one of {FEATURE_NETS}, got {e.feature_net!r}"
    )
  if e.inception_conv_impl not in CONV_IMPLS:
    raise ValueError(
      f"config.eval.inception_conv_impl must be one of {CONV_IMPLS}, got {e.inception_conv_impl!r}"
    )
  for key, minimum in (
    ("num_samples", 2),
    ("quality_samples", 0),
    ("is_splits", 1),
    ("pr_samples", 0),
    ("pr_k", 1),
    ("classifier_steps", 1),
  ):
    value = e[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"config.eval.{key} must be an integer >= {minimum}, got {value!r}")
  if e.quality_samples == 1:
    raise ValueError("config.eval.quality_samples must be 0 (off) or >= 2, got 1")
  for key in ("num_samples", "quality_samples"):
    if e[key] and e[key] < e.is_splits:
      raise ValueError(
        f"config.eval.{key}={e[key]} is fewer than config.eval.is_splits={e.is_splits}"
      )
  if e.samples_npz and not e.samples_npz.endswith(".npz"):
    raise ValueError(f"config.eval.samples_npz must be a .npz file, got {e.samples_npz!r}")
  if e.ref_stats and not e.ref_stats.endswith(".npz"):
    raise ValueError(f"config.eval.ref_stats must be a .npz file, got {e.ref_stats!r}")
  w = e.inception_weights
  if w and not w.endswith((".pth", ".pt", ".npz", ".safetensors")):
    raise ValueError(
      f"config.eval.inception_weights={w!r}: expected a .pth, .npz or .safetensors file"
    )
  if w and not os.path.exists(w):
    raise ValueError(f"config.eval.inception_weights={w!r}: file not found")
