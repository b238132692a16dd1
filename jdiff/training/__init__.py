"""A config-free training toolkit: states, pure steps, optimiser and EMA, sharding,
checkpoints, the host loop, named random streams, process-0 writers, and the sampler
registry (moved to `jdiff.samplers.registry`).

Nothing here reads a config: config-driven runs are assembled in `jdiff.runs`.
"""

from jdiff.training.checkpoint import Checkpointer
from jdiff.training.loop import NonFiniteLossError, train_loop
from jdiff.training.optim import ema_decay_at, ema_update, make_optimizer
from jdiff.training.rng import RunKeys, run_keys, stream
from jdiff.training.sharding import (
  check_global_batch,
  data_sharding,
  fsdp_shardings,
  fsdp_spec,
  local_mesh,
  make_mesh,
  make_mesh_2d,
  replicated,
  to_global,
)
from jdiff.training.state import (
  AutoencoderState,
  TrainState,
  init_autoencoder_state,
  init_train_state,
  param_count,
)
from jdiff.training.step import (
  make_autoencoder_state_step,
  make_autoencoder_train_step,
  make_eval_step,
  make_train_step,
)
from jdiff.training.writers import MetricWriter, save_image_grid, write_json
