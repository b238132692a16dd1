"""WAV files of 1-D samples: 16-bit PCM through the standard library's `wave` (a leaf module).

Floats in [-1, 1] map to int16 as ``clip(round(32768 x), -32768, 32767)``, the inverse of the
input pipeline's ``int16 / 32768`` (`jdiff.data.pipeline.audio_to_float`): a real example
written and read back is bit-identical, and any signal comes back within half a step
(1 / 65536) where it is inside [-1, 32767 / 32768].
"""

from __future__ import annotations

import os
import wave

import numpy as np

from jdiff.io import atomic_write


def to_pcm16(audio) -> np.ndarray:
  """float [..., L(, C)] in [-1, 1] -> int16 on the 16-bit grid (clipped; NaN is an error)."""
  audio = np.asarray(audio, np.float64)
  if not np.isfinite(audio).all():
    raise ValueError(f"audio has non-finite values ({np.sum(~np.isfinite(audio))} of {audio.size})")
  return np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)


def write_wav(path: str, audio, sample_rate: int) -> str:
  """Writes one signal [L] or [L, C] (float in [-1, 1]) as 16-bit PCM; returns the path.

  Raises:
    ValueError: naming the bad shape, sample rate or non-finite values.
  """
  audio = np.asarray(audio)
  if audio.ndim == 1:
    audio = audio[:, None]
  if audio.ndim != 2 or not audio.size:
    raise ValueError(f"audio must be [L] or [L, C], got shape {audio.shape}")
  if not isinstance(sample_rate, (int, np.integer)) or sample_rate < 1:
    raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
  pcm = to_pcm16(audio)

  def write(p):
    with wave.open(p, "wb") as w:
      w.setnchannels(pcm.shape[1])
      w.setsampwidth(2)
      w.setframerate(int(sample_rate))
      w.writeframes(pcm.astype("<i2").tobytes())

  return atomic_write(path, write)  # a free name (stem-1.wav, ...) if path exists


def read_wav(path: str) -> tuple[np.ndarray, int]:
  """(float32 [L, C] = int16 / 32768, sample rate) of a 16-bit PCM WAV file."""
  with wave.open(path, "rb") as w:
    if w.getsampwidth() != 2:
      raise ValueError(f"{path}: expected 16-bit PCM, got {8 * w.getsampwidth()}-bit samples")
    frames, channels, rate = w.readframes(w.getnframes()), w.getnchannels(), w.getframerate()
  pcm = np.frombuffer(frames, "<i2").reshape(-1, channels)
  return pcm.astype(np.float32) / np.float32(32768), rate


def save_wavs(stem: str, audios, sample_rate: int) -> list[str]:
  """Writes samples [N, L, C] as `stem_000.wav`, `stem_001.wav`, ...; returns the paths."""
  audios = np.asarray(audios)
  if audios.ndim != 3:
    raise ValueError(f"samples must be [N, L, C], got shape {audios.shape}")
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  return [write_wav(f"{stem}_{i:03d}.wav", a, sample_rate) for i, a in enumerate(audios)]
