"""Dataset sources: TFDS array_record builders, random-access splits and their metadata.

Every dataset, embedded or from the TFDS catalog, goes through one path:
:func:`load_source` resolves a name to a random-access data source
(``builder.as_data_source(split)``, the same object ``tfds.data_source`` returns).
``jdiff_digits[/16x16|/32x32|/8x8]`` is built locally from scikit-learn's digits
(:mod:`jdiff.data.digits`). Any other name is a TFDS catalog dataset: read as is when
already prepared as ``array_record`` under ``data_dir``, otherwise downloaded and
prepared as ``array_record``. Preparing catalog image datasets (mnist, cifar10,
celeb_a, fashion_mnist, ...) encodes PNG/JPEG through TensorFlow, and catalog audio datasets
(speech_commands, nsynth) need it to construct their builders at all; without it a
:class:`TensorFlowRequiredError` names the install command, before anything is
downloaded. The grain iterators over these sources are in :mod:`jdiff.data.pipeline`.

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from jdiff.data import digits as digits_lib
from jdiff.data import notes as notes_lib

TF_INSTALL_HINT = "pip install tensorflow  (or: pip install 'jdiff[tf]')"


class TensorFlowRequiredError(ImportError):
  """Preparing a TFDS dataset needs TensorFlow, which is not installed."""


class DatasetMetadata(NamedTuple):
  """What a model needs to know about a dataset, read from TFDS' metadata.

  Attributes:
    name: the dataset name as given.
    image_shape: (H, W, C) of the images the pipeline yields (after resizing).
    num_classes: number of labels, or ``None`` when the dataset has no
      ``label`` ClassLabel (the pipeline then yields no ``label``).
    num_examples: examples per split, e.g. ``{"train": 1597, "test": 200}``.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int | None
  num_examples: dict[str, int]


# ----------------------------------------------------------------------------
# Resolving names to prepared builders and sources.


def _digits_size(name: str) -> int | None:
  """Returns the image size for ``jdiff_digits[/SxS]``, None for other names."""
  base, _, config = name.partition("/")
  if base != digits_lib.NAME:
    return None
  if not config:
    return 16
  sizes = {f"{s}x{s}": s for s in digits_lib.IMAGE_SIZES}
  if config not in sizes:
    raise ValueError(
      f"unknown config {config!r} of {digits_lib.NAME}; choose one of {sorted(sizes)}"
    )
  return sizes[config]


def _features_need_tensorflow(features: Any) -> bool:
  """Whether encoding these features needs TF (image/video PNG/JPEG encoding)."""
  if isinstance(features, tfds.features.Image):
    return True
  if isinstance(features, tfds.features.FeaturesDict):
    return any(_features_need_tensorflow(f) for f in features.values())
  inner = getattr(features, "feature", None)  # Sequence, Video, Dataset, Optional.
  return inner is not None and _features_need_tensorflow(inner)


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _tf_error(name: str, reason: str) -> TensorFlowRequiredError:
  return TensorFlowRequiredError(
    f"dataset {name!r} is not prepared as array_record and preparing it needs "
    f"TensorFlow ({reason}), which is not installed. Install it with: "
    f"{TF_INSTALL_HINT}; or prepare the dataset elsewhere with "
    f"tfds.builder({name!r}).download_and_prepare(file_format='array_record') "
    "and point data_dir at the result. (jdiff_digits needs no TensorFlow.)"
  )


