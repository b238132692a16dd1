"""jdiff's command line: one absl entry point for every mode.

From a checkout (`experiments/main.py` calls `run`), or after `pip install jdiff` as the
console script `jdiff` or `python -m jdiff`:

  python -m experiments.main --config=jdiff/configs/digits.py --workdir=runs/digits \
      [--mode=train|sample|eval] [--config.optim.lr=1e-4]
  jdiff --config=digits --workdir=runs/digits         # a config shipped in jdiff/configs
  jdiff --config=my_config.py --workdir=runs/mine     # your own (`from jdiff.configs import
                                                      # default` as its base)
  python -m jdiff --config=ae_digits --workdir=runs/ae --mode=train_autoencoder

`--config=NAME` (no path, no .py) names a config shipped in `jdiff/configs/`; anything
else is a file path, as ml_collections reads it.

Multi-host: pass --coordinator_address/--num_processes/--process_id, or let
`jax.distributed.initialize()` read them from the cluster environment with --distributed.
"""

from __future__ import annotations

import difflib
import logging as pylogging
import os
import runpy
import sys
import threading
import traceback

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from jdiff.runs import autoencoder, diffusion, distill, edit, fid, reflow, text2image
from jdiff.training.integrity import CLOSED_LOOP, is_closed_loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Path to an ml-collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum(
  "mode",
  "train",
  [
    "train",
    "sample",
    "eval",
    "train_autoencoder",
    "eval_autoencoder",
    "fid",
    "fid_ref",
    "reflow_pairs",
    "edit",
    "distill",
  ],
  "What to run: diffusion train/sample/eval, sample quality fid/fid_ref (jdiff/runs/fid.py), "
  "stage-1 autoencoder train/eval, the reflow pairs of a flow model (jdiff/runs/reflow.py), "
  "image editing: img2img / inpaint / superres (jdiff/runs/edit.py), or few-step students "
  "of a trained model (jdiff/runs/distill.py).",
)
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (cluster env).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for multi-host.")
flags.DEFINE_integer("process_id", None, "This process's index, for multi-host.")
flags.mark_flags_as_required(["config", "workdir"])


def _sample(config, workdir):
  """Prompts -> images for a text-to-image config (`sample.prompts`), else the run's samples."""
  run = text2image.sample if text2image.enabled(config) else diffusion.sample
  return run(config, workdir)


MODES = {
  "train": diffusion.train_and_evaluate,
  "sample": _sample,
  "eval": diffusion.evaluate,
  "train_autoencoder": autoencoder.train_autoencoder,
  "eval_autoencoder": autoencoder.evaluate_autoencoder,
  "fid": fid.fid,
  "fid_ref": fid.fid_ref,
  "reflow_pairs": reflow.write_pairs,
  "edit": edit.edit,
  "distill": distill.distill,
}


class _QuietLibraries:
  """Drops INFO chatter from orbax's internals; keeps their warnings and errors, but as one
  line each: a failed save (a full disk) otherwise prints the same traceback once per
  orbax thread, hundreds of lines above the cause. Of the "Event loop is closed" reports
  that follow an abandoned save (one per orbax thread and future) only the first is kept."""

  def __init__(self):
    self.closed_loop_reports = 0

  def filter(self, record) -> bool:
    if record.name != "asyncio" and "/orbax/" not in record.pathname:
      return True
    if record.name != "asyncio" and record.levelno < pylogging.WARNING:
      return False
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f" {record.exc_info[1]}"
    if CLOSED_LOOP in text:
      self.closed_loop_reports += 1
      if self.closed_loop_reports > 1:
        return False
    record.exc_info, record.exc_text = None, None
    return True


def _config_path(argv) -> str | None:
  """The file of the last --config=PATH[:ARG] (absl takes the last one); '-config' too."""
  paths = [a.split("=", 1)[1] for a in argv if a.lstrip("-").startswith("config=")]
  return paths[-1].split(":")[0] if paths else None


def unknown_override(argv) -> str | None:
  """Names every `--config.KEY=VALUE` whose KEY the config file does not define."""
  path = _config_path(argv)
  if path is None:
    return None
  config = runpy.run_path(path)["get_config"]()
  bad = []
  for arg in argv:
    name = arg.lstrip("-")
    if not (arg.startswith("-") and name.startswith("config.")):
      continue
    node, where = config, "config"
    for key in name[len("config.") :].split("=")[0].split("."):
      if not isinstance(node, ConfigDict) or key not in node:
        keys = list(node.keys()) if isinstance(node, ConfigDict) else []
        close = difflib.get_close_matches(key, keys, n=1)
        hint = f'. Did you mean "{close[0]}"?' if close else ""
        bad.append(f'{arg}: {where} has no key "{key}"{hint}')
        break
      node, where = node[key], f"{where}.{key}"
  if not bad:
    return None
  return ("bad config override " if len(bad) == 1 else "bad config overrides ") + "; ".join(bad)


