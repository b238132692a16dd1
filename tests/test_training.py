"""The training system end to end: the CLI loop, resume, sharding, multi-process, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, launch_two_processes, main_args, run_python, xla_flags

from jdiff.configs import tiny
from jdiff.runs import autoencoder, diffusion
from jdiff.runs.setup import Setup
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.loop import NonFiniteLossError


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


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- whole loop


@pytest.mark.parametrize("devices", [4])  # 1 device: the README's workflows (test_readme.py)
def test_whole_loop_cli(tmp_path, digits_dir, devices):
  """train -> checkpoint -> resume (more steps) -> sample -> eval, through the CLI."""
  wd = str(tmp_path / "run")
  run_python(main_args("train", wd, digits_dir), devices=devices)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6"]
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert os.path.exists(os.path.join(wd, "samples", "grid_0000006.png"))
  assert any(f.startswith("events.") for f in os.listdir(os.path.join(wd, "tensorboard")))

  proc = run_python(main_args("train", wd, digits_dir, **{"train.num_steps": 9}), devices=devices)
  assert "resumed from" in proc.stderr and "at step 6" in proc.stderr
  assert [r["step"] for r in read_metrics(wd)][-2:] == [8, 9]
  assert "9" in os.listdir(os.path.join(wd, "checkpoints"))

  proc = run_python(main_args("sample", wd, digits_dir), devices=devices)
  assert "samples: 8/8 (100%)" in proc.stderr  # progress (one batch of 8: first = last line)
  samples = np.load(os.path.join(wd, "samples", "samples_ddim5_step9.npz"))
  assert samples["images"].shape == (8, 16, 16, 1)
  assert np.all(np.isfinite(samples["images"])) and np.abs(samples["images"]).max() <= 1.0 + 1e-6
  # A second sample run never overwrites the first file.
  run_python(main_args("sample", wd, digits_dir), devices=devices)
  assert os.path.exists(os.path.join(wd, "samples", "samples_ddim5_step9-1.npz"))

  proc = run_python(main_args("eval", wd, digits_dir), devices=devices)
  assert "eval batches: 5/5 (100%)" in proc.stderr  # 200 test examples in batches of 40
  row = read_metrics(wd)[-1]
  assert row["step"] == 9 and row["eval/examples"] == 200.0
  assert 0.0 < row["eval/loss"] < 2.0
  # A 9-step model's bound is loose (hundreds of bits/dim), but it is a finite upper bound.
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


# ----------------------------------------------------------------------------- exact resume


def test_resume_is_bit_exact(tmp_path, digits_dir):
  """Interrupted at step 3 and resumed == uninterrupted, bit for bit (1 device)."""
  straight = str(tmp_path / "straight")
  interrupted = str(tmp_path / "interrupted")
  diffusion.train_and_evaluate(tiny_config(digits_dir), straight)
  diffusion.train_and_evaluate(tiny_config(digits_dir, **{"train.num_steps": 3}), interrupted)
  assert Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step() == 3
  diffusion.train_and_evaluate(tiny_config(digits_dir), interrupted)
  a = restore_state(straight, tiny_config(digits_dir))
  b = restore_state(interrupted, tiny_config(digits_dir))
  assert int(a.step) == int(b.step) == 6
  assert_trees_equal(a.params, b.params)
  assert_trees_equal(a.ema_params, b.ema_params)
  assert_trees_equal(a.opt_state, b.opt_state)
  # The resumed run also logged the same losses as the straight one.
  la = {r["step"]: r["train/loss"] for r in read_metrics(straight) if "train/loss" in r}
  lb = {r["step"]: r["train/loss"] for r in read_metrics(interrupted) if "train/loss" in r}
  assert la[6] == lb[6]


def test_sigterm_saves_and_resume_matches(tmp_path, digits_dir):
  """SIGTERM mid-run writes a checkpoint at the current step; resuming ends bit-identical."""
  wd = str(tmp_path / "preempted")
  overrides = {"train.num_steps": 400, "train.ckpt_every": 0, "train.log_every": 1}
  env = dict(os.environ, XLA_FLAGS=xla_flags(1))
  proc = subprocess.Popen(
    [sys.executable, *main_args("train", wd, digits_dir, **overrides)],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = os.path.join(wd, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and len(open(metrics).readlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: saved checkpoint" in err
  step = Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
  assert step is not None and 3 <= step < 400
  cfg = tiny_config(digits_dir, **{"train.num_steps": step + 2, "train.ckpt_every": 0})
  diffusion.train_and_evaluate(cfg, wd)
  ref = str(tmp_path / "reference")
  diffusion.train_and_evaluate(cfg, ref)
  assert_trees_equal(restore_state(wd, cfg).params, restore_state(ref, cfg).params)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, digits_dir):
  wd = str(tmp_path / "nan")
  diffusion.train_and_evaluate(tiny_config(digits_dir, **{"train.num_steps": 3}), wd)
  good = restore_state(wd, tiny_config(digits_dir))
  bad = tiny_config(digits_dir, **{"optim.lr": 1e38, "optim.warmup_steps": 0})
  with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step \d"):
    diffusion.train_and_evaluate(bad, wd)
  assert Checkpointer(os.path.join(wd, "checkpoints")).all_steps() == [3]
  assert_trees_equal(restore_state(wd, tiny_config(digits_dir)).params, good.params)


# ----------------------------------------------------------------------------- sharding

ONE_VS_FOUR = r"""
import functools, sys, jax, jax.numpy as jnp, numpy as np
from jdiff.configs import tiny
from jdiff.runs import diffusion
from jdiff.runs.setup import Setup
from jdiff.training import sharding
from jdiff.training.step import make_train_step
from jdiff.data import pipeline
c = tiny.get_config(); c.data.data_dir = sys.argv[1]; c.train.batch_size = 16
setup = Setup(c, sys.argv[2])
it = pipeline.make_train_iterator(c.data.name, global_batch_size=16, seed=0,
                                  data_dir=c.data.data_dir, image_size=16)
