"""Latent diffusion plumbing: a frozen stage-1 autoencoder as a data codec.

Stage 1 (`jdiff.training.autoencoder_trainer.train_autoencoder`) leaves in its workdir

  autoencoder.json     the architecture: preset name, AutoencoderKL kwargs, image and
                       latent shapes (written before the first step);
  checkpoints/<step>/  orbax checkpoints of {step, params, opt_state} (the lead's
                       `Checkpointer`, with the data iterator);
  latent_scale.json    {"scale_factor": 1 / std, ...} of the train split's latents
                       (written at the end of stage 1).

Stage 2 (the pixel-space trainer with `config.latent.autoencoder_workdir` set) calls
`load_codec`, trains the U-Net on `encode_source` (scaled latents) and decodes samples
with `decode`.

Which latents the diffusion model sees: the posterior MEAN of q(z | x), precomputed
once per process for the whole split. LDM (`LatentDiffusion.get_first_stage_encoding`)
draws a fresh posterior sample every time an image is used; precomputing a single
sample would instead freeze one arbitrary noise draw per image for the whole run,
which is neither LDM's regime nor noise-free. The mean is deterministic (independent of
seeds and device counts), it is what the decoder is trained to invert at the mode, and
with the KL weight of LDM/SD (1e-6) the posterior std is small next to the spread of
the means (0.028 of it for ae_digits after 600 steps, reported by
experiments/benchmark_latent.py), so the two choices differ little. The
scale factor is computed from the same statistic (the means of the train split), so
the training latents have unit std exactly.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3-4.3 and App. G (latent rescaling by 1 / std).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdiff.models.autoencoder_losses import latent_scale_factor
from jdiff.data import pipeline
from jdiff.models.autoencoder import AutoencoderKL, make_autoencoder

Array = jax.Array
PyTree = Any

ARCH_FILE = "autoencoder.json"
SCALE_FILE = "latent_scale.json"
CKPT_DIR = "checkpoints"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True, eq=False)
class LatentCodec:
  """A frozen autoencoder with its latent scale: images <-> diffusion-ready latents.

  Not a pytree: bind it with `functools.partial(decode, codec)` (its params become
  constants of the jitted function) or pass `codec.params` explicitly.

  Attributes:
    module: the AutoencoderKL.
    params: its `params` collection, replicated over this process's devices.
    scale_factor: latents seen by the diffusion model are `z * scale_factor`.
    latent_shape: (h, w, c) of one latent.
    image_shape: (H, W, C) of one image the autoencoder was trained on.
  """

  module: AutoencoderKL
  params: PyTree
  scale_factor: float
  latent_shape: tuple[int, int, int]
  image_shape: tuple[int, int, int]


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
        raise ValueError(f"unsupported autoencoder dtype {module.dtype!r}; use one of "
                         f"{sorted(DTYPES)}")
    elif isinstance(value, (tuple, list)):
      value = [int(v) for v in value]
    out[f.name] = value
  return out


def latent_shape_of(module: AutoencoderKL, image_shape) -> tuple[int, int, int]:
  """(h, w, c) of the latents of images (H, W, C); ValueError if they do not fit."""
  h, w, c = (int(d) for d in image_shape)
  f = module.downsample_factor
  if h % f or w % f:
    raise ValueError(f"image size {(h, w)} must be a multiple of the autoencoder's "
                     f"downsampling factor f={f}")
  if c != module.in_channels:
    raise ValueError(f"images have {c} channels but the autoencoder takes "
                     f"in_channels={module.in_channels}")
  return (h // f, w // f, module.latent_channels)


def write_json(path: str, obj: dict) -> str:
  """Writes `obj` as JSON atomically (overwriting)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def architecture_record(preset: str, module: AutoencoderKL, image_shape) -> dict:
  """The content of `autoencoder.json`."""
  return {"preset": preset, "kwargs": module_kwargs(module),
          "image_shape": [int(d) for d in image_shape],
          "latent_shape": list(latent_shape_of(module, image_shape))}


def read_architecture(ae_workdir: str) -> tuple[AutoencoderKL, tuple, tuple]:
  """(module, image_shape, latent_shape) from `ae_workdir/autoencoder.json`."""
  record = _read_json(ae_workdir, ARCH_FILE, "autoencoder architecture file",
                      f"is {ae_workdir!r} the workdir of a stage-1 run (python -m "
                      "experiments.main --mode=train_autoencoder)?")
  kwargs = dict(record["kwargs"])
  kwargs["dtype"] = DTYPES[kwargs.get("dtype") or "float32"]
  kwargs["ch_mult"] = tuple(kwargs["ch_mult"])
  module = make_autoencoder(record["preset"], **kwargs)
  image_shape = tuple(int(d) for d in record["image_shape"])
  return module, image_shape, latent_shape_of(module, image_shape)


