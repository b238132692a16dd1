"""Checkpoints with orbax's `CheckpointManager`: a state pytree plus the data iterator.

Each checkpoint holds the full state (e.g. a `TrainState`: step, params, EMA, optimiser
state) as the item 'state' and every process's grain iterator position as the item
'data', so that a resumed run continues the same data stream and ends bit-identical to
an uninterrupted one. `Checkpointer` is the one reader and writer of this format: a
frozen model's parameters are read back with `restore_partial`, not by a second reader.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
DATA = "data"


class Checkpointer:
  """Saves and restores (state, data iterator) under `directory`, keeping the last K.

  Use it as a context manager (or call `close`): leaving the block waits for an
  in-flight asynchronous save and releases orbax's threads, also when an error is
  propagating (the error then stays the last thing printed).

  Args:
    directory: absolute or relative path; created if missing.
    max_to_keep: how many checkpoints to keep (older ones are deleted after a newer one
      is fully written, so there is always a complete checkpoint on disk).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    # PyTreeCheckpointHandler (StandardCheckpointHandler's own backend, same files) so that
    # a subtree can be restored alone (`partial_restore`).
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_handlers={
        STATE: ocp.PyTreeCheckpointHandler(),
        DATA: grain.checkpoint.CheckpointHandler(),
      },
    )

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
      return
    try:  # an error is propagating: clean up, but never hide it behind a second one
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("closing the checkpointer after an error also failed: %r", e)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter=None) -> None:
    """Saves `state` (and the iterator's position) as checkpoint `step` (async)."""
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _step_or_latest(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(
        f"no checkpoint {step} under {self.directory} (has {self.all_steps()})"
      )
    return step

  def _restore(self, target: Any, step: int, data_iter=None, *, partial: bool) -> Any:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    items = {
      STATE: ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=partial,
      )
    }
    if data_iter is not None:
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))[STATE]

  def restore(self, abstract_state: Any, data_iter=None, *, step: int | None = None) -> Any:
    """Restores the state (with the shardings of `abstract_state`) and, if given, moves
    `data_iter` to the saved position.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays.
      data_iter: the grain iterator to restore in place.
      step: which checkpoint; the latest by default.

    Returns:
      The restored state.

    Raises:
      FileNotFoundError: no such checkpoint (the message names the directory).
    """
    return self._restore(abstract_state, self._step_or_latest(step), data_iter, partial=False)

  def restore_partial(self, abstract_subtree: dict, *, step: int | None = None) -> tuple[dict, int]:
    """Restores only some top-level fields of the saved state, e.g. `{'params': ...}`.

    The other fields (optimiser state, EMA) are not read.

    Args:
      abstract_subtree: {field name: pytree of `jax.ShapeDtypeStruct` (with shardings)}.
      step: which checkpoint; the latest by default.

    Returns:
      (the restored {field name: pytree}, its step).
    """
    step = self._step_or_latest(step)
    return self._restore(abstract_subtree, step, partial=True), step

  def restore_or_keep(self, state: Any, data_iter=None) -> tuple[Any, int]:
    """Resume always wins: the latest checkpoint if there is one, else `state` as given.

    Returns:
      (state, its step as a Python int).
    """
    if self.latest_step() is not None:
      state = self.restore(state, data_iter)
      logging.info("resumed from %s at step %d", self.directory, int(state.step))
    return state, int(jax.device_get(state.step))

  def wait(self) -> None:
    """Blocks until the last asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for an in-flight save, then releases the manager (idempotent)."""
    if self._manager is None:
      return
    manager, self._manager = self._manager, None
    try:
      manager.wait_until_finished()
    finally:
      manager.close()