batches = [next(it) for _ in range(3)]
out = {}
for n in (1, 4):
  mesh = sharding.make_mesh(jax.devices()[:n])
  repl, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
  step = jax.jit(make_train_step(setup.module, setup.optimizer, **diffusion.loss_kwargs(c)),
                 in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl))
  state = jax.device_put(setup.init_state(), repl)
  losses = []
  for b in batches:
    b = sharding.to_global({k: v for k, v in b.items()}, mesh)
    assert len(b["image"].sharding.device_set) == n
    state, m = step(state, b, setup.schedule, setup.keys.train)
    losses.append(float(m["loss"]))
  out[n] = (losses, jax.device_get(state.params))
print("losses", out[1][0], out[4][0])
np.testing.assert_allclose(out[1][0], out[4][0], rtol=2e-5, atol=1e-6)
for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[4][1])):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
try:
  sharding.check_global_batch(6, sharding.make_mesh())
except ValueError as e:
  print("ERR", e)
setup.close()
print("OK")
"""


def test_one_vs_four_devices_agree(tmp_path, digits_dir):
  proc = run_python(["-c", ONE_VS_FOUR, digits_dir, str(tmp_path / "w")], devices=4)
  assert "OK" in proc.stdout
  assert re.search(
    r"ERR global batch size 6 must be a positive multiple of the device count 4", proc.stdout
  )


def test_two_processes_agree(tmp_path, digits_dir):
  """jax.distributed on 127.0.0.1 (gloo): 2 processes x 2 devices train and agree."""
  wd = str(tmp_path / "dist")
  env = dict(
    os.environ,
    XLA_FLAGS=xla_flags(2),
    JAX_PLATFORMS="cpu",
    JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
  )
  procs = launch_two_processes(wd, digits_dir, env)
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=420)[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  assert "process 0/2, 2 local devices" in outs[0] and "process 1/2, 2 local devices" in outs[1]
  sums = [re.search(r"process \d: params checksum (\S+) at step 6", e).group(1) for e in outs]
  assert sums[0] == sums[1]
  # Only process 0 writes metrics and samples; both data-iterator states are checkpointed.
  assert [r["step"] for r in read_metrics(wd)] == [2, 4, 6]
  data_files = sorted(
    f for f in os.listdir(os.path.join(wd, "checkpoints", "6", "data")) if f.endswith(".json")
  )
  assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]


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
