"""1-D signals in the runs: the networks of `model.arch` 'unet1d' / 'diffwave', what the sample
grids and `--mode=sample` write for them (WAV files, a spectrogram PNG, TensorBoard audio), and
the pitch score of class-conditional samples.

A config is 1-D when its dataset yields signals [L, C] (`jdiff.data.notes`); nothing here
runs for images.
"""

from __future__ import annotations

import os

import numpy as np

from jdiff import audio_io
from jdiff.data import notes
from jdiff.metrics import audio as audio_metrics
from jdiff.training.writers import save_image_grid

SIGNAL_ARCHS = ("unet1d", "diffwave")
DEFAULT_SAMPLE_RATE = 16000


def sample_rate(config) -> int:
  """The dataset's sample rate (jdiff_notes' config), else 16 kHz."""
  return notes.sample_rate_of(config.data.name) or DEFAULT_SAMPLE_RATE


def build_signal_net(config, base_kwargs: dict, *, dtype):
  """The 1-D network of `config.model.arch`: UNet1D from config.model's U-Net options (those
  it has), or DiffWave from config.diffwave."""
  from jdiff.models.diffwave import DiffWave  # pylint: disable=g-import-not-at-top
  from jdiff.models.unet1d import UNet1D  # pylint: disable=g-import-not-at-top

  common = {k: base_kwargs[k] for k in ("num_classes", "out_channels", "learn_sigma")}
  if config.model.arch == "diffwave":
    return DiffWave(dtype=dtype, **dict(config.diffwave), **common)
  fields = set(UNet1D.__dataclass_fields__) - {"parent", "name"}
  return UNet1D(dtype=dtype, **{k: v for k, v in base_kwargs.items() if k in fields})


def spectrogram_images(signals: np.ndarray) -> np.ndarray:
  """Signals [N, L, 1] -> log spectrograms as images [N, bins, frames, 1] in [-1, 1]
  (low frequencies at the bottom; each scaled by its own range)."""
  spec = np.asarray(audio_metrics.log_spectrogram(signals))  # [N, frames, bins]
  lo, hi = spec.min(axis=(1, 2), keepdims=True), spec.max(axis=(1, 2), keepdims=True)
  spec = 2 * (spec - lo) / np.maximum(hi - lo, 1e-6) - 1
  return np.transpose(spec, (0, 2, 1))[:, ::-1, :, None]


def save_grid(config, png: str, samples: np.ndarray, *, writer=None, step: int = 0) -> str:
  """Writes the PNG of the first `config.sample.grid_size` samples (an image grid; for signals
  [N, L, C] their spectrograms, and every signal as a WAV beside it, `<png stem>_000.wav`,
  ...); returns the PNG's path. With a `writer`, signals also go to TensorBoard as audio
  (tag 'samples/audio_i', the first 8)."""
  samples, grid = np.asarray(samples), config.sample.grid_size
  if samples.ndim == 4:
    return save_image_grid(png, samples[:grid])
  rate = sample_rate(config)
  paths = audio_io.save_wavs(os.path.splitext(png)[0], samples, rate)
  out = save_image_grid(png, spectrogram_images(samples[:grid]), scale=2)
  if writer is not None:  # the WAV files themselves
    for i, path in enumerate(paths[:8]):
      writer.write_audio(step, f"samples/audio_{i}", path)
  return out


def pitch_scores(setup, samples: np.ndarray) -> dict[str, float]:
  """{'pitch_accuracy'} of class-conditional samples (row i prompted with note i mod K, as
  `jdiff.runs.generate.batch_inputs` labels them), and the held-out real data's as the
  ceiling; {} for unconditional models or data without notes."""
  if not setup.num_classes or notes.config_of(setup.config.data.name) is None:
    return {}
  from jdiff.data import pipeline  # pylint: disable=g-import-not-at-top

  rate = sample_rate(setup.config)
  labels = np.arange(len(samples)) % setup.num_classes
  c = setup.config.data
  real = list(
    pipeline.make_eval_iterator(
      c.name, global_batch_size=256, split=c.eval_split, data_dir=c.data_dir or None
    )
  )
  mask = np.concatenate([b["mask"] for b in real])
  return {
    "pitch_accuracy": audio_metrics.pitch_accuracy(samples, labels, rate),
    "heldout_pitch_accuracy": audio_metrics.pitch_accuracy(
      np.concatenate([b["image"] for b in real])[mask],
      np.concatenate([b["label"] for b in real])[mask],
      rate,
    ),
  }
