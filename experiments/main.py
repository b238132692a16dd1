"""jdiff entry point.

  python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/digits \
      [--mode=train|sample|eval] [--config.optim.lr=1e-4]

Multi-host: pass --coordinator_address/--num_processes/--process_id, or let
`jax.distributed.initialize()` read them from the cluster environment with --distributed.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from jdiff.training import trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval"], "What to run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster env).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-host.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-host.")
flags.mark_flags_as_required(["config", "workdir"])

MODES = {"train": trainer.train_and_evaluate, "sample": trainer.sample, "eval": trainer.evaluate}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
