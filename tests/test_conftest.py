"""The shared test helpers: one conftest module, and the `tiny_run` fixture's contract."""

from __future__ import annotations

import importlib
import json
import os
import re

import pytest


def test_conftest_is_one_module():
  """`from conftest import` and `from tests.conftest import` give the same module object, so
  the helpers' state (the compile-cache setting, fixtures' types) exists once."""
  import conftest  # pylint: disable=g-import-not-at-top

  from tests.conftest import TinyRun, run_python  # pylint: disable=g-import-not-at-top

  assert importlib.import_module("tests.conftest") is conftest
  assert TinyRun is conftest.TinyRun and run_python is conftest.run_python


@pytest.mark.e2e
def test_tiny_run_is_the_documented_run(tiny_run, tmp_path):
  wd = tiny_run.workdir
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == list("123456")
  assert os.path.exists(os.path.join(wd, "samples", "grid_0000006.png"))
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert re.search(r"params checksum \S+ at step 6", tiny_run.log)
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["model.conv_impl"] == "xla"  # the stored config, flat keys
  # A copy is private: writing to it leaves the shared run as it was.
  copy = tiny_run.copy(tmp_path)
  os.remove(os.path.join(copy, "metrics.jsonl"))
  assert os.path.exists(os.path.join(wd, "metrics.jsonl"))
