"""Tests for the audio data and outputs: the jdiff_notes builder (deterministic, offline, read by
the input pipeline), WAV round trips (jdiff.audio_io), FFT pitch against synthesised notes,
the real data's pitch-accuracy ceiling, and TensorBoard audio from the written file."""

import os
import socket
import struct
import wave

import numpy as np
import pytest

from jdiff import audio_io
from jdiff.data import notes, pipeline, sources
from jdiff.metrics import audio as audio_metrics

RATE, LENGTH = notes.CONFIGS["8k"]


@pytest.fixture(scope="module")
def notes_dir(tmp_path_factory):
  """jdiff_notes/8k built once for this module, with the network switched off."""
  path = str(tmp_path_factory.mktemp("tfds_notes"))
  real = socket.socket.connect

  def no_network(*a, **k):
    raise AssertionError("building jdiff_notes tried to use the network")

  socket.socket.connect = no_network
  try:
    notes.prepare_notes(data_dir=path)
  finally:
    socket.socket.connect = real
  return path


def test_synthesis_is_deterministic_and_variants_differ():
  a = [e for _, e in notes.generate_split("test", sample_rate=RATE, length=LENGTH)][:8]
  b = [e for _, e in notes.generate_split("test", sample_rate=RATE, length=LENGTH)][:8]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["audio"], y["audio"])
  assert not np.array_equal(a[0]["audio"], a[1]["audio"])  # two variants of one note
  assert a[0]["audio"].dtype == np.int16 and a[0]["audio"].shape == (LENGTH,)


def test_builder_reads_offline_through_the_pipeline(notes_dir):
  meta = sources.dataset_metadata("jdiff_notes", data_dir=notes_dir)
  assert meta.image_shape == (LENGTH, 1) and meta.num_classes == 12
  assert meta.num_examples == {"train": 1152, "test": 216}
  source = sources.load_source("jdiff_notes/8k", split="test", data_dir=notes_dir)
  want = dict(notes.generate_split("test", sample_rate=RATE, length=LENGTH))
  for i in (0, 100, 215):
    rec = source[i]
    np.testing.assert_array_equal(rec["audio"], want[int(rec["index"])]["audio"])
    assert rec["label"] == want[int(rec["index"])]["label"]
  batch = next(pipeline.make_eval_iterator(source, global_batch_size=4, split="test"))
  assert batch["image"].shape == (4, LENGTH, 1) and batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"][0, :, 0] * 32768, source[0]["audio"])


def test_pitch_accuracy_of_the_real_data_is_one(notes_dir):
  source = sources.load_source("jdiff_notes", split="test", data_dir=notes_dir)
  audio = np.stack([source[i]["audio"] for i in range(len(source))]) / 32768
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert audio_metrics.pitch_accuracy(audio, labels, RATE) == 1.0
  assert audio_metrics.pitch_accuracy(audio, (labels + 1) % 12, RATE) == 0.0


def test_fft_pitch_of_a_harmonic_tone_with_a_loud_upper_harmonic():
  t = np.arange(LENGTH) / RATE
  f0 = notes.midi_hz(57)  # A3 = 220 Hz; its 3rd harmonic (E5) is the loudest peak
  x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.2 * np.sin(4 * np.pi * f0 * t)
  x = x + 0.5 * np.sin(6 * np.pi * f0 * t)
  assert audio_metrics.fft_pitch(x[None], RATE)[0] == 57
  with pytest.raises(ValueError, match="shape"):
    audio_metrics.fft_pitch(x, RATE)


def test_wav_round_trip_within_16_bit_quantisation(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 500, 1)).astype(np.float32)
  x[0, :4, 0] = [-1.0, 0.0, 32767 / 32768, -0.5]
  paths = audio_io.save_wavs(str(tmp_path / "s"), x, 8000)
  assert [p.rsplit("/", 1)[1] for p in paths] == ["s_000.wav", "s_001.wav", "s_002.wav"]
  for p, xi in zip(paths, x):
    y, rate = audio_io.read_wav(p)
    assert rate == 8000 and y.shape == (500, 1)
    np.testing.assert_allclose(y, xi, atol=0.5 / 32768 + 1e-9)  # half a 16-bit step
    with wave.open(p) as w:
      assert (w.getsampwidth(), w.getnchannels(), w.getnframes()) == (2, 1, 500)
  np.testing.assert_array_equal(audio_io.read_wav(paths[0])[0][:4, 0], x[0, :4, 0])  # on grid
  clipped = audio_io.read_wav(audio_io.write_wav(str(tmp_path / "c.wav"), [2.0, -3.0], 8000))[0]
  np.testing.assert_array_equal(clipped[:, 0], [32767 / 32768, -1.0])
  with pytest.raises(ValueError, match="non-finite"):
    audio_io.write_wav(str(tmp_path / "n.wav"), [np.nan], 8000)
  with pytest.raises(ValueError, match="shape"):
    audio_io.save_wavs(str(tmp_path / "b"), x[0], 8000)


def _summaries(logdir):
  """(step, summary value) of every event in the TFRecord-framed event files of `logdir`."""
  from tensorboardX.proto import event_pb2

  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), "rb") as f:
      data, pos = f.read(), 0
    while pos < len(data):
      n = struct.unpack_from("<Q", data, pos)[0]  # length, its crc, the event, its crc
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      yield from ((event.step, v) for v in event.summary.value)
      pos += n + 16


def test_tensorboard_audio_is_the_wav_file(tmp_path):
  from jdiff.training.writers import MetricWriter

  path = audio_io.write_wav(str(tmp_path / "a.wav"), np.linspace(-1, 1, 800), 8000)
  with MetricWriter(str(tmp_path / "wd")) as w:
    w.write_audio(3, "samples/audio_0", path)
  ((step, value),) = [sv for sv in _summaries(str(tmp_path / "wd" / "tensorboard")) if sv[1].tag]
  with open(path, "rb") as f:
    assert (step, value.tag, value.audio.encoded_audio_string) == (3, "samples/audio_0", f.read())
  assert (value.audio.sample_rate, value.audio.length_frames) == (8000, 800)
