"""Checkpoints with orbax's `CheckpointManager`: the TrainState plus the data iterator.

Each checkpoint holds the full `TrainState` (step, params, EMA, optimiser state) and
every process's grain iterator position, so that a resumed run continues the same
data stream and ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
from absl import logging
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, data iterator) under `directory`, keeping the last K.

  Args:
    directory: absolute or relative path; created if missing.
    max_to_keep: how many checkpoints to keep (older ones are deleted after a newer one
      is fully written, so there is always a complete checkpoint on disk).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter=None) -> None:
    """Saves `state` (and the iterator's position) as checkpoint `step` (async)."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iter=None, *, step: int | None = None) -> Any:
    """Restores the state (with the shardings of `abstract_state`) and, if given, moves
    `data_iter` to the saved position.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays.
      data_iter: the grain iterator to restore in place.
      step: which checkpoint; the latest by default.

    Returns:
      The restored state.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
