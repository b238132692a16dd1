"""Scores of 1-D audio samples: FFT pitch, pitch accuracy, log spectrograms and the spectrogram
classifier whose features give an FD (the audio counterpart of the digits classifier).

The pitch of a note is the equal-tempered candidate f (MIDI 36..95) with the largest harmonic
sum ``sum_k |X(k f)| / k`` (k = 1..5, X the Hann-windowed magnitude spectrum at the nearest
bin): a summary of the harmonic series that, unlike the largest peak, is not fooled by a strong
upper harmonic. A sample is right when its pitch class (MIDI mod 12) is the prompted one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.classifier import SmallClassifier

Array = jax.Array
CANDIDATES = np.arange(36, 96)  # MIDI C2..B6
HARMONICS = 5


def fft_pitch(audio, sample_rate: int) -> np.ndarray:
  """MIDI note numbers [B] (CANDIDATES) of signals [B, L] or [B, L, 1] (module docstring)."""
  x = np.asarray(audio, np.float64)
  x = x[..., 0] if x.ndim == 3 else x
  if x.ndim != 2:
    raise ValueError(f"audio must be [B, L] or [B, L, 1], got shape {np.shape(audio)}")
  n = x.shape[1]
  mag = np.abs(np.fft.rfft(x * np.hanning(n), axis=1))  # [B, n // 2 + 1]
  f0 = 440.0 * 2.0 ** ((CANDIDATES - 69) / 12)
  k = np.arange(1, HARMONICS + 1)
  bins = np.round(f0[:, None] * k[None, :] * n / sample_rate).astype(int)  # [F, K]
  valid = bins < mag.shape[1]
  score = (mag[:, np.minimum(bins, mag.shape[1] - 1)] * (valid / k)).sum(-1)  # [B, F]
  return CANDIDATES[np.argmax(score, axis=1)]


def pitch_accuracy(audio, notes, sample_rate: int) -> float:
  """Share of signals [B, L(, 1)] whose FFT pitch class equals `notes` [B] (0..11, mod 12)."""
  notes = np.asarray(notes)
  return float(np.mean(fft_pitch(audio, sample_rate) % 12 == notes % 12))


def log_spectrogram(audio: Array, *, n_fft: int = 256, hop: int = 128) -> Array:
  """log(1e-3 + |STFT|) [B, frames, n_fft // 2 + 1] of signals [B, L, 1] (Hann, no padding)."""
  x = jnp.asarray(audio, jnp.float32)[..., 0]
  frames = 1 + (x.shape[1] - n_fft) // hop
  idx = hop * jnp.arange(frames)[:, None] + jnp.arange(n_fft)[None, :]
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(n_fft) / n_fft)  # periodic Hann
  return jnp.log(1e-3 + jnp.abs(jnp.fft.rfft(x[:, idx] * window, axis=-1)))


class SpectrogramClassifier(nn.Module):
  """`SmallClassifier` on the log spectrogram: signals [B, L, 1] -> (features, logits)."""

  num_classes: int = 12
  width: int = 16
  features: int = 128

  @nn.compact
  def __call__(self, audio: Array) -> tuple[Array, Array]:
    spec = log_spectrogram(audio)[..., None]  # [B, frames, bins, 1]
    return SmallClassifier(self.num_classes, self.width, self.features, name="net")(spec)
