"""Input pipeline: grain iterators over random-access sources, sharded per process.

1. :func:`make_train_iterator` wraps a source (a dataset name, resolved by
   :func:`jdiff.data.sources.load_source`, or any random-access source) in a grain
   ``DataLoader``: the process reads only its own shard, in an order shuffled per epoch
   from ``seed``, with optional seeded horizontal flips, batched to this process's
   share of the global batch. Its position is saved with ``it.get_state()``
   (``bytes``: UTF-8 JSON) and restored with ``it.set_state(state)``.
2. :func:`make_eval_iterator` makes one pass over a split without shuffling;
   the last batch is padded and flagged with ``mask`` so metrics are exact.

Nothing here imports TensorFlow. Grain runs in-process by default
(``worker_count=0``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grain.python as grain
import numpy as np
from PIL import Image

from jdiff.data.sources import load_source, stored_name

# ----------------------------------------------------------------------------
# Per-example transforms (module-level dataclasses so grain workers can pickle them).


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [size, size, C]: central square crop, PIL bicubic."""
  h, w, c = image.shape
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  image = image[top : top + side, left : left + side]
  if side == size:
    return image
  pil = Image.fromarray(image[:, :, 0] if c == 1 else image)
  out = np.asarray(pil.resize((size, size), Image.BICUBIC), np.uint8)
  return out.reshape(size, size, c)


def audio_to_float(audio, image_size: int | None) -> np.ndarray:
  """int16 PCM [L] -> float32 [L, 1] = audio / 32768 (model-ready; no resizing)."""
  audio = np.asarray(audio)
  if audio.dtype != np.int16 or audio.ndim != 1 or image_size is not None:
    raise ValueError(
      f"expected int16 audio [L] and no image_size, got {audio.dtype} {audio.shape}, "
      f"image_size={image_size}"
    )
  return (audio.astype(np.float32) / np.float32(32768))[:, None]


def _label(label) -> np.ndarray:
  """A class label as int32 []; a float condition row (a caption's context) unchanged."""
  label = np.asarray(label)
  return label if label.ndim and label.dtype.kind == "f" else label.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class _Preprocess(grain.MapTransform):
  """Example dict -> {'image': float32 [H, W, C] in [-1, 1], 'label': int32 []}.

  uint8 images are scaled to [-1, 1]; float32 images (precomputed latents) pass unchanged;
  int16 audio [L] (`jdiff.data.notes`) becomes float32 [L, 1] = audio / 32768.
  """

  image_size: int | None = None

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(element["image"]) if "audio" not in element else None
    if image is not None and image.ndim == 2:
      image = image[:, :, None]
    if image is None:  # int16 PCM [L] -> float32 [L, 1] in [-1, 1), the model's input 'image'
      image = audio_to_float(element["audio"], self.image_size)
    if image.dtype == np.float32 and image.ndim in (2, 3) and self.image_size is None:
      # Already model-ready values (e.g. precomputed autoencoder latents): pass through.
      out = {"image": image}
      if "label" in element:
        out["label"] = _label(element["label"])
      return out
    if image.dtype != np.uint8 or image.ndim != 3:
      raise ValueError(
        f"expected uint8 images [H, W, C], got {image.dtype} with shape {image.shape}"
      )
    if self.image_size is not None:
      image = _center_crop_resize(image, self.image_size)
    out = {"image": image.astype(np.float32) * np.float32(2 / 255) - np.float32(1)}
    if "label" in element:
      out["label"] = _label(element["label"])
    return out


@dataclasses.dataclass(frozen=True)
class _RandomFlip(grain.RandomMapTransform):
  """Mirrors the image left-right with probability 1/2.

  grain seeds ``rng`` from the sampler seed and the record's position in the
  stream, so the flips are reproducible and survive a restore.
  """

  def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator):
    if rng.random() < 0.5:
      element = {**element, "image": np.ascontiguousarray(element["image"][:, ::-1])}
    return element


# ----------------------------------------------------------------------------
# Iterators.


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  for arg, value in (
    ("global_batch_size", global_batch_size),
    ("process_count", process_count),
    ("process_index", process_index),
  ):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise TypeError(f"{arg} must be an int, got {value!r}")
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  if global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}"
    )
  return global_batch_size // process_count


def _resolve(
  source_or_name, split: str, data_dir: str | None, image_size: int | None
) -> Sequence[dict[str, Any]]:
  if isinstance(source_or_name, str):
    name = stored_name(source_or_name, image_size)
    return load_source(name, split=split, data_dir=data_dir)
  if not (hasattr(source_or_name, "__len__") and hasattr(source_or_name, "__getitem__")):
    raise TypeError(
      "source_or_name must be a dataset name or a random-access source "
      f"(__len__ and __getitem__), got {type(source_or_name).__name__}"
    )
  return source_or_name


