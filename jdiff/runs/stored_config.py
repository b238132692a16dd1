"""The config a workdir was created with (`<workdir>/config.json`), compared on every start.

The rule for what may change between runs on one workdir: a key is *unsafe* when the
checkpoint depends on it, i.e. when it shapes the saved state (the architecture and the
optimiser's state layout) or defines the training stream that the saved iterator position
indexes (dataset, resolution, augmentation, split, seed, global batch, the latent codec).
So is the meaning of the network's output (objective, prediction kind).
`UNSAFE` lists them: a section name stands for every key under it. Changing an unsafe key
is an error listing every changed unsafe key as `old → new`; every other key (steps,
learning rate, logging, checkpointing, sampling, evaluation, diffusion loss options, ...) is
read afresh at every start and its changes are logged. `data.data_dir` is a location, not
content, and is safe.

A key that the stored config lacks (a workdir created before the key existed) reads as its
value in `jdiff/configs/default.py`, the value the code then used: a new option left at its
default changes nothing, and set otherwise it is a change like any other.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
from absl import logging

from jdiff.configs import default
from jdiff.training.writers import write_json

CONFIG_FILE = "config.json"

UNSAFE = (
  # what the saved network's output means (sampled as another kind, it is silently wrong)
  "objective",
  "diffusion.prediction",
  # shapes of the saved state
  "model",
  "autoencoder",
  "conditional",
  "text",
  "optim.optimizer",
  # the stream the saved iterator position indexes
  "data.name",
  "data.image_size",
  "data.random_flip",
  "data.train_split",
  "latent",
  "seed",
  "train.batch_size",
)


class ConfigChangedError(ValueError):
  """A resumed run's config changes keys that the workdir's checkpoints depend on."""


def flatten(config) -> dict[str, Any]:
  """{'model.ch': 8, ...}: the config's leaves as JSON values (tuples become lists)."""
  out = {}

  def walk(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      name = f"{prefix}{key}"
      if hasattr(value, "keys"):
        walk(value, f"{name}.")
      else:
        out[name] = json.loads(json.dumps(value, default=str))

  walk(config, "")
  return out


def is_unsafe(key: str) -> bool:
  return any(key == u or key.startswith(f"{u}.") for u in UNSAFE)


@functools.cache
def _defaults() -> dict[str, Any]:
  return flatten(default.get_config())


def read(workdir: str, current: dict[str, Any]) -> dict[str, Any]:
  """The workdir's stored config, flat, with each key of `current` (flat) that it lacks read
  as its `default.py` value (see the module docstring)."""
  with open(os.path.join(os.path.abspath(workdir), CONFIG_FILE), encoding="utf-8") as f:
    stored = json.load(f)
  added = {k: v for k, v in _defaults().items() if k in current and k not in stored}
  return {**added, **stored}


def changed_keys(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{key: (old, new)} of every key whose value differs (a missing key reads as absent)."""
  missing = "<absent>"
  return {
    k: (old.get(k, missing), new.get(k, missing))
    for k in sorted(set(old) | set(new))
    if old.get(k, missing) != new.get(k, missing)
  }


def _describe(changes: dict) -> str:
  return ", ".join(
    f"config.{k}: {json.dumps(a)} → {json.dumps(b)}" for k, (a, b) in changes.items()
  )


def has_checkpoints(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a committed step (a directory named by a number)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def check_or_store(config, workdir: str, *, write: bool) -> None:
  """Compares `config` with the workdir's stored one; stores it if there is none.

  The stored config binds only while the workdir holds a checkpoint (the config of a run
  that failed before its first save, or whose steps were all set aside, is replaced).

  Args:
    config: the run's config.
    workdir: the run's directory.
    write: whether this run may create the file (a training run's process 0, holding the
      workdir's lock); read-only modes only compare.

  Raises:
    ConfigChangedError: an unsafe key differs from the stored config (all of them are
      listed, `old → new`).
  """
  path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
  current = flatten(config)
  if not os.path.isfile(path) or not has_checkpoints(workdir):
    if write and jax.process_index() == 0:
      write_json(path, current)
    return
  changes = changed_keys(read(workdir, current), current)
  unsafe = {k: v for k, v in changes.items() if is_unsafe(k)}
  if unsafe:
    raise ConfigChangedError(
      f"the config differs from the one {workdir} was created with ({path}) in key(s) its "
      f"checkpoints depend on: {_describe(unsafe)}; revert them or use a fresh --workdir"
    )
  if changes:
    logging.info("config changes since %s was created (safe): %s", workdir, _describe(changes))


DATASET_FILE = "dataset.json"


def store_dataset(workdir: str, config, image_shape, num_classes: int | None) -> None:
  """Records the dataset's image shape and class count in the workdir (process 0), so that
  modes that read no data (sample, edit, fid on stored statistics) need no dataset."""
  if jax.process_index() != 0:
    return
  record = {
    "data.name": config.data.name,
    "data.image_size": config.data.image_size,
    "image_shape": [int(n) for n in image_shape],
    "num_classes": num_classes,
  }
  path = os.path.join(workdir, DATASET_FILE)
  if _read_json(path) != record:
    write_json(path, record)


def read_dataset(workdir: str, config) -> tuple[tuple[int, int, int], int | None] | None:
  """(image shape, class count) of the workdir's record, or None if it has none for
  `config.data` (name and image size)."""
  r = _read_json(os.path.join(workdir, DATASET_FILE))
  if r is None or (r["data.name"], r["data.image_size"]) != (
    config.data.name,
    config.data.image_size,
  ):
    return None
  return tuple(r["image_shape"]), r["num_classes"]


def _read_json(path: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
