"""Training: TrainState, the sharded train step, optimiser and EMA, checkpoints, loops."""

from jdiff.training.checkpoint import Checkpointer
from jdiff.training.optim import ema_decay_at, ema_update, make_optimizer
from jdiff.training.sharding import check_global_batch, make_mesh, to_global
from jdiff.training.state import TrainState, init_train_state
from jdiff.training.step import make_eval_step, make_train_step
