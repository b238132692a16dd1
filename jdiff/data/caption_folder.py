"""Image-caption pairs from a local folder, for fine-tuning a text-to-image model.

Two layouts, as the fine-tuning scripts of diffusers and kohya read them:

* `metadata.jsonl` in the folder: one JSON object a line with `file_name` (relative to the
  folder) and `text` (the caption), diffusers' ImageFolder convention;
* otherwise every image (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`) with a caption file of the
  same stem beside it (`cat.png` + `cat.txt`).

Images are converted to RGB, centre-cropped to a square and resized (bicubic) to the
model's size. The pairs come back sorted by file name, so a folder always gives the same
order.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from jdiff.data.pipeline import _center_crop_resize as center_crop_resize

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA = "metadata.jsonl"


def list_pairs(folder: str) -> list[tuple[str, str]]:
  """[(image path, caption)] of `folder`, sorted by image path.

  Raises:
    FileNotFoundError: no such folder, or an image named in metadata.jsonl is missing.
    ValueError: no image, an image without a caption, or a bad metadata.jsonl line (each
      named).
  """
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"caption folder {folder!r} does not exist")
  meta = os.path.join(folder, METADATA)
  pairs = []
  if os.path.isfile(meta):
    with open(meta, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          name, text = row["file_name"], row["text"]
        except (ValueError, KeyError, TypeError) as e:
          raise ValueError(
            f"{meta}, line {n}: expected a JSON object with 'file_name' and 'text' ({e})"
          ) from None
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
          raise FileNotFoundError(f"{meta}, line {n}: no image {path!r}")
        pairs.append((path, str(text)))
  else:
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in IMAGE_EXTS:
        continue
      caption = os.path.join(folder, stem + ".txt")
      if not os.path.isfile(caption):
        raise ValueError(
          f"image {os.path.join(folder, name)!r} has no caption file {caption!r} (and the "
          f"folder has no {METADATA})"
        )
      with open(caption, encoding="utf-8") as f:
        pairs.append((os.path.join(folder, name), f.read().strip()))
  if not pairs:
    raise ValueError(
      f"caption folder {folder!r} holds no image ({', '.join(IMAGE_EXTS)}) with a caption"
    )
  return sorted(pairs)


def load_image(path: str, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: the image in RGB, centre-cropped to a square, resized (bicubic)."""
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
  except OSError as e:
    raise ValueError(f"cannot read image {path!r}: {e}") from None
  return center_crop_resize(np.asarray(im, np.uint8), size)


def read_caption_folder(folder: str, *, image_size: int) -> tuple[np.ndarray, list[str]]:
  """(images uint8 [N, image_size, image_size, 3], captions [N]) of `folder`."""
  pairs = list_pairs(folder)
  images = np.stack([load_image(p, image_size) for p, _ in pairs])
  return images, [c for _, c in pairs]
