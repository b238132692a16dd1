"""jdiff entry point.

  python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/digits \
      [--mode=train|sample|eval] [--config.optim.lr=1e-4]
  python -m experiments.main --config=experiments/configs/ae_digits.py --workdir=runs/ae \
      --mode=train_autoencoder|eval_autoencoder

Multi-host: pass --coordinator_address/--num_processes/--process_id, or let
`jax.distributed.initialize()` read them from the cluster environment with --distributed.
"""

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jdiff.training import autoencoder_trainer, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train",
                  ["train", "sample", "eval", "train_autoencoder", "eval_autoencoder"],
                  "What to run: diffusion train/sample/eval, or stage-1 autoencoder train/eval.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster env).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-host.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-host.")
flags.mark_flags_as_required(["config", "workdir"])

class _QuietLibraries:
  """Drops INFO chatter from orbax's internals (keeps their warnings and errors)."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


MODES = {"train": trainer.train_and_evaluate, "sample": trainer.sample, "eval": trainer.evaluate,
         "train_autoencoder": autoencoder_trainer.train_autoencoder,
         "eval_autoencoder": autoencoder_trainer.evaluate_autoencoder}


def parse_flags(argv):
  """absl's parser, plus a one-line message for bad --config.KEY=VALUE overrides."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see "
                     "help on flags.\n")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e.args[0] if e.args else e)
    msg = " ".join(msg.replace("\\n", "\n").replace("\\", "").replace("'", "").split())
    key = msg.split()[0] if msg else ""
    override = [a for a in argv[1:] if a.startswith("--config.")]
    culprit = [a for a in override if f".{key}=" in a or a.endswith(f".{key}")] or override
    sys.stderr.write(f"FATAL bad config override {' '.join(culprit)}: unknown key {key!r}. "
                     f"{msg[len(key):].strip()}\n")
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