# ----------------------------------------------------------------------------- checkpoints

def local_replicated() -> NamedSharding:
  """Replicated over this process's devices (the codec is used process-locally)."""
  return NamedSharding(Mesh(np.asarray(jax.local_devices()), ("data",)), P())


def abstract_params(module: AutoencoderKL, image_shape, sharding=None) -> PyTree:
  """ShapeDtypeStructs of the module's `params` (with `sharding` if given)."""
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, sample_posterior=False)["params"], x)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)


def latest_checkpoint_step(ae_workdir: str) -> int:
  """The newest finished stage-1 checkpoint step; FileNotFoundError naming the path."""
  directory = os.path.join(os.path.abspath(ae_workdir), CKPT_DIR)
  steps = []
  if os.path.isdir(directory):
    steps = [int(d) for d in os.listdir(directory)
             if d.isdigit() and os.path.isdir(os.path.join(directory, d, "state"))]
  if not steps:
    raise FileNotFoundError(
        f"no autoencoder checkpoint under {directory}; train stage 1 first "
        f"(--mode=train_autoencoder --workdir={ae_workdir})")
  return max(steps)


def restore_autoencoder_params(ae_workdir: str, module: AutoencoderKL, image_shape, *,
                               step: int | None = None, sharding=None) -> tuple[PyTree, int]:
  """Restores only `params` from a stage-1 checkpoint (skipping the optimiser state).

  Args:
    ae_workdir: the stage-1 workdir.
    module: the architecture (see `read_architecture`).
    image_shape: (H, W, C) it was trained on.
    step: which checkpoint; the latest by default.
    sharding: of the restored arrays; replicated over the local devices by default.

  Returns:
    (params, step).
  """
  step = latest_checkpoint_step(ae_workdir) if step is None else step
  sharding = local_replicated() if sharding is None else sharding
  target = abstract_params(module, image_shape, sharding)
  path = os.path.join(os.path.abspath(ae_workdir), CKPT_DIR, str(step), "state")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no autoencoder checkpoint {path}")
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args},
        partial_restore=True))
  return out["params"], step


def _read_json(ae_workdir: str, filename: str, what: str, hint: str) -> dict:
  """Reads a JSON file that stage 1 writes into its workdir; FileNotFoundError if missing."""
  path = os.path.join(os.path.abspath(ae_workdir), filename)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} {path}: {hint}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_scale_factor(ae_workdir: str) -> float:
  return float(_read_json(
      ae_workdir, SCALE_FILE, "latent scale file",
      "stage 1 writes it when it finishes (rerun --mode=train_autoencoder to completion), "
      "or set config.latent.scale_factor > 0")["scale_factor"])


def load_codec(ae_workdir: str, *, scale_factor: float = 0.0) -> LatentCodec:
  """Loads the frozen stage-1 autoencoder of `ae_workdir` (its latest checkpoint).

  Args:
    ae_workdir: workdir of a stage-1 run (holds autoencoder.json and checkpoints/).
    scale_factor: > 0 overrides the 1 / std stored by stage 1 in latent_scale.json.

  Returns:
    The `LatentCodec`.

  Raises:
    FileNotFoundError: the workdir, its architecture file, checkpoint or (without an
      override) its scale file is missing; the message names the path.
    ValueError: a negative or non-finite `scale_factor`.
  """
  if not ae_workdir:
    raise ValueError("ae_workdir must be a non-empty path")
  if not os.path.isdir(ae_workdir):
    raise FileNotFoundError(f"autoencoder workdir {os.path.abspath(ae_workdir)} does not exist")
  if not (np.isfinite(scale_factor) and scale_factor >= 0):
    raise ValueError(f"scale_factor must be >= 0 (0: use the stored one), got {scale_factor!r}")
  module, image_shape, latent_shape = read_architecture(ae_workdir)
  params, _ = restore_autoencoder_params(ae_workdir, module, image_shape)
  scale = float(scale_factor) if scale_factor > 0 else read_scale_factor(ae_workdir)
  return LatentCodec(module=module, params=params, scale_factor=scale,
                     latent_shape=latent_shape, image_shape=image_shape)


# ----------------------------------------------------------------------------- encode / decode

def encode(codec: LatentCodec, images: Array) -> Array:
  """Images [B, H, W, C] in [-1, 1] -> scaled posterior means [B, h, w, c] (pure)."""
  return encode_mean(codec.module, codec.params, images) * codec.scale_factor


