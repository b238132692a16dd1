"""Latent data: a frozen autoencoder as a codec, and the grain source of encoded splits.

`LatentCodec` is a frozen autoencoder with its latent scale; `encode` and `decode` are
pure functions of it. `encode_source` encodes a whole split once into a `LatentSource`,
which the grain iterators of `jdiff.data.pipeline` read like any random-access source.
The codec lives here, beside the data it produces, rather than with the stage-1 on-disk
format (`jdiff.runs.stage1`, which builds a codec from a workdir): a codec needs no
files or configs, so it serves imported weights as well as a jdiff stage-1 run.

Which latents the diffusion model sees: the posterior MEAN of q(z | x), precomputed
once per process for the whole split. LDM (`LatentDiffusion.get_first_stage_encoding`)
draws a fresh posterior sample every time an image is used; precomputing a single
sample would instead freeze one arbitrary noise draw per image for the whole run,
which is neither LDM's regime nor noise-free. The mean is deterministic (independent of
seeds and device counts), it is what the decoder is trained to invert at the mode, and
with the KL weight of LDM/SD (1e-6) the posterior std is small next to the spread of
the means (BENCHMARKS.md, latent diffusion, measured by experiments/benchmark_latent.py),
so the two choices differ little. The scale factor is computed from the same statistic
(the means of the train split), so the latents it trains on have unit std exactly.

References:
  [LDM] Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models,
    CVPR 2022, Sec. 3-4.3 and App. G (latent rescaling by 1 / std).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding
from jax.sharding import PartitionSpec as P

from jdiff.data import pipeline, sources
from jdiff.models.autoencoder_losses import latent_scale_factor

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class LatentCodec:
  """A frozen autoencoder with its latent scale: images <-> diffusion-ready latents.

  Not a pytree: bind it with `functools.partial(decode, codec)` (its params become
  constants of the jitted function) or pass `codec.params` explicitly.

  Attributes:
    module: the autoencoder (an `AutoencoderKL`: `encode` gives a posterior with
      `mode()`, `decode` maps latents to images).
    params: its `params` collection, replicated over this process's devices.
    scale_factor: latents seen by the diffusion model are `z * scale_factor`.
    latent_shape: (h, w, c) of one latent.
    image_shape: (H, W, C) of one image the autoencoder was trained on.
  """

  module: Any
  params: PyTree
  scale_factor: float
  latent_shape: tuple[int, int, int]
  image_shape: tuple[int, int, int]


def latent_shape_of(module, image_shape) -> tuple[int, int, int]:
  """(h, w, c) of the latents of images (H, W, C); ValueError if they do not fit."""
  h, w, c = (int(d) for d in image_shape)
  f = module.downsample_factor
  if h % f or w % f:
    raise ValueError(
      f"image size {(h, w)} must be a multiple of the autoencoder's downsampling factor f={f}"
    )
  if c != module.in_channels:
    raise ValueError(
      f"images have {c} channels but the autoencoder takes in_channels={module.in_channels}"
    )
  return (h // f, w // f, module.latent_channels)


# ----------------------------------------------------------------------------- encode / decode


def encode_mean(module, params: PyTree, images: Array) -> Array:
  """The unscaled posterior mean [B, h, w, c] of images [B, H, W, C]."""
  return module.apply({"params": params}, images, method="encode").mode()


def encode(codec: LatentCodec, images: Array) -> Array:
  """Images [B, H, W, C] in [-1, 1] -> scaled posterior means [B, h, w, c] (pure)."""
  return encode_mean(codec.module, codec.params, images) * codec.scale_factor


def decode(codec: LatentCodec, z: Array) -> Array:
  """Scaled latents [B, h, w, c] -> images [B, H, W, C] clipped to [-1, 1] (pure).

  [LDM] App. G: the decoder gets z / scale_factor.
  """
  x = codec.module.apply({"params": codec.params}, z / codec.scale_factor, method="decode")
  return jnp.clip(x, -1.0, 1.0)


def local_shardings() -> tuple[Sharding, Sharding]:
  """(replicated, batch-sharded) over a 1-D mesh of this process's devices."""
  mesh = Mesh(np.asarray(jax.local_devices()), ("batch",))
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))


