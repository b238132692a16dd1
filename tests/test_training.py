"""The training system end to end: the CLI loop on 4 devices, and its errors."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
from conftest import main_args, run_python

from jdiff.configs import tiny
from jdiff.runs import autoencoder, diffusion
from jdiff.runs.setup import Setup


def tiny_config(data_dir: str, **overrides):
  c = tiny.get_config()
  c.data.data_dir = data_dir
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    target = c
    for part in filter(None, section.split(".")):
      target = target[part]
    target[field] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restore_state(workdir, config):
  with Setup(config, workdir) as setup:
    return setup.checkpointer.restore(setup.abstract_state())


# ----------------------------------------------------------------------------- whole loop


def test_whole_loop_cli(tmp_path, tiny_run):
  """train (the session's tiny run, through the CLI) -> sample -> eval on 4 devices, through
  the CLI. Resume: the README's workflows, tests/test_reliability.py (bit-exact, after kills
  and faults) and tests/test_scale.py (on other meshes)."""
  wd, digits_dir, devices = tiny_run.copy(tmp_path), tiny_run.data_dir, 4
  assert os.path.exists(os.path.join(wd, "samples", "grid_0000006.png"))
  assert all(np.isfinite(r["train/loss"]) for r in read_metrics(wd))

  proc = run_python(main_args("sample", wd, digits_dir), devices=devices)
  assert "process 0/1, 4 local devices" in proc.stderr
  assert "samples: 8/8 (100%)" in proc.stderr  # progress (one batch of 8: first = last line)
  samples = np.load(os.path.join(wd, "samples", "samples_ddim5_step6.npz"))
  assert samples["images"].shape == (8, 16, 16, 1)
  assert np.all(np.isfinite(samples["images"])) and np.abs(samples["images"]).max() <= 1.0 + 1e-6

  proc = run_python(main_args("eval", wd, digits_dir), devices=devices)
  assert "eval batches: 5/5 (100%)" in proc.stderr  # 200 test examples in batches of 40
  row = read_metrics(wd)[-1]
  assert row["step"] == 6 and row["eval/examples"] == 200.0
  assert 0.0 < row["eval/loss"] < 2.0
  # A 6-step model's bound is loose (hundreds of bits/dim), but it is a finite upper bound.
  assert np.isfinite(row["eval/bpd_bound"]) and row["eval/bpd_bound"] > 0.5
  assert row["eval/bound_examples"] >= 4

  # TensorBoard: the config as text, the grids as images (the PNG files), the eval metrics.
  tags = tensorboard_tags(os.path.join(wd, "tensorboard"))
  assert {"config/text_summary", "samples/grid", "samples/ddim5", "eval/loss"} <= tags, tags


def tensorboard_tags(logdir: str) -> set[str]:
  """Every summary tag in the TensorBoard event files of `logdir` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  tags = set()
  for name in os.listdir(logdir):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      pos += 12 + length + 4
  return tags


# ----------------------------------------------------------------------------- bad input


def test_bad_flags_and_config_give_clear_errors(tmp_path, digits_dir):
  wd = str(tmp_path / "bad")
  p = run_python(main_args("train", wd, digits_dir, **{"optim.lrr": 1}), check=False)
  assert p.returncode != 0 and "bad config override --config.optim.lrr=1" in p.stderr
  assert 'Did you mean "lr"' in p.stderr
  p = run_python(
    main_args("train", wd, digits_dir, **{"train.batch_size": 6}), devices=4, check=False
  )
  assert p.returncode != 0
  assert "global batch size 6 must be a positive multiple of the device count 4" in p.stderr
  p = run_python(main_args("sample", wd, digits_dir), check=False)
  assert p.returncode != 0 and "no checkpoint under" in p.stderr
  p = run_python(
    ["-m", "experiments.main", "--config=jdiff/configs/nope.py", f"--workdir={wd}"],
    check=False,
  )
  assert p.returncode != 0 and "nope.py" in p.stderr


@pytest.mark.parametrize(
  "key,value,message",
  [
    # The config's own rules: tests/test_validate.py.
    ("data.name", "no_such_dataset_xyz", "no_such_dataset_xyz"),
  ],
)
def test_bad_config_values(tmp_path, digits_dir, key, value, message):
  cfg = tiny_config(digits_dir, **{key: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    with Setup(cfg, str(tmp_path / "w")) as setup:
      diffusion.sample_fn(setup)


def test_mode_and_config_kind_must_match(tmp_path, digits_dir):
  with pytest.raises(ValueError, match=r"runs autoencoder configs .* of kind 'diffusion'"):
    autoencoder.train_autoencoder(tiny_config(digits_dir), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # nothing was created