def prepared_builder(name: str, *, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the builder of ``name``, prepared as array_record under ``data_dir``.

  Prepares it first if needed (once; later calls find the files).

  Args:
    name: ``jdiff_digits``, ``jdiff_digits/32x32``, or a TFDS name such as
      ``mnist``, ``cifar10``, ``celeb_a``, ``fashion_mnist`` (optionally with
      ``/config`` and ``:version``).
    data_dir: TFDS data directory; ``None`` uses TFDS' default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Raises:
    ValueError: unknown dataset, or prepared in a format grain cannot read.
    TensorFlowRequiredError: preparing the dataset needs TensorFlow.
  """
  if not isinstance(name, str) or not name:
    raise TypeError(f"dataset name must be a non-empty str, got {name!r}")
  data_dir = None if data_dir is None else str(data_dir)
  size = _digits_size(name)
  if size is not None:
    return digits_lib.prepare_digits(image_size=size, data_dir=data_dir)
  if notes_lib.config_of(name) is not None:
    return notes_lib.prepare_notes(name, data_dir=data_dir)

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ModuleNotFoundError as e:  # tfds.features.Audio (speech_commands, nsynth) needs TF
    if e.name == "tensorflow" or "tensorflow" in str(e):
      raise TensorFlowRequiredError(
        f"dataset {name!r}: tensorflow_datasets needs TensorFlow to construct its builder "
        f"(its features, e.g. tfds.features.Audio, are defined with TensorFlow dtypes), even "
        f"to read a prepared copy. Install it with: {TF_INSTALL_HINT}. (jdiff_digits and "
        "jdiff_notes need no TensorFlow.)"
      ) from None
    raise
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"unknown dataset {name!r}: not in the TFDS catalog and not prepared under "
      f"data_dir={data_dir!r} (embedded: {digits_lib.NAME}/16x16, /32x32, /8x8)"
    ) from None
  if builder.is_prepared():
    fmt = builder.info.file_format
    if fmt != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
        f"dataset {name!r} under {builder.data_dir} is prepared as {fmt}, but grain "
        "needs random access: prepare it with "
        "download_and_prepare(file_format='array_record') into another data_dir"
      )
    return builder

  # Check before downloading: a failure after fetching GiBs helps nobody.
  if not _tensorflow_available() and _features_need_tensorflow(builder.info.features):
    raise _tf_error(name, "its tfds.features.Image features are encoded with TensorFlow")
  try:
    builder.download_and_prepare(file_format="array_record")
  except ImportError as e:
    if e.name == "tensorflow" or "tensorflow" in str(e):
      raise _tf_error(name, f"the builder raised: {e}") from e
    raise
  return builder


def load_source(name: str, *, split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
  """Returns a random-access source of one split (preparing the dataset if needed).

  Equivalent to ``tfds.data_source(name, split=split, data_dir=data_dir)``
  once prepared; see :func:`prepared_builder` for how preparation works.

  Raises:
    ValueError: unknown dataset or split.
  """
  builder = prepared_builder(name, data_dir=data_dir)
  splits = list(builder.info.splits)
  if split not in splits:
    # tfds also accepts slices like "train[:10%]"; check only plain names.
    base = split.split("[")[0].split("+")[0]
    if base not in splits:
      raise ValueError(f"unknown split {split!r} of dataset {name!r}; has {splits}")
  return builder.as_data_source(split=split)


def dataset_metadata(
  name: str, *, data_dir: str | None = None, image_size: int | None = None
) -> DatasetMetadata:
  """Image shape, number of classes and split sizes, from TFDS' metadata.

  Prepares the dataset if needed but reads no examples.

  Args:
    name: dataset name, as for :func:`load_source`; plain ``jdiff_digits``
      with ``image_size`` 8, 16 or 32 uses the config stored at that size.
    data_dir: TFDS data directory.
    image_size: the ``image_size`` you will give the iterators (square resize),
      or ``None`` for the stored size.
  """
  info = prepared_builder(stored_name(name, image_size), data_dir=data_dir).info
  features = info.features
  if "audio" in features and "image" not in features:  # a 1-D signal [L] -> [L, 1]
    shape = (*features["audio"].shape, 1)
  elif "image" not in features:
    raise ValueError(f"dataset {name!r} has no 'image' feature; has {list(features)}")
  else:
    shape = tuple(features["image"].shape)
  if len(shape) == 2 and "image" in features:
    shape = (*shape, 1)
  if len(shape) == 2:  # a signal [L, C]
    return DatasetMetadata(name, shape, _num_classes(features), _num_examples(info))
  if len(shape) != 3 or shape[-1] is None:
    raise ValueError(f"dataset {name!r}: expected images [H, W, C], got shape {shape}")
  if image_size is not None:
    shape = (image_size, image_size, shape[-1])
  return DatasetMetadata(
    name=name,
    image_shape=tuple(int(d) if d is not None else None for d in shape),
    num_classes=_num_classes(features),
    num_examples=_num_examples(info),
  )


def _num_classes(features) -> int | None:
  label = features["label"] if "label" in features else None
  return label.num_classes if isinstance(label, tfds.features.ClassLabel) else None


def _num_examples(info) -> dict[str, int]:
  return {k: int(v.num_examples) for k, v in info.splits.items()}


def stored_name(name: str, image_size: int | None) -> str:
  """``jdiff_digits`` without a config picks the config stored at ``image_size``.

  So ``image_size=32`` reads the 32x32 build (resized once from 8x8) rather
  than resizing the 16x16 build a second time.
  """
  if name == digits_lib.NAME and image_size in digits_lib.IMAGE_SIZES:
    return f"{name}/{image_size}x{image_size}"
  return name
