"""End to end: the audio_notes config, shrunk, trained through the CLI (one subprocess), then
sampled with `--mode=sample`'s function in-process: the WAV files and the .npz hold the same
finite samples in [-1, 1], and training ended with the FD and pitch-accuracy report."""

import json
import os

import numpy as np
import pytest
from conftest import main_args, run_python

from jdiff import audio_io

TINY = {  # audio_notes shrunk: 3 steps of a 2-level U-Net, 4 samples of 2 steps
  "model.ch": 8,
  "model.ch_mult": (1, 2),
  "model.attn_resolutions": (1024,),
  "model.num_groups": 4,
  "diffusion.num_steps": 50,
  "optim.warmup_steps": 1,
  "train.num_steps": 3,
  "train.batch_size": 8,
  "train.log_every": 1,
  "sample.num_steps": 2,
  "sample.num_samples": 4,
  "sample.grid_size": 4,
  "sample.batch_size": 4,
  "eval.quality_samples": 4,
  "eval.is_splits": 2,
  "eval.classifier_steps": 5,
}


@pytest.mark.e2e
def test_audio_notes_train_then_sample_writes_wavs(tmp_path):
  wd, data_dir = str(tmp_path / "wd"), str(tmp_path / "tfds")
  run_python(main_args("train", wd, data_dir, config="audio_notes", **TINY))  # the CLI
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  quality = {k: v for r in rows for k, v in r.items() if k.startswith("quality/")}
  assert np.isfinite(quality["quality/fd"]) and quality["quality/heldout_pitch_accuracy"] == 1.0
  assert 0.0 <= quality["quality/pitch_accuracy"] <= 1.0
  grid = sorted(f for f in os.listdir(os.path.join(wd, "samples")) if f.endswith(".wav"))
  assert grid == [f"grid_0000003_{i:03d}.wav" for i in range(4)]

  from absl import flags

  from jdiff.configs import audio_notes
  from jdiff.runs import diffusion

  if not flags.FLAGS.is_parsed():  # grain reads absl flags; jdiff.cli's required ones may be
    flags.FLAGS.mark_as_parsed()  # defined already, so do not parse (and validate) argv
  config = audio_notes.get_config()
  for key, value in {**TINY, "data.data_dir": data_dir}.items():
    section, name = key.split(".")
    config[section][name] = value
  npz = diffusion.sample(config, wd)
  with np.load(npz) as z:
    samples = z["images"]
  assert samples.shape == (4, 2048, 1) and np.isfinite(samples).all()
  # clip_x0 = 1: the last x0 is clipped; Heun's last step lands on it up to float rounding.
  assert np.abs(samples).max() <= 1.0 + 1e-5
  for i, row in enumerate(samples):
    wav, rate = audio_io.read_wav(npz[: -len(".npz")] + f"_{i:03d}.wav")
    assert rate == 8000
    pcm = np.clip(np.round(row.astype(np.float64) * 32768), -32768, 32767)  # +1 -> 32767
    np.testing.assert_array_equal(wav, pcm / 32768)
