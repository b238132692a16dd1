"""The stage-1 workdir on disk, and the frozen codec read back from it.

Stage 1 (`jdiff.runs.autoencoder.train_autoencoder`) leaves in its workdir

  autoencoder.json     the architecture: preset name, AutoencoderKL kwargs, image and
                       latent shapes (written before the first step);
  checkpoints/<step>/  `jdiff.training.Checkpointer` checkpoints of an `AutoencoderState`
                       {step, params, opt_state} with the data iterator;
  latent_scale.json    {"scale_factor": 1 / std, ...} of the train split's latents
                       (written at the end of stage 1).

Stage 2 (a diffusion config with `config.latent.autoencoder_workdir` set) calls
`load_codec`, which reads the architecture, restores only the `params` field through
the same `Checkpointer` and returns a `jdiff.data.latents.LatentCodec`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.data.latents import LatentCodec, latent_shape_of
from jdiff.models.autoencoder import AutoencoderKL, make_autoencoder
from jdiff.models.layers import DTYPES
from jdiff.training import sharding as sharding_lib
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.lock import lock_if_free
from jdiff.training.writers import write_json

PyTree = Any

ARCH_FILE = "autoencoder.json"
SCALE_FILE = "latent_scale.json"
CKPT_DIR = "checkpoints"  # of every workdir, diffusion and stage 1 alike


# ----------------------------------------------------------------------------- architecture file


def module_kwargs(module: AutoencoderKL) -> dict[str, Any]:
  """The AutoencoderKL fields as JSON-able values (dtype by name)."""
  out = {}
  for f in dataclasses.fields(AutoencoderKL):
    if f.name in ("parent", "name"):
      continue
    value = getattr(module, f.name)
    if f.name == "dtype":
      value = next((k for k, v in DTYPES.items() if v == value), None)
      if value is None:
        raise ValueError(
          f"unsupported autoencoder dtype {module.dtype!r}; use one of {sorted(DTYPES)}"
        )
    elif isinstance(value, (tuple, list)):
      value = [int(v) for v in value]
    out[f.name] = value
  return out


def architecture_record(preset: str, module: AutoencoderKL, image_shape) -> dict:
  """The content of `autoencoder.json`."""
  return {
    "preset": preset,
    "kwargs": module_kwargs(module),
    "image_shape": [int(d) for d in image_shape],
    "latent_shape": list(latent_shape_of(module, image_shape)),
  }


def check_or_write_architecture(workdir: str, record: dict) -> None:
  """Writes `workdir/autoencoder.json` (process 0), or checks that a resumed run's matches."""
  path = os.path.join(workdir, ARCH_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
    if stored != json.loads(json.dumps(record)):
      raise ValueError(
        f"{path} describes another autoencoder ({stored}) than the config "
        f"({record}); use a fresh --workdir"
      )
  elif jax.process_index() == 0:
    write_json(path, record)


def _read_json(workdir: str, filename: str, what: str, hint: str) -> dict:
  """Reads a JSON file that stage 1 writes into its workdir; FileNotFoundError if missing."""
  path = os.path.join(os.path.abspath(workdir), filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} {path}: {hint}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_architecture(workdir: str) -> tuple[AutoencoderKL, tuple, tuple]:
  """(module, image_shape, latent_shape) from `workdir/autoencoder.json`."""
  record = _read_json(
    workdir,
    ARCH_FILE,
    "autoencoder architecture file",
    f"is {workdir!r} the workdir of a stage-1 run (python -m "
    "experiments.main --mode=train_autoencoder)?",
  )
  kwargs = dict(record["kwargs"])
  kwargs["dtype"] = DTYPES[kwargs.get("dtype") or "float32"]
  kwargs["ch_mult"] = tuple(kwargs["ch_mult"])
  module = make_autoencoder(record["preset"], **kwargs)
  image_shape = tuple(int(d) for d in record["image_shape"])
  return module, image_shape, latent_shape_of(module, image_shape)


def write_scale_factor(workdir: str, record: dict) -> str:
  """Writes `workdir/latent_scale.json` ({'scale_factor': ..., ...}); process 0 calls it."""
  return write_json(os.path.join(workdir, SCALE_FILE), record)


def read_scale_factor(workdir: str) -> float:
  return float(
    _read_json(
      workdir,
      SCALE_FILE,
      "latent scale file",
      "stage 1 writes it when it finishes (rerun --mode=train_autoencoder to completion), "
      "or set config.latent.scale_factor > 0",
    )["scale_factor"]
  )


# ----------------------------------------------------------------------------- parameters


def abstract_params(module: AutoencoderKL, image_shape, sharding=None) -> PyTree:
  """ShapeDtypeStructs of the module's `params` (with `sharding` if given)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(
    lambda x: module.init(jax.random.key(0), x, sample_posterior=False)["params"], x
  )
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def restore_params(
  checkpointer: Checkpointer,
  module: AutoencoderKL,
  image_shape,
  *,
  sharding=None,
  step: int | None = None,
) -> tuple[PyTree, int]:
  """Restores only `params` of a stage-1 checkpoint (the optimiser state is not read).

  Args:
    checkpointer: on the stage-1 workdir's checkpoints/.
    module: the architecture (see `read_architecture`).
    image_shape: (H, W, C) it was trained on.
    sharding: of the restored arrays; replicated over this process's devices by default.
    step: which checkpoint; the latest by default.

  Returns:
    (params, step).

  Raises:
    FileNotFoundError: no checkpoint; the message names the directory.
  """
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(
      f"no autoencoder checkpoint under {checkpointer.directory}; train stage 1 first "
      f"(--mode=train_autoencoder --workdir={os.path.dirname(checkpointer.directory)})"
    )
  if sharding is None:
    sharding = sharding_lib.replicated(sharding_lib.local_mesh())
  target = {"params": abstract_params(module, image_shape, sharding)}
  restored, step = checkpointer.restore_partial(target, step=step)
  return restored["params"], step


def load_codec(workdir: str, *, scale_factor: float = 0.0) -> LatentCodec:
  """Loads the frozen stage-1 autoencoder of `workdir` (its latest checkpoint).

  Args:
    workdir: workdir of a stage-1 run (holds autoencoder.json and checkpoints/).
    scale_factor: > 0 overrides the 1 / std stored by stage 1 in latent_scale.json.

  Returns:
    The `LatentCodec`, its params replicated over this process's devices.

  Raises:
    FileNotFoundError: the workdir, its architecture file, checkpoint or (without an
      override) its scale file is missing; the message names the path.
    ValueError: a negative or non-finite `scale_factor`.
  """
  if not workdir:
    raise ValueError("the autoencoder workdir must be a non-empty path")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"autoencoder workdir {os.path.abspath(workdir)} does not exist")
  if not (np.isfinite(scale_factor) and scale_factor >= 0):
    raise ValueError(f"scale_factor must be >= 0 (0: use the stored one), got {scale_factor!r}")
  module, image_shape, latent_shape = read_architecture(workdir)
  directory = os.path.join(os.path.abspath(workdir), CKPT_DIR)
  if not os.path.isdir(directory):  # before Checkpointer, which would create it
    raise FileNotFoundError(
      f"no autoencoder checkpoint under {directory}; train stage 1 "
      f"first (--mode=train_autoencoder --workdir={workdir})"
    )
  # Read-only: a corrupt step is moved aside only while no stage-1 run holds the workdir.
  with Checkpointer(directory, guard=lambda: lock_if_free(workdir)) as checkpointer:
    params, _ = restore_params(checkpointer, module, image_shape)
  scale = float(scale_factor) if scale_factor > 0 else read_scale_factor(workdir)
  return LatentCodec(
    module=module,
    params=params,
    scale_factor=scale,
    latent_shape=latent_shape,
    image_shape=image_shape,
  )
