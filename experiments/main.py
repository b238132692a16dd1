"""jdiff entry point.

  python -m experiments.main --config=experiments/configs/digits.py --workdir=runs/digits \
      [--mode=train|sample|eval] [--config.optim.lr=1e-4]
  python -m experiments.main --config=experiments/configs/ae_digits.py --workdir=runs/ae \
      --mode=train_autoencoder|eval_autoencoder

Multi-host: pass --coordinator_address/--num_processes/--process_id, or let
`jax.distributed.initialize()` read them from the cluster environment with --distributed.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import runpy
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from jdiff.runs import autoencoder, diffusion, edit

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to an ml-collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "sample", "eval", "train_autoencoder", "eval_autoencoder", "edit"],
  "What to run: diffusion train/sample/eval, or stage-1 autoencoder train/eval.",
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster env).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-host.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-host.")
flags.mark_flags_as_required(["config", "workdir"])

MODES = {
  "train": diffusion.train_and_evaluate,
  "sample": diffusion.sample,
  "eval": diffusion.evaluate,
  "train_autoencoder": autoencoder.train_autoencoder,
  "eval_autoencoder": autoencoder.evaluate_autoencoder,
  "edit": edit.edit,
}


class _QuietLibraries:
  """Drops INFO chatter from orbax's internals (keeps their warnings and errors)."""

  def filter(self, record) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def unknown_override(argv) -> str | None:
  """Names the first `--config.KEY=VALUE` whose KEY the config file does not define."""
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not paths:
    return None
  config = runpy.run_path(paths[-1].split(":")[0])["get_config"]()
  for arg in (a for a in argv if a.startswith("--config.")):
    node, where = config, "config"
    for key in arg[len("--config.") :].split("=")[0].split("."):
      if not isinstance(node, ConfigDict) or key not in node:
        keys = list(node.keys()) if isinstance(node, ConfigDict) else []
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f' Did you mean "{close[0]}"?' if close else ""
        return f"bad config override {arg}: {where} has no key {key!r}.{hint}"
      node, where = node[key], f"{where}.{key}"
  return None


def parse_flags(argv):
  """absl's parser, with one clear line for a bad --config.KEY=VALUE override."""
  try:
    return FLAGS(argv)
  except flags.Error as e:  # bad flag names or values, absl's own clear message
    message = f"Flags parsing error: {e}"
  except (AttributeError, KeyError) as e:  # ml_collections: the override names no config key
    message = unknown_override(argv) or f"bad config override: {e!r}"
  sys.stderr.write(f"FATAL {message}\nPass --helpshort or --helpfull to see help on flags.\n")
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
