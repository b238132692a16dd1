"""The host-side training loop shared by the diffusion and autoencoder runs.

It owns the periodic actions (log, checkpoint, extras), the NaN/inf check and SIGTERM
handling; the caller supplies pure pieces: the jitted step, how to save and what to log.

Why not `clu.periodic_actions` (ReportProgress for rate/ETA, PeriodicCallback): clu is not
a dependency of jdiff, and it would replace about thirty lines here (a modulo test per
action and one rate/ETA formula) while bringing TensorFlow-facing metric writers along.
What this loop needs beyond clu (fetching device metrics only when a log, a save or a
stop needs them, and checking every pending loss before anything is written) would stay
here anyway. If clu becomes a dependency for other reasons, adopt it then.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the run stopped without saving the bad state."""


def preemption_service_running() -> bool:
  """Whether JAX's preemption sync manager runs (multi-process `jax.distributed` with
  `jax_enable_preemption_service`, its default): it then owns SIGTERM."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) stopped training after a checkpoint of the last step was saved."""


class Preemption:
  """Turns SIGTERM (and Ctrl-C) into a stop at a step every process agrees on, without a
  per-step sync.

  - One process: a SIGTERM handler sets a flag, read after every step (no collective).
  - Several processes with JAX's preemption service (`jax.distributed.initialize`): the
    service catches SIGTERM, tells every process, and `reached_preemption_sync_point(step)`
    becomes true on all of them at the same step; it is a local call, no collective.
  - Several processes without it: the flag is agreed by a `process_allgather` every
    `check_every` steps only (so a SIGTERM is acted on up to check_every - 1 steps late).

  Without the service, a first SIGINT is handled like SIGTERM (`interrupted` says so) and
  a second one raises KeyboardInterrupt at once (Python's own handler is back).

  Args:
    check_every: the agreement period in steps of the last case.
  """

  def __init__(self, *, check_every: int = 1):
    if check_every < 1:
      raise ValueError(f"check_every must be >= 1, got {check_every!r}")
    self.check_every = check_every
    self.requested = False
    self.interrupted = False  # the request came from SIGINT
    self.sync_point = False
    self._previous = {}

  def __enter__(self):
    self.sync_point = preemption_service_running()
    # With the service, SIGTERM is its own, and a local SIGINT flag would stop one process
    # alone: Ctrl-C keeps Python's KeyboardInterrupt there.
    for sig in () if self.sync_point else (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle) or signal.SIG_DFL
      except ValueError:  # not the main thread: no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    if signum == signal.SIGINT:
      self.interrupted = True
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])  # a second one aborts

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def should_stop(self, step: int | None = None) -> bool:
    """Whether to save and stop after `step` (the step just completed), on every process."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if self.sync_point:
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
      return self.requested
    if step is not None and step % self.check_every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


def start_trace(directory: str) -> None:
  """``jax.profiler.start_trace`` of the XLA ops, without the Python tracer.

  The Python tracer's events (the checkpointer's event loops among them) flooded the
  trace buffer and crowded out the XLA ops of the traced steps.
  """
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  jax.profiler.start_trace(directory, profiler_options=options)


class Trace:
  """A `jax.profiler` trace of steps a+1..b: started once step a's state is computed,
  stopped once step b's is (a context manager, so an error mid-trace stops it)."""

  def __init__(self, steps: tuple[int, int], directory: str | None):
    self.start, self.stop = (int(s) for s in steps)
    self.directory, self.active = directory, False
    if self.start < self.stop and not directory:
      raise ValueError(f"profile_steps={steps} needs a profile directory")

  def __enter__(self):
    return self

  def before(self, step: int, state: Any) -> None:
    if self.start < self.stop and step == self.start:
      jax.block_until_ready(state)  # step a's work stays out of the trace
      start_trace(self.directory)
      self.active = True
      logging.info("profiling steps %d..%d into %s", self.start + 1, self.stop, self.directory)

  def after(self, step: int, state: Any) -> None:
    if self.active and step == self.stop:
      jax.block_until_ready(state)
      self._end()

  def _end(self) -> None:
    jax.profiler.stop_trace()
    self.active = False
    logging.info("wrote the profile of steps %d..%d", self.start + 1, self.stop)

  def __exit__(self, *exc):
    if self.active:
      self._end()