def decode(codec: LatentCodec, z: Array) -> Array:
  """Scaled latents [B, h, w, c] -> images [B, H, W, C] clipped to [-1, 1] (pure).

  [LDM] App. G: the decoder gets z / scale_factor.
  """
  x = codec.module.apply({"params": codec.params}, z / codec.scale_factor,
                         method=AutoencoderKL.decode)
  return jnp.clip(x, -1.0, 1.0)


def encode_mean(module: AutoencoderKL, params: PyTree, images: Array) -> Array:
  """The unscaled posterior mean [B, h, w, c] of images [B, H, W, C]."""
  return module.apply({"params": params}, images, method=AutoencoderKL.encode).mode()


def encode_split(module: AutoencoderKL, params: PyTree, name: str, *, split: str,
                 data_dir: str | None = None, image_size: int | None = None,
                 batch_size: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
  """Unscaled posterior means of a whole split, batched through one jitted encoder.

  The batch is split over this process's devices; the last batch is padded (the
  eval iterator's mask drops the padding).

  Returns:
    (latents float32 [N, h, w, c], labels int32 [N] or None if the data have none).
  """
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), ("data",))
  batch_size = max(len(devices), batch_size // len(devices) * len(devices))
  data_sh = NamedSharding(mesh, P("data"))
  fn = jax.jit(functools.partial(encode_mean, module),
               in_shardings=(NamedSharding(mesh, P()), data_sh), out_shardings=data_sh)
  it = pipeline.make_eval_iterator(name, global_batch_size=batch_size, process_index=0,
                                   process_count=1, split=split, data_dir=data_dir,
                                   image_size=image_size)
  zs, labels = [], []
  for batch in it:
    mask = batch["mask"]
    z = np.asarray(jax.device_get(fn(params, jax.device_put(batch["image"], data_sh))))
    zs.append(z[mask])
    if "label" in batch:
      labels.append(batch["label"][mask])
  return (np.concatenate(zs).astype(np.float32),
          np.concatenate(labels).astype(np.int32) if labels else None)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSource:
  """Random-access source of precomputed latents for the grain iterators.

  `source[i]` is {'image': float32 [h, w, c], 'label': int32} ('label' only when the
  dataset has labels); the float32 images pass through the pipeline unchanged.
  """

  latents: np.ndarray
  labels: np.ndarray | None
  description: str

  def __len__(self) -> int:
    return len(self.latents)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = int(index)
    out = {"image": self.latents[index]}
    if self.labels is not None:
      out["label"] = self.labels[index]
    return out

  def __repr__(self) -> str:
    # grain records the source's repr in iterator checkpoints: keep it short and stable.
    return self.description


def encode_source(codec: LatentCodec, name: str, *, split: str, data_dir: str | None = None,
                  image_size: int | None = None, batch_size: int = 256) -> LatentSource:
  """Encodes a whole split once into a random-access source of scaled latents.

  Args:
    codec: from `load_codec`.
    name: dataset name, as for `jdiff.data.pipeline.load_source`.
    split: split to encode.
    data_dir: TFDS data directory.
    image_size: the square resize used in stage 1 (None: the stored size).
    batch_size: encoder batch.

  Returns:
    A `LatentSource` of `codec.scale_factor * mean(q(z | x))`, float32 [h, w, c] each.

  Raises:
    ValueError: the split's images do not have the autoencoder's image shape.
  """
  meta = pipeline.dataset_metadata(name, data_dir=data_dir, image_size=image_size)
  if tuple(meta.image_shape) != tuple(codec.image_shape):
    raise ValueError(f"dataset {name!r} (image_size={image_size}) has images "
                     f"{tuple(meta.image_shape)}, but the autoencoder was trained on "
                     f"{tuple(codec.image_shape)}")
  z, labels = encode_split(codec.module, codec.params, name, split=split, data_dir=data_dir,
                           image_size=image_size, batch_size=batch_size)
  z = (z * np.float32(codec.scale_factor)).astype(np.float32)
  desc = (f"LatentSource({name!r}, split={split!r}, image_size={image_size}, n={len(z)}, "
          f"latent_shape={tuple(codec.latent_shape)}, scale={codec.scale_factor:.6g})")
  return LatentSource(latents=z, labels=labels, description=desc)


def scale_factor_of_split(module: AutoencoderKL, params: PyTree, name: str, *, split: str,
                          data_dir: str | None = None, image_size: int | None = None
                          ) -> tuple[float, int]:
  """1 / std of the posterior means of a split, and its example count."""
  z, _ = encode_split(module, params, name, split=split, data_dir=data_dir,
                      image_size=image_size)
  return latent_scale_factor(z), len(z)
