"""Embedded dataset: scikit-learn's 8x8 handwritten digits as a TFDS builder.

The data ships with scikit-learn (``sklearn.datasets.load_digits``: 1,797
grey-scale 8x8 images of the digits 0-9, pixel values 0..16; a copy of the UCI
"Optical Recognition of Handwritten Digits" test set, Alpaydin & Kaynak 1998),
so this dataset builds offline in about a second and is the default dataset for
tests, smoke runs and CPU experiments.

Building and reading need no TensorFlow:

* the image is stored as a raw ``tfds.features.Tensor`` (uint8 [H, W, 1]);
  ``tfds.features.Image`` would PNG-encode through TensorFlow, which fails with
  ``No module named 'tensorflow'`` in tfds 4.9.10 (checked by building both);
* the files are written as ``array_record`` and read through
  ``builder.as_data_source()`` / ``tfds.data_source(...)``, which grain can
  sample at random.

Configs (``jdiff_digits/<config>``):

* ``16x16`` (default), ``32x32``: the 0..16 image is rescaled to 0..255
  (``round(x * 255 / 16)``) and resized with PIL bicubic interpolation;
* ``8x8``: the native resolution, only rescaled to 0..255.

Split (fixed, documented so results are comparable across runs): the 1,797
sklearn indices are permuted with ``numpy.random.default_rng(0).permutation``;
the first 200 of the permutation form ``test`` and the other 1,597 ``train``.
Every example also carries ``index``, its row in ``load_digits()``, so any
example can be traced back to the source.

Example:
  >>> builder = prepare_digits(image_size=16, data_dir="/tmp/tfds")
  >>> source = builder.as_data_source(split="train")   # len 1597
  >>> source[0]["image"].shape, source[0]["label"]
  ((16, 16, 1), 7)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "jdiff_digits"
"""Registered TFDS name of the builder, e.g. ``tfds.data_source("jdiff_digits/32x32")``."""

NUM_EXAMPLES = 1797
NUM_TEST = 200
NUM_CLASSES = 10
SPLIT_SEED = 0
IMAGE_SIZES = (8, 16, 32)


def split_indices() -> dict[str, np.ndarray]:
  """Returns the fixed train/test split of the sklearn digits.

  Returns:
    ``{"train": int64 [1597], "test": int64 [200]}``: rows of
    ``sklearn.datasets.load_digits()``, in permutation order.
  """
  perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {"train": perm[NUM_TEST:], "test": perm[:NUM_TEST]}


def resize_digit(image: np.ndarray, *, image_size: int) -> np.ndarray:
  """Converts one sklearn digit to a uint8 image of the requested size.

  Args:
    image: [8, 8] values in 0..16 (any real dtype), as in ``load_digits().images``.
    image_size: output side length; 8 keeps the native resolution.

  Returns:
    uint8 [image_size, image_size, 1] in 0..255.
  """
  image = np.asarray(image)
  if image.shape != (8, 8):
    raise ValueError(f"expected an [8, 8] digit image, got shape {image.shape}")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  scaled = np.clip(np.round(image.astype(np.float64) * (255.0 / 16.0)), 0, 255)
  scaled = scaled.astype(np.uint8)
  if image_size != 8:
    pil = Image.fromarray(scaled, mode="L")
    scaled = np.asarray(pil.resize((image_size, image_size), Image.BICUBIC), np.uint8)
  return scaled[:, :, None]


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  """Builder config of :class:`JdiffDigits`.

  Attributes:
    image_size: side length of the stored square images.
  """

  image_size: int = 16


def _registered(name: str) -> bool:
  # Importing this module a second time (importlib.reload, or under another
  # module name) would otherwise fail with "Dataset with name ... already
  # registered"; the first registration wins and keeps serving tfds.builder().
  try:
    tfds.core.registered.imported_builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return False
  return True


class JdiffDigits(tfds.core.GeneratorBasedBuilder, skip_registration=_registered(NAME)):
  """scikit-learn's handwritten digits, resized, with a fixed train/test split."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    DigitsConfig(name=f"{s}x{s}", image_size=s, description=f"{s}x{s} grey-scale")
    for s in (16, 32, 8)
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        "scikit-learn's 8x8 handwritten digits (UCI optdigits test set), "
        f"rescaled to 0..255 and resized to {s}x{s} with PIL bicubic; "
        f"split by default_rng({SPLIT_SEED}).permutation: first {NUM_TEST} "
        "test, rest train."
      ),
      features=tfds.features.FeaturesDict(
        {
          # Raw uint8 tensor, not tfds.features.Image: Image needs TF to encode.
          "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          "index": tfds.features.Scalar(dtype=np.int32),
        }
      ),
      supervised_keys=("image", "label"),
      homepage=(
        "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html"
      ),
      citation=(
        "@misc{optdigits, author={Alpaydin, E. and Kaynak, C.}, year={1998},"
        " title={Optical Recognition of Handwritten Digits},"
        " howpublished={UCI Machine Learning Repository}}"
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    return {
      split: self._generate_examples(digits.images, digits.target, rows)
      for split, rows in split_indices().items()
    }

  def _generate_examples(
    self, images: np.ndarray, targets: np.ndarray, rows: np.ndarray
  ) -> Iterator[tuple[int, dict]]:
    s = self.builder_config.image_size
    for row in rows:
      yield (
        int(row),
        {
          "image": resize_digit(images[row], image_size=s),
          "label": int(targets[row]),
          "index": int(row),
        },
      )


def digits_builder(*, image_size: int = 16, data_dir: str | None = None) -> JdiffDigits:
  """Returns the (not necessarily prepared) digits builder.

  Args:
    image_size: one of 8, 16, 32.
    data_dir: TFDS data directory; ``None`` uses TFDS' default
      (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
  """
  if image_size not in IMAGE_SIZES:
    raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size!r}")
  return JdiffDigits(
    config=f"{image_size}x{image_size}",
    data_dir=None if data_dir is None else str(data_dir),
    file_format="array_record",
  )


def prepare_digits(*, image_size: int = 16, data_dir: str | None = None) -> JdiffDigits:
  """Builds the digits dataset once (array_record) and returns its builder.

  A second call with the same ``data_dir`` finds the prepared files and returns
  at once.

  Args:
    image_size: one of 8, 16, 32.
    data_dir: TFDS data directory; ``None`` uses TFDS' default.

  Returns:
    The prepared builder; ``builder.as_data_source(split)`` reads it.
  """
  builder = digits_builder(image_size=image_size, data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder
