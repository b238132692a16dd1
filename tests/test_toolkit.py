"""The config-free training toolkit, unit by unit: random streams, EMA, checkpoints (partial
restore, closing on errors), atomic writes and the metric writer."""

from __future__ import annotations

import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from jdiff.training import optim, rng, writers
from jdiff.training.checkpoint import Checkpointer


def _key_data(key):
  return np.asarray(jax.random.key_data(key))


def test_streams_are_named_fold_ins():
  base = jax.random.key(7)
  for name in ("sample", "eval", "bound", "grid"):
    np.testing.assert_array_equal(
      _key_data(rng.stream(base, name)),
      _key_data(jax.random.fold_in(base, zlib.crc32(name.encode()))),
    )
  names = ("sample", "eval", "bound", "grid", "x_T", "sampler")
  datas = {tuple(_key_data(rng.stream(base, n)).ravel()) for n in names}
  assert len(datas) == len(names)
  with pytest.raises(ValueError, match="''"):
    rng.stream(base, "")


def test_run_keys_keep_the_historical_training_stream():
  keys = rng.run_keys(3)
  np.testing.assert_array_equal(
    _key_data(keys.train), _key_data(jax.random.split(jax.random.key(3), 3)[0])
  )
  np.testing.assert_array_equal(_key_data(keys.init), _key_data(jax.random.key(3, impl="rbg")))
  np.testing.assert_array_equal(
    _key_data(keys.stream("eval")), _key_data(rng.stream(jax.random.key(3), "eval"))
  )


def test_ema_update_is_the_exponential_average():
  ema = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([0.5], jnp.bfloat16)}
  new = {"w": jnp.array([0.0, 4.0, 3.5]), "b": jnp.array([1.5], jnp.bfloat16)}
  out = optim.ema_update(ema, new, jnp.float32(0.9))
  np.testing.assert_allclose(np.asarray(out["w"]), [0.9, -1.4, 3.05], rtol=1e-6)
  assert out["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["b"], np.float32), [0.6], rtol=1e-2)


def _state(step):
  return {
    "step": jnp.int32(step),
    "params": {"w": jnp.full((2, 3), float(step))},
    "opt": {"m": jnp.arange(4.0) * step},
  }


def test_checkpointer_partial_restore_reads_one_field(tmp_path):
  with Checkpointer(str(tmp_path / "ck"), max_to_keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, _state(step))
    ck.wait()
    assert ck.all_steps() == [2, 3]
    target = {"params": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}
    restored, step = ck.restore_partial(target)
    assert step == 3 and set(restored) == {"params"}
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((2, 3), 3.0))
    restored, step = ck.restore_partial(target, step=2)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.full((2, 3), 2.0))
    full = ck.restore(jax.tree.map(jnp.zeros_like, _state(0)))
    np.testing.assert_array_equal(np.asarray(full["opt"]["m"]), np.arange(4.0) * 3)
    with pytest.raises(FileNotFoundError, match="no checkpoint 1 under"):
      ck.restore_partial(target, step=1)
  with (
    Checkpointer(str(tmp_path / "empty")) as ck,
    pytest.raises(FileNotFoundError, match="no checkpoint under"),
  ):
    ck.restore(_state(0))


def test_checkpointer_closes_on_error_and_keeps_the_error(tmp_path):
  """An error inside the block propagates unchanged; the in-flight save is completed."""
  directory = str(tmp_path / "ck")
  with pytest.raises(KeyError, match="the user's error"):
    with Checkpointer(directory) as ck:
      ck.save(5, _state(5))
      raise KeyError("the user's error")
  with Checkpointer(directory) as ck:
    assert ck.latest_step() == 5
    np.testing.assert_array_equal(
      np.asarray(ck.restore(_state(0))["params"]["w"]), np.full((2, 3), 5.0)
    )


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  path = str(tmp_path / "out" / "a.json")

  def broken(p):
    with open(p, "w", encoding="utf-8") as f:
      f.write("{half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    writers.atomic_write(path, broken)
  assert os.listdir(tmp_path / "out") == []
  assert writers.write_json(path, {"b": 1, "a": [2]}) == path
  assert writers.write_json(path, {"c": 3}) == path  # records are replaced in place
  with open(path, encoding="utf-8") as f:
    assert json.load(f) == {"c": 3}
  # Outputs never overwrite: the second one gets a suffix.
  first = writers.atomic_write(str(tmp_path / "g.txt"), lambda p: open(p, "w").close())
  second = writers.atomic_write(str(tmp_path / "g.txt"), lambda p: open(p, "w").close())
  assert (os.path.basename(first), os.path.basename(second)) == ("g.txt", "g-1.txt")


def test_metric_writer_closes_on_error(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with writers.MetricWriter(str(tmp_path)) as w:
      w.write_scalars(3, {"train/loss": 0.5})
      raise RuntimeError("boom")
  assert w._jsonl is None  # pylint: disable=protected-access
  with open(tmp_path / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [{"step": 3, "train/loss": 0.5}]


def test_metric_writer_writes_tensorboard_without_importing_torch(tmp_path):
  """tensorboardX is imported with torch hidden (it would import it only to accept torch
  tensors), and torch imports normally afterwards. In a fresh process: the suite's workers
  import torch for their references."""
  script = f"""
import glob, sys
from jdiff.training import writers
with writers.MetricWriter({str(tmp_path)!r}) as w:
  w.write_scalars(1, {{"train/loss": 0.5}})
  w.write_text(1, "note", "hello")
assert "torch" not in sys.modules, "tensorboardX imported torch"
assert glob.glob({str(tmp_path / "tensorboard" / "events.out.tfevents.*")!r})
import torch
assert float(torch.ones(3).sum()) == 3.0
"""
  run_python(["-c", script])