def make_train_iterator(
  source_or_name: str | Sequence[dict[str, Any]],
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  split: str = "train",
  data_dir: str | None = None,
  image_size: int | None = None,
  random_flip: bool = False,
  num_epochs: int | None = None,
  worker_count: int = 0,
) -> grain.PyGrainDatasetIterator:
  """Shuffled, repeated, sharded training batches for this process.

  The records are split into ``process_count`` disjoint contiguous shards of
  ``len(source) // process_count`` records (the remainder, fewer than
  ``process_count`` records, is dropped); this process reads shard
  ``process_index``, reshuffled every epoch. Order and flips depend only on
  ``seed`` and the position in the stream.

  Args:
    source_or_name: dataset name (see :func:`load_source`) or a random-access
      source of dicts with ``image`` (uint8 [H, W, C]) and optionally ``label``.
      Plain ``jdiff_digits`` with ``image_size`` 8, 16 or 32 reads the config
      stored at that size.
    global_batch_size: batch size summed over all processes.
    seed: shuffling and flip seed, an int in [0, 2**32).
    process_index: this process, ``jax.process_index()``.
    process_count: ``jax.process_count()``.
    split: split to read when ``source_or_name`` is a name.
    data_dir: TFDS data directory (``None``: TFDS' default).
    image_size: square side to center-crop and resize to (PIL bicubic);
      ``None`` keeps the stored size.
    random_flip: random horizontal flips (on for cifar10, off for digits).
    num_epochs: epochs to yield; ``None`` repeats forever.
    worker_count: grain worker processes; 0 runs in this process. With
      workers each one batches its own records, so the stream (still
      deterministic) depends on ``worker_count`` and a restored state needs the
      same value (grain checks). grain reads absl flags in its workers: run
      under ``absl.app.run`` (or parse ``absl.flags.FLAGS`` first).

  Returns:
    An iterator of ``{'image': float32 [b, H, W, C] in [-1, 1],
    'label': int32 [b]}`` with ``b = global_batch_size // process_count``
    (``label`` only when the dataset has one). ``it.get_state()`` returns
    ``bytes`` (UTF-8 JSON, also naming the sampler settings and source);
    ``it.set_state(state)`` on a new iterator with the same arguments resumes
    exactly after the last batch taken. For orbax, save it as bytes, or with
    ``grain.PyGrainCheckpointSave(it)`` / ``PyGrainCheckpointRestore(it)``.

  Raises:
    ValueError: ``global_batch_size`` not divisible by ``process_count``, a
      shard smaller than one batch with ``num_epochs`` set, or bad arguments.
  """
  batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if image_size is not None and image_size < 1:
    raise ValueError(f"image_size must be positive or None, got {image_size}")
  source = _resolve(source_or_name, split, data_dir, image_size)
  shard_size = len(source) // process_count
  if shard_size == 0:
    raise ValueError(f"{len(source)} records cannot be split over process_count={process_count}")
  if num_epochs is not None and shard_size * num_epochs < batch_size:
    raise ValueError(
      f"per-process batch {batch_size} exceeds the {shard_size * num_epochs} "
      f"records this process reads in num_epochs={num_epochs}"
    )
  shard_options = grain.ShardOptions(
    shard_index=int(process_index), shard_count=int(process_count), drop_remainder=True
  )
  sampler = grain.IndexSampler(
    num_records=len(source),
    shard_options=shard_options,
    shuffle=True,
    num_epochs=num_epochs,
    seed=int(seed),
  )
  operations: list[grain.Transformation] = [_Preprocess(image_size=image_size)]
  if random_flip:
    operations.append(_RandomFlip())
  operations.append(grain.Batch(batch_size=batch_size, drop_remainder=True))
  loader = grain.DataLoader(
    data_source=source,
    sampler=sampler,
    operations=operations,
    worker_count=worker_count,
    shard_options=shard_options,
  )
  return iter(loader)


def make_eval_iterator(
  source_or_name: str | Sequence[dict[str, Any]],
  *,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  split: str = "test",
  data_dir: str | None = None,
  image_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over a split in stored order, padded so every record counts once.

  Records are split into ``process_count`` contiguous parts
  (``numpy.array_split``: sizes differ by at most one); every process yields
  the same number of batches, ``ceil(ceil(N / process_count) / b)``, so
  collective eval steps line up across processes. Padding rows are zeros with
  ``label`` 0 and ``mask`` False; weight metrics by ``mask``.

  Args:
    source_or_name: dataset name or random-access source, as for
      :func:`make_train_iterator`.
    global_batch_size: batch size summed over all processes.
    process_index: this process, ``jax.process_index()``.
    process_count: ``jax.process_count()``.
    split: split to read when ``source_or_name`` is a name.
    data_dir: TFDS data directory.
    image_size: square resize as in :func:`make_train_iterator`.

  Yields:
    ``{'image': float32 [b, H, W, C] in [-1, 1], 'label': int32 [b],
    'mask': bool [b]}`` with ``b = global_batch_size // process_count``.
  """
  batch_size = _local_batch_size(global_batch_size, process_index, process_count)
  source = _resolve(source_or_name, split, data_dir, image_size)
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"split {split!r} is empty")
  part = np.array_split(np.arange(num_records), process_count)[process_index]
  num_batches = math.ceil(math.ceil(num_records / process_count) / batch_size)
  preprocess = _Preprocess(image_size=image_size)
  template = preprocess.map(source[0])
  return _eval_batches(source, preprocess, template, part, num_batches, batch_size)


def _eval_batches(source, preprocess, template, part, num_batches, batch_size):
  for i in range(num_batches):
    rows = part[i * batch_size : (i + 1) * batch_size]
    batch = {k: np.zeros((batch_size, *v.shape), v.dtype) for k, v in template.items()}
    batch["mask"] = np.zeros((batch_size,), bool)
    for j, row in enumerate(rows):
      for k, v in preprocess.map(source[int(row)]).items():
        batch[k][j] = v
      batch["mask"][j] = True
    yield batch
