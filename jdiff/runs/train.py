"""The training skeleton every training mode shares, written once.

  train(setup, writer, mode) = data iterator -> initial state -> restore (resume always
  wins) -> the mode's jitted step -> `Setup.train_loop` (logs through `MeanLogger`, saves,
  SIGTERM, NaN check) -> the mode's end-of-run hook.

A mode (diffusion, autoencoder, distill) gives only its `TrainMode`: how to describe the
model, how to build its step function, the metrics it logs, and its periodic / end hooks.

`MeanLogger` is clu's `MetricsAverage` idea for the host: the loop hands it the metrics of
every step since the last log, and it writes their means (and the last value of the
metrics that are not averaged) to the log line and `MetricWriter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from jdiff.training.progress import format_seconds
from jdiff.training.writers import MetricWriter


class MeanLogger:
  """`log(step, metrics, rate, eta_s)` for `training.loop.train_loop`: means over the window.

  Args:
    writer: the run's `MetricWriter` (process 0 only writes).
    total: the run's last step (for 'step s/total').
    means: (key, log format or None) of the averaged metrics, in order; a None format is
      written to the metrics but not to the log line.
    lasts: keys whose last value in the window is written (e.g. the gradient norm).
    extra: keys written after 'train/window_steps' (their last value).
  """

  def __init__(
    self,
    writer: MetricWriter,
    total: int,
    *,
    means: Sequence[tuple[str, str | None]] = (("loss", "loss %.5f"),),
    lasts: Sequence[str] = ("grad_norm",),
    extra: Sequence[str] = (),
  ):
    self.writer, self.total = writer, total
    self.means, self.lasts, self.extra = tuple(means), tuple(lasts), tuple(extra)

  def __call__(self, step: int, metrics: list[dict], rate: float, eta_s: float) -> dict | None:
    if jax.process_index() != 0:
      return None
    mean = {k: float(np.mean([m[k] for m in metrics])) for k, _ in self.means}
    shown = [fmt % mean[k] for k, fmt in self.means if fmt is not None]
    logging.info(
      "step %d/%d  %s  %.1f img/s  ETA %s",
      step,
      self.total,
      "  ".join(shown),
      rate,
      format_seconds(eta_s),
    )
    last = lambda k: float(metrics[-1][k])  # noqa: E731
    scalars = {
      **{f"train/{k}": v for k, v in mean.items()},
      "train/img_per_s": rate,
      **{f"train/{k}": last(k) for k in self.lasts},
      "train/window_steps": len(metrics),  # how many steps the means average
      **{f"train/{k}": last(k) for k in self.extra},
    }
    self.writer.write_scalars(step, scalars)
    return scalars


class TrainMode(NamedTuple):
  """What a training mode adds to the skeleton.

  Attributes:
    describe: `describe(state) -> str`, logged once (parameter count, shapes).
    make_step: `make_step(state, train_iter) -> step_fn`, `step_fn(state) -> (state,
      metrics)`: the jitted step on the next batch (built after the restore, so it may read
      the restored state's shardings).
    logger: the window's logger (`MeanLogger`).
    periodic: optional `periodic(step, state)` after every step but the last.
    finish: optional `finish(step, state)` once the last step is reached (not on SIGTERM).
    after: optional `after(step, state)` once the loop ends, finished or not (a checksum).
    what: the loss's name in a NaN error.
    init: optional `init(state) -> state` of the step-0 state (a student from its teacher);
      a restored checkpoint replaces it.
  """

  describe: Callable[[Any], str]
  make_step: Callable[[Any, Any], Callable]
  logger: Callable
  periodic: Callable[[int, Any], None] | None = None
  finish: Callable[[int, Any], None] | None = None
  after: Callable[[int, Any], None] | None = None
  what: str = "loss"
  init: Callable[[Any], Any] | None = None


def train(setup, writer: MetricWriter, mode: TrainMode):
  """Runs `mode` on `setup` from its latest checkpoint (or step 0); returns the final state."""
  train_iter = setup.train_iterator()  # first: it checks the batch size against the devices
  state = setup.init_state()
  if mode.init is not None:
    state = mode.init(state)
  logging.info("%s", mode.describe(state))
  # Restored onto this run's shardings, whatever mesh the checkpoint was saved from.
  state, start = setup.checkpointer.restore_or_keep(state, train_iter)
  if writer.truncate_after(start):  # rows of the interrupted run's lost steps
    logging.info("metrics.jsonl: dropped the rows past the restored step %d", start)
  step_fn = mode.make_step(state, train_iter)
  state, step, preempted = setup.train_loop(
    state, step_fn, train_iter, start, log=mode.logger, periodic=mode.periodic, what=mode.what
  )
  if mode.after is not None:
    mode.after(step, state)
  if mode.finish is not None and step == setup.config.train.num_steps and not preempted:
    mode.finish(step, state)
  return state
