"""Progress lines for long host-side loops: done/total, rate and ETA, on process 0 only.

  with Progress(total=700, what="samples") as progress:
    for batch in batches:
      ...
      progress.update(len(batch))

logs, at most every `every_s` seconds and once at the end,

  samples: 192/700 (27%), 3.1 samples/s, ETA 2m44s

The first update is reported at once (it usually includes compilation, which the rate
line says), so a user never waits in silence for the first period.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
from absl import logging


def format_seconds(seconds: float) -> str:
  """`75.4 -> "1m15s"`, `3725 -> "1h02m05s"`, `4.2 -> "4s"`."""
  s = int(round(max(seconds, 0.0)))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


class Progress:
  """Counts work done and logs `done/total, rate, ETA` every `every_s` seconds.

  Quiet on every process but 0 (each process would report the same global count). The
  rate excludes the first update's time when there are later ones, so a compile does not
  spoil the ETA.

  Args:
    total: units of work in all (> 0).
    what: the unit's name, e.g. "samples", "images", "steps".
    every_s: minimum seconds between two lines.
    log_fn: where lines go (default: absl `logging.info`); tests pass a list's append.
    clock: a monotonic clock (tests pass a fake one).
  """

  def __init__(
    self,
    total: int,
    what: str,
    *,
    every_s: float = 5.0,
    log_fn: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    if total <= 0:
      raise ValueError(f"Progress total must be > 0, got {total} ({what})")
    self.total, self.what, self.every_s = int(total), what, float(every_s)
    self.done = 0
    self._clock = clock
    self._log = log_fn if log_fn is not None else (lambda line: logging.info("%s", line))
    self._quiet = jax.process_index() != 0
    self._t0 = clock()
    self._first: tuple[float, int] | None = None  # (time, done) after the first update
    self._last_line = -float("inf")
    self._closed = False
    self._logged_done = -1

  def rate(self) -> float:
    """Units per second, measured after the first update when possible."""
    now = self._clock()
    if self._first is not None and self.done > self._first[1] and now > self._first[0]:
      return (self.done - self._first[1]) / (now - self._first[0])
    return self.done / max(now - self._t0, 1e-9)

  def line(self) -> str:
    """The current progress line."""
    rate = self.rate()
    pct = 100.0 * self.done / self.total
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_s = format_seconds(eta) if eta != float("inf") else "?"
    text = f"{self.what}: {self.done}/{self.total} ({pct:.0f}%), {rate:.3g} {self.what}/s"
    if self.done < self.total:
      text += f", ETA {eta_s}"
    else:
      text += f", done in {format_seconds(self._clock() - self._t0)}"
    if self._first is not None and self.done == self._first[1] and self.done < self.total:
      text += " (includes compilation)"
    return text

  def update(self, n: int = 1) -> None:
    """Adds `n` units done; logs when `every_s` has passed (and on the first update)."""
    self.done = min(self.done + int(n), self.total)
    now = self._clock()
    first = self._first is None
    if first:
      self._first = (now, self.done)
    if not self._quiet and (first or now - self._last_line >= self.every_s):
      self._last_line = now
      self._logged_done = self.done
      self._log(self.line())

  def close(self) -> None:
    """Logs the final count, once (unless the last line already showed it)."""
    if self._closed:
      return
    self._closed = True
    if not self._quiet and self._logged_done != self.done:
      self._log(self.line())

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    if exc[0] is None:
      self.close()
