"""Progress lines: counts, rate after the first (compile) update, ETA, and the period."""

from __future__ import annotations

import pytest

from jdiff.training.progress import Progress, format_seconds


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


def test_format_seconds():
  assert format_seconds(4.2) == "4s"
  assert format_seconds(75.4) == "1m15s"
  assert format_seconds(3725) == "1h02m05s"


def test_lines_rate_eta_and_period():
  clock, lines = FakeClock(), []
  p = Progress(100, "samples", every_s=5.0, log_fn=lines.append, clock=clock)
  clock.now = 30.0  # first batch: compilation included
  p.update(10)
  assert lines == ["samples: 10/100 (10%), 0.333 samples/s, ETA 4m30s (includes compilation)"]
  clock.now = 32.0
  p.update(10)  # within the period: no line
  assert len(lines) == 1
  clock.now = 35.0  # 20 more in 5 s after the first update: 4/s, 70 left -> 17.5 s
  p.update(10)
  assert lines[-1] == "samples: 30/100 (30%), 4 samples/s, ETA 18s"
  clock.now = 52.5
  p.update(70)
  p.close()
  p.close()  # idempotent
  assert lines[-1] == "samples: 100/100 (100%), 4 samples/s, done in 52s"
  assert len(lines) == 3


def test_bad_total_names_it():
  with pytest.raises(ValueError, match="got 0 \\(images\\)"):
    Progress(0, "images")


def test_quiet_on_other_processes(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(jax, "process_index", lambda: 1)
  lines = []
  p = Progress(10, "images", log_fn=lines.append, clock=FakeClock())
  p.update(10)
  p.close()
  assert lines == [] and p.done == 10