def parse_flags(argv):
  """absl's parser, with one clear last line for a bad flag, a missing config file or a bad
  --config.KEY=VALUE override."""
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):  # ml_collections would fail lazily, twice
    _fatal(f"config file {path} does not exist (--config={path})")
  try:
    return FLAGS(argv)
  except flags.Error as e:  # bad flag names or values, absl's own clear message
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    _fatal(f"Flags parsing error: {e}")
  except (AttributeError, KeyError) as e:  # ml_collections: the override names no config key
    _fatal(unknown_override(argv) or f"bad config override: {e!r}")


def _drop_closed_loop_reports(unraisable) -> None:
  if not is_closed_loop(unraisable.exc_value):
    sys.__unraisablehook__(unraisable)


def _drop_closed_loop_thread_errors(args) -> None:
  if not is_closed_loop(args.exc_value):
    threading.__excepthook__(args)


def quiet_closed_loops() -> None:
  """orbax's event loops, collected while a failed save unwinds (or still used by its
  threads), report "Event loop is closed" through sys.unraisablehook and
  threading.excepthook, not logging: drop those, keep any other report."""
  sys.unraisablehook = _drop_closed_loop_reports
  threading.excepthook = _drop_closed_loop_thread_errors


def _fatal(message: str, code: int = 1) -> None:
  """Ends the process (exit status `code`) with `message` as one last line of stderr.

  The process ends with `os._exit(1)` after flushing: every mode has closed its
  checkpointer and writers on its way here, and skipping the interpreter's finalisation
  keeps the reports of orbax's abandoned futures and event loops, collected at exit, from
  following the line (the asyncio "exception was never retrieved", "Event loop is
  closed", atexit callbacks).
  """
  pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL + 1)
  quiet_closed_loops()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  sys.stderr.write("FATAL " + " ".join(str(message).split()) + "\n")
  sys.stderr.flush()
  os._exit(code)


def _run_mode(mode: str, workdir: str) -> None:
  """Runs the mode; any error ends the process with its cause as the last line of stderr.

  Errors that explain themselves (a busy workdir, no intact checkpoint, an unreadable
  checkpoint file, a changed config, a NaN loss) print that line alone; others print their
  traceback above it. Ctrl-C ends with one line and exit status 130 (training saved a
  checkpoint first, unless it was the second Ctrl-C). Each mode closes its checkpointer
  (finishing an in-flight save) and writers before the error gets here, so nothing follows
  the line.
  """
  from jdiff.runs.stored_config import ConfigChangedError  # pylint: disable=g-import-not-at-top
  from jdiff.training import checkpoint, integrity, lock, loop  # pylint: disable=g-import-not-at-top

  clear = (
    lock.WorkdirBusyError,
    checkpoint.NoIntactCheckpointError,
    checkpoint.CorruptCheckpointError,
    checkpoint.CheckpointReadError,
    integrity.ShapeMismatchError,
    ConfigChangedError,
    loop.NonFiniteLossError,
  )
  try:
    MODES[mode](FLAGS.config, workdir)
  except KeyboardInterrupt as e:  # Ctrl-C: loop.Interrupted says what it saved
    logging.flush()
    what = str(e) if isinstance(e, loop.Interrupted) else f"Ctrl-C (SIGINT) during --mode={mode}"
    _fatal(f"Interrupted: {what}", code=130)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, clear):
      logging.error("--mode=%s failed:\n%s", mode, traceback.format_exc())
    logging.flush()
    _fatal(f"{type(e).__name__}: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jdiff.training import writers  # pylint: disable=g-import-not-at-top

  try:  # before any work: a run must not fail at its first write, after hours
    writers.check_workdir(FLAGS.workdir)
  except writers.WorkdirError as e:
    _fatal(f"{type(e).__name__}: {e}")
  from jdiff.training import xla_flags  # pylint: disable=g-import-not-at-top

  if flags_set := xla_flags.apply_gpu_flags():  # before the backend starts; never over the user's
    logging.info("XLA_FLAGS for the GPU: %s", flags_set)
  import jax  # pylint: disable=g-import-not-at-top

  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  logging.get_absl_handler().addFilter(_QuietLibraries())
  quiet_closed_loops()
  _run_mode(FLAGS.mode, FLAGS.workdir)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_config(name: str) -> str | None:
  """The path of `jdiff/configs/<name>.py` when `name` is a bare config name that exists."""
  if os.sep in name or "/" in name or name.endswith(".py") or os.path.exists(name):
    return None
  path = os.path.join(CONFIG_DIR, f"{name}.py")
  return path if os.path.isfile(path) else None


def resolve_config_names(argv: list[str]) -> list[str]:
  """Rewrites `--config=NAME[:ARGS]` to the shipped config's path; other args unchanged."""
  out = []
  for arg in argv:
    if arg.startswith("--config="):
      name, colon, rest = arg[len("--config=") :].partition(":")
      path = shipped_config(name)
      if path is not None:
        arg = f"--config={path}{colon}{rest}"
    out.append(arg)
  return out


def run(argv: list[str] | None = None) -> None:
  """The console script `jdiff` (and `python -m jdiff`, `python -m experiments.main`)."""
  argv = resolve_config_names(list(sys.argv if argv is None else argv))
  app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