def fetch_finite(pending: list[tuple[int, dict]], *, what: str = "loss") -> list[tuple[int, dict]]:
  """Fetches pending device metrics; raises NonFiniteLossError at the first bad loss."""
  fetched = [(step, jax.device_get(m)) for step, m in pending]
  for step, m in fetched:
    if not np.isfinite(m["loss"]):
      raise NonFiniteLossError(
        f"{what} is {m['loss']} at step {step}; stopping without saving (the last good "
        "checkpoint is kept). Lower config.optim.lr or check the data."
      )
  return fetched


def train_loop(
  state: Any,
  step_fn: Callable[[Any], tuple[Any, dict]],
  *,
  start: int,
  total: int,
  batch_size: int,
  log_every: int,
  ckpt_every: int,
  save: Callable[[int, Any], None],
  log: Callable[[int, list[dict], float, float], None],
  periodic: Callable[[int, Any], None] | None = None,
  what: str = "loss",
  preemption_check_every: int = 1,
  profile_steps: tuple[int, int] = (0, 0),
  profile_dir: str | None = None,
) -> tuple[Any, int, bool]:
  """Runs `state, metrics = step_fn(state)` from step `start` to `total`.

  Metrics stay on the device until a log, a checkpoint or a stop needs them; then every
  pending loss is checked for NaN/inf before anything is written. Checkpoints are saved
  every `ckpt_every` steps (0: never), at the end and on SIGTERM or a first Ctrl-C (which
  then raises `Interrupted`; a second Ctrl-C raises KeyboardInterrupt at once).

  Args:
    state: the initial (possibly restored) state.
    step_fn: one training step on the next batch, `state -> (state, metrics)`.
    start: the state's step.
    total: the last step.
    batch_size: global batch size, for img/s.
    log_every: log period in steps (the last step is always logged).
    ckpt_every: checkpoint period in steps.
    save: `save(step, state)`.
    log: `log(step, metrics since the last log, img/s, ETA seconds)`; the list's length is
      the number of steps the window averages (a SIGTERM stop logs its partial window).
    periodic: optional `periodic(step, state)` after every step but the last (e.g. samples).
    what: the name of the loss in error messages.
    preemption_check_every: how often processes without JAX's preemption service agree on
      a SIGTERM (see `Preemption`).
    profile_steps: (a, b): a `jax.profiler` trace of steps a+1..b into `profile_dir`
      (TensorBoard's layout: profile_dir/plugins/profile/<run>/); a >= b: none.
    profile_dir: where the trace goes (the run's TensorBoard directory).

  Returns:
    (final state, final step, whether it stopped on SIGTERM).
  """
  pending: list[tuple[int, dict]] = []
  since_log: list[dict] = []
  last_saved, step = start, start
  t_log, step_log = time.perf_counter(), start
  trace = Trace(profile_steps, profile_dir)
  with Preemption(check_every=preemption_check_every) as preempt, trace:
    while step < total:
      trace.before(step, state)
      state, metrics = step_fn(state)
      step += 1
      trace.after(step, state)
      pending.append((step, metrics))
      log_now = step % log_every == 0 or step == total
      save_now = (ckpt_every and step % ckpt_every == 0) or step == total
      stop = preempt.should_stop(step)
      if log_now or save_now or stop:
        since_log += [m for _, m in fetch_finite(pending, what=what)]
        pending.clear()
      if log_now or (stop and since_log):  # a stop logs its partial window too
        now = time.perf_counter()
        rate = (step - step_log) * batch_size / max(now - t_log, 1e-9)
        log(step, since_log, rate, (total - step) * batch_size / max(rate, 1e-9))
        since_log, t_log, step_log = [], now, step
      if (save_now or stop) and step != last_saved:
        save(step, state)
        last_saved = step
      if stop and preempt.interrupted:
        raise Interrupted(f"Ctrl-C (SIGINT): saved checkpoint {step}; rerun to resume")
      if stop:
        logging.warning("SIGTERM: saved checkpoint %d, exiting", step)
        break
      if periodic is not None and step != total:
        periodic(step, state)
  return state, step, preempt.requested
