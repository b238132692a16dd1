"""Embedded audio dataset: synthetic instrument notes as a TFDS builder (offline, deterministic).

Each example is one note of the octave C4..B4 (MIDI 60-71; label = pitch class 0..11, C = 0)
played by one of three synthetic timbres (``timbre``):

* ``organ``: harmonics k = 1..K with amplitude 1/k, a flat ADSR (attack 10 ms, sustain 0.8);
* ``pluck``: amplitudes 1/k^1.5, each harmonic decaying as exp(-k t / tau), 2 ms attack;
* ``reed``: odd harmonics 1/k, vibrato (5-6 Hz, 0.6 %), 40 ms attack;

K keeps every harmonic under 0.45 x the sample rate (no aliasing). Per example a seeded
generator (`numpy.random.default_rng([SEED, split, note, timbre, variant])`) draws the detune
(+-10 cents), the phases, the peak level (0.5..0.8) and the envelope times, so the data are
the same bits on every machine. Samples are stored as int16 PCM (``audio`` [L]); the input
pipeline maps them to float32 [L, 1] in [-1, 1) (`jdiff.data.pipeline`).

Configs (``jdiff_notes/<config>``): ``8k`` (default: 8 kHz, 2,048 samples = 0.256 s, small
enough to train on a CPU in minutes) and ``16k`` (16 kHz, 8,192 samples = 0.512 s). Splits:
``train`` 32 and ``test`` 6 variants of each of the 12 x 3 (note, timbre) pairs: 1,152 and 216.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jdiff.data.digits import _registered

NAME = "jdiff_notes"
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
TIMBRES = ("organ", "pluck", "reed")
BASE_MIDI = 60  # C4
SEED = 20260
VARIANTS = {"train": 32, "test": 6}
CONFIGS = {"8k": (8000, 2048), "16k": (16000, 8192)}  # name -> (sample_rate, length)


def midi_hz(midi) -> np.ndarray:
  """Equal-tempered frequency of a MIDI note number (A4 = 69 = 440 Hz)."""
  return 440.0 * 2.0 ** ((np.asarray(midi, np.float64) - 69.0) / 12.0)


def _adsr(n: int, rate: int, attack: float, decay: float, sustain: float, release: float):
  """Piecewise-linear ADSR envelope [n] (times in seconds)."""
  t = np.arange(n) / rate
  a = np.clip(t / attack, 0.0, 1.0)
  d = 1.0 - (1.0 - sustain) * np.clip((t - attack) / decay, 0.0, 1.0)
  r = np.clip((n / rate - t) / release, 0.0, 1.0)
  return a * d * r


def synth_note(
  note: int, timbre: int, rng: np.random.Generator, *, sample_rate: int, length: int
) -> np.ndarray:
  """One note as int16 PCM [length].

  Args:
    note: pitch class 0..11 (MIDI BASE_MIDI + note).
    timbre: index into TIMBRES.
    rng: the example's generator (detune, phases, level, envelope times).
    sample_rate, length: Hz and samples.
  """
  if not 0 <= note < 12 or not 0 <= timbre < len(TIMBRES):
    raise ValueError(
      f"note must be in 0..11 and timbre in 0..{len(TIMBRES) - 1}, got {note}, {timbre}"
    )
  f0 = midi_hz(BASE_MIDI + note) * 2.0 ** (rng.uniform(-10, 10) / 1200)
  t = np.arange(length) / sample_rate
  name = TIMBRES[timbre]
  ks = np.arange(1, int(0.45 * sample_rate / f0) + 1)
  if name == "reed":
    ks = ks[ks % 2 == 1]
  vib_rate, phase_v = rng.uniform(5.0, 6.0), rng.uniform(0, 2 * np.pi)
  depth = 0.006 if name == "reed" else 0.0
  # instantaneous phase of the fundamental with vibrato: integral of f0 (1 + depth sin)
  phase = (
    2
    * np.pi
    * f0
    * (t - depth * np.cos(2 * np.pi * vib_rate * t + phase_v) / (2 * np.pi * vib_rate))
  )
  x = np.zeros(length)
  for k in ks:
    amp = 1.0 / k**1.5 if name == "pluck" else 1.0 / k
    if name == "pluck":
      amp = amp * np.exp(-k * t / rng.uniform(0.15, 0.3))
    x += amp * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
  env = {
    "organ": _adsr(length, sample_rate, 0.01, 0.05, 0.8, 0.02),
    "pluck": _adsr(length, sample_rate, 0.002, 0.01, 1.0, 0.01),
    "reed": _adsr(length, sample_rate, rng.uniform(0.03, 0.05), 0.05, 0.7, 0.03),
  }[name]
  x = x * env
  x *= rng.uniform(0.5, 0.8) / np.max(np.abs(x))
  return np.round(x * 32767).astype(np.int16)


def generate_split(split: str, *, sample_rate: int, length: int) -> Iterator[tuple[int, dict]]:
  """(key, example) of a split in a fixed order: note-major, then timbre, then variant."""
  split_id = list(VARIANTS).index(split)
  for note in range(12):
    for timbre in range(len(TIMBRES)):
      for v in range(VARIANTS[split]):
        rng = np.random.default_rng([SEED, split_id, note, timbre, v])
        index = (note * len(TIMBRES) + timbre) * VARIANTS[split] + v
        audio = synth_note(note, timbre, rng, sample_rate=sample_rate, length=length)
        yield index, {"audio": audio, "label": note, "timbre": timbre, "index": index}


@dataclasses.dataclass(eq=False)
class NotesConfig(tfds.core.BuilderConfig):
  """sample_rate (Hz) and length (samples) of the stored notes."""

  sample_rate: int = 8000
  length: int = 2048


class JdiffNotes(tfds.core.GeneratorBasedBuilder, skip_registration=_registered(NAME)):
  """Synthetic instrument notes (12 pitch classes x 3 timbres), int16 PCM."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    NotesConfig(name=n, sample_rate=r, length=n_s, description=f"{r} Hz, {n_s} samples")
    for n, (r, n_s) in CONFIGS.items()
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        f"Synthetic notes C4..B4 ({', '.join(TIMBRES)}) at {cfg.sample_rate} Hz, "
        f"{cfg.length} samples, int16; seeded per example (jdiff.data.notes)."
      ),
      features=tfds.features.FeaturesDict(
        {
          # Raw int16 tensor, not tfds.features.Audio (whose encoding needs TensorFlow).
          "audio": tfds.features.Tensor(shape=(cfg.length,), dtype=np.int16),
          "label": tfds.features.ClassLabel(names=list(NOTE_NAMES)),
          "timbre": tfds.features.ClassLabel(names=list(TIMBRES)),
          "index": tfds.features.Scalar(dtype=np.int32),
        }
      ),
      supervised_keys=("audio", "label"),
      metadata=tfds.core.MetadataDict(sample_rate=cfg.sample_rate),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # synthesised: nothing to download
    return {split: self._generate_examples(split) for split in VARIANTS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    return generate_split(split, sample_rate=cfg.sample_rate, length=cfg.length)


def config_of(name: str) -> str | None:
  """The config of ``jdiff_notes[/8k|/16k]`` ('8k' for the plain name), None for other names."""
  base, _, config = name.partition("/")
  if base != NAME:
    return None
  if config and config not in CONFIGS:
    raise ValueError(f"unknown config {config!r} of {NAME}; choose one of {sorted(CONFIGS)}")
  return config or "8k"


def sample_rate_of(name: str) -> int | None:
  """The sample rate of a jdiff_notes name, None for other datasets."""
  config = config_of(name)
  return None if config is None else CONFIGS[config][0]


def prepare_notes(name: str = NAME, *, data_dir: str | None = None) -> JdiffNotes:
  """Builds ``jdiff_notes[/config]`` once (array_record, offline) and returns its builder."""
  builder = JdiffNotes(
    config=config_of(name),
    data_dir=None if data_dir is None else str(data_dir),
    file_format="array_record",
  )
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder
