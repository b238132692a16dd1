"""Process-0 outputs: metrics as JSON lines and TensorBoard events, image grids as PNG.

Files are written atomically (to a temporary name, then renamed; `atomic_write`). Outputs
(grids, samples) never overwrite: a name that exists gets a numeric suffix. Records that
describe a workdir (`write_json`) are replaced in place.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Mapping

import jax
import numpy as np

from jdiff.io import atomic_write, unique_path  # noqa: F401 (re-exported)


def unique_stem(stem: str, exts: tuple[str, ...]) -> str:
  """`stem`, or `stem-1`, `stem-2`, ... : the first with none of `stem + ext` existing.

  The files of one set (a sample's `.npz` and its `.png`) then take one suffix together,
  even when only some of an earlier set's files are left.
  """
  out, i = stem, 0
  while any(os.path.exists(out + ext) for ext in exts):
    i += 1
    out = f"{stem}-{i}"
  return out


class WorkdirError(ValueError):
  """--workdir is empty, not a directory, or not writable."""


def check_workdir(path: str, *, flag: str = "--workdir") -> str:
  """The absolute `path`, once it is known to be (or to be creatable as) a writable
  directory: checked before any work, so that a run never fails at its first write.

  Raises:
    WorkdirError: one line naming `flag`, the path and the reason (with the errno).
  """
  if not path:
    raise WorkdirError(f"{flag} is empty: give the run's directory, e.g. {flag}=runs/digits")
  path = os.path.abspath(path)
  where = f"{flag}={path}"
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise WorkdirError(f"{where} is not a directory")
    try:  # a real write: access() does not see every cause (read-only mounts over NFS)
      fd, probe = tempfile.mkstemp(dir=path, prefix=".jdiff-write-check-")
      os.close(fd)
      os.remove(probe)
    except OSError as e:
      raise WorkdirError(f"{where} is not writable: [Errno {e.errno}] {e.strerror}") from None
    return path
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise WorkdirError(f"{where} cannot be created: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"{where} cannot be created: {parent} is not writable")
  return path


def write_json(path: str, obj: Mapping) -> str:
  """Writes `obj` as indented, key-sorted JSON atomically, replacing `path`."""

  def write(p):
    with open(p, "w", encoding="utf-8") as f:
      json.dump(obj, f, indent=2, sort_keys=True)

  return atomic_write(path, write, overwrite=True)


def image_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles images [N, H, W, C] in [-1, 1] into one uint8 image [rows*(H+pad)+pad, ..., C]."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  u8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for k in range(n):
    r, q = divmod(k, ncols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w
    ] = u8[k]
  return grid


def save_image_grid(
  path: str, images: np.ndarray, *, scale: int = 4, ncols: int | None = None
) -> str:
  """Writes an upscaled PNG grid of images in [-1, 1]; returns the path written."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  grid = image_grid(images, ncols=ncols)
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  return atomic_write(path, lambda p: img.save(p, format="PNG"))


def save_npz(path: str, **arrays) -> str:
  """Writes arrays to a new .npz (never overwriting); returns the path written."""

  def write(p):
    with open(p, "wb") as f:
      np.savez(f, **arrays)

  return atomic_write(path, write)


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without torch.

  tensorboardX's writer imports torch when it is installed, only to accept torch tensors
  (it falls back to numpy on an ImportError); jdiff writes numpy and floats. Where torch is
  installed but not yet imported, it is hidden for this one import: importing torch costs 1.9 s
  of every run's start-up (AVX2 CPU), and more processes start than train for long (sampling,
  evaluation, the test suite's). Raises ImportError without tensorboardX."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if hide and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard events (process 0 only).

  A context manager: leaving the block closes both files, errors included.
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self.workdir = workdir
    self._tb = None
    self._jsonl = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._open()

  def _open(self, purge_step: int | None = None) -> None:
    self._jsonl = open(os.path.join(self.workdir, "metrics.jsonl"), "a", encoding="utf-8")
    try:
      self._tb = _summary_writer_class()(
        os.path.join(self.workdir, "tensorboard"), purge_step=purge_step
      )
    except ImportError:
      self._tb = None

  def truncate_after(self, step: int) -> int:
    """Drops the rows past `step` (a resumed run's restored step): they belong to the
    interrupted run's lost steps and are logged again, so no step appears twice.

    metrics.jsonl is rewritten atomically; TensorBoard is told to purge events past
    `step` (tensorboardX's `purge_step`). Returns how many rows were dropped.
    """
    if not self.active:
      return 0
    path = os.path.join(self.workdir, "metrics.jsonl")
    self.close()
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
    # A torn last line (killed mid-write) is dropped too.
    keep = [ln for ln in lines if ln.endswith("\n") and _row_step(ln) is not None]
    keep = [ln for ln in keep if _row_step(ln) <= step]
    if len(keep) != len(lines):

      def write(p):
        with open(p, "w", encoding="utf-8") as f:
          f.writelines(keep)

      atomic_write(path, write, overwrite=True)
    self._open(purge_step=step + 1)
    return len(lines) - len(keep)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def write_image(self, step: int, tag: str, png_path: str) -> None:
    """Shows an already written PNG (a sample grid, reconstructions) in TensorBoard.

    The image is the file itself, read back: TensorBoard and the PNG never differ, and
    nothing is sampled twice.
    """
    if not self.active or self._tb is None:
      return
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(png_path) as img:
      pixels = np.asarray(img.convert("RGB"))
    self._tb.add_image(tag, pixels, int(step), dataformats="HWC")
    self._tb.flush()

  def write_audio(self, step: int, tag: str, wav_path: str) -> None:
    """Shows an already written WAV file (16-bit PCM) in TensorBoard, its bytes as they are.

    tensorboardX's `add_audio` would encode the clip again with `soundfile`; the summary proto
    takes the file's bytes directly.
    """
    if not self.active or self._tb is None:
      return
    import wave  # pylint: disable=g-import-not-at-top

    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top

    with wave.open(wav_path, "rb") as w:
      rate, channels, frames = w.getframerate(), w.getnchannels(), w.getnframes()
    with open(wav_path, "rb") as f:
      clip = Summary.Audio(
        sample_rate=rate,
        num_channels=channels,
        length_frames=frames,
        encoded_audio_string=f.read(),
        content_type="audio/wav",
      )
    self._tb._get_file_writer().add_summary(  # noqa: SLF001 (add_audio's own path)
      Summary(value=[Summary.Value(tag=tag, audio=clip)]), int(step)
    )
    self._tb.flush()

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A text panel in TensorBoard (markdown), e.g. the run's config."""
    if not self.active or self._tb is None:
      return
    self._tb.add_text(tag, text, int(step))
    self._tb.flush()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Closes the files (idempotent)."""
    jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None
    try:
      if jsonl is not None:
        jsonl.close()
    finally:
      if tb is not None:
        tb.close()


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def write_scalars_once(workdir: str, step: int, scalars: Mapping[str, float]) -> None:
  """Appends one row of scalars to the workdir's metrics (process 0 only) and closes."""
  with MetricWriter(workdir) as writer:
    writer.write_scalars(step, scalars)