def encode_split(
  module,
  params: PyTree,
  name: str,
  *,
  split: str,
  data_dir: str | None = None,
  image_size: int | None = None,
  batch_size: int = 256,
  shardings: tuple[Sharding, Sharding] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
  """Unscaled posterior means of a whole split, batched through one jitted encoder.

  Each process encodes the whole split itself (its batch split over its own devices);
  the last batch is padded (the eval iterator's mask drops the padding).

  Args:
    shardings: (replicated, batch-sharded) over this process's devices, as the caller's
      mesh lays them out; None: a 1-D mesh over `jax.local_devices()`.

  Returns:
    (latents float32 [N, h, w, c], labels int32 [N] or None if the data have none).
  """
  repl, data_sh = shardings or local_shardings()
  n_dev = len(data_sh.device_set)
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  fn = jax.jit(
    functools.partial(encode_mean, module), in_shardings=(repl, data_sh), out_shardings=data_sh
  )
  it = pipeline.make_eval_iterator(
    name,
    global_batch_size=batch_size,
    process_index=0,
    process_count=1,
    split=split,
    data_dir=data_dir,
    image_size=image_size,
  )
  zs, labels = [], []
  for batch in it:
    mask = batch["mask"]
    z = np.asarray(jax.device_get(fn(params, jax.device_put(batch["image"], data_sh))))
    zs.append(z[mask])
    if "label" in batch:
      labels.append(batch["label"][mask])
  return (
    np.concatenate(zs).astype(np.float32),
    np.concatenate(labels).astype(np.int32) if labels else None,
  )


def scale_factor_of_split(module, params: PyTree, name: str, **options) -> tuple[float, int]:
  """1 / std of the posterior means of a split ([LDM] App. G), and its example count.

  `options`: `encode_split`'s (split, data_dir, image_size, batch_size, shardings)."""
  z, _ = encode_split(module, params, name, **options)
  return latent_scale_factor(z), len(z)


# ----------------------------------------------------------------------------- grain source


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


def encode_source(
  codec: LatentCodec, name: str, *, split: str, image_size: int | None = None, **options
) -> LatentSource:
  """Encodes a whole split once into a random-access source of scaled latents.

  Args:
    codec: the frozen autoencoder (e.g. `jdiff.runs.stage1.load_codec(workdir)`).
    name: dataset name, as for `jdiff.data.sources.load_source`.
    split: split to encode.
    image_size: the square resize used in stage 1 (None: the stored size).
    **options: `encode_split`'s data_dir (TFDS data directory), batch_size (encoder batch)
      and shardings ((replicated, batch-sharded) over this process's devices).

  Returns:
    A `LatentSource` of `codec.scale_factor * mean(q(z | x))`, float32 [h, w, c] each.

  Raises:
    ValueError: the split's images do not have the autoencoder's image shape.
  """
  meta = sources.dataset_metadata(name, data_dir=options.get("data_dir"), image_size=image_size)
  if tuple(meta.image_shape) != tuple(codec.image_shape):
    raise ValueError(
      f"dataset {name!r} (image_size={image_size}) has images "
      f"{tuple(meta.image_shape)}, but the autoencoder was trained on "
      f"{tuple(codec.image_shape)}"
    )
  z, labels = encode_split(
    codec.module, codec.params, name, split=split, image_size=image_size, **options
  )
  z = (z * np.float32(codec.scale_factor)).astype(np.float32)
  desc = (
    f"LatentSource({name!r}, split={split!r}, image_size={image_size}, n={len(z)}, "
    f"latent_shape={tuple(codec.latent_shape)}, scale={codec.scale_factor:.6g})"
  )
  return LatentSource(latents=z, labels=labels, description=desc)
