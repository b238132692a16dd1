"""Shared fixtures and helpers of the test suite.

Import the helpers as ``from conftest import ...``: pytest loads this file as the module
``conftest`` (tests/ is not a package). ``tests.conftest`` is registered as the same module
object, so a file that still writes ``from tests.conftest import ...`` shares its state
instead of executing a second copy.

Fixtures (session scope, built once and shared by every file that names them):

* ``digits_dir``: a tfds data_dir holding the embedded digits dataset at 16x16.
* ``tiny_run``: the ``tiny`` config (jdiff/configs/tiny.py) trained through the CLI,
  ``--mode=train`` with the ``TINY_RUN`` overrides: 6 steps at batch 8, a checkpoint (EMA and
  raw parameters) and a ``metrics.jsonl`` row at every step, all kept, the final sample grid
  ``samples/grid_0000006.png`` and the log in ``TinyRun.log``. Use it instead of training
  the same model again; treat ``workdir`` as read-only and take ``tiny_run.copy(tmp_path)``
  for a run that writes (sample, eval, resume, corrupt a checkpoint).

Helpers: ``run_python`` (a subprocess with N fake CPU devices), ``main_args`` (the
arguments of ``python -m experiments.main``), ``free_port`` and ``launch_two_processes``.

Marker: ``@pytest.mark.e2e`` on tests that run the CLI end to end in subprocesses
(registered in pyproject.toml; ``-m "not e2e"`` runs the rest in a few minutes).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

sys.modules.setdefault("conftest", sys.modules[__name__])
sys.modules.setdefault("tests.conftest", sys.modules[__name__])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A persistent XLA compilation cache shared by the in-process tests and their subprocesses:
# the suite compiles the same tiny models many times.
CACHE_DIR = os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite compiles far more than it computes. LLVM without optimisation halves the tiny
# U-Net train step's compile (18.4 s -> 9.0 s, AVX-512 machine); on the AVX2 machine XLA:CPU's
# elemental emitters instead of its fusion emitters, and LLVM without its expensive passes,
# take the -O0 compile from 7.2 s to 3.9 s, and 20 steps from 0.88 s to 0.72 s (the same loss
# to 8 digits). XLA's HLO passes (fusion decisions, layout, the partitioner) are unchanged.
FAST_COMPILE_FLAGS = (
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
  "--xla_llvm_disable_expensive_passes=true",
)


def _known_to_jaxlib(flags: tuple[str, ...]) -> tuple[str, ...]:
  """The flags whose names this jaxlib's XLA defines: an unknown flag in XLA_FLAGS aborts
  the process, and flags come and go between releases (jax >= 0.10 is supported). A flag's
  name is a string in the shared library that registers it."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import mmap  # pylint: disable=g-import-not-at-top

  spec = importlib.util.find_spec("jaxlib")
  libs = glob.glob(os.path.join(os.path.dirname(spec.origin), "**", "*.so*"), recursive=True)
  names = {f: f.split("=")[0].lstrip("-").encode() for f in flags}
  found = set()
  for lib in (p for p in libs if os.path.getsize(p) > 10_000_000):
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
      found |= {f for f, name in names.items() if m.find(name) >= 0}
  return tuple(f for f in flags if f in found)


FAST_COMPILE = " ".join(_known_to_jaxlib(FAST_COMPILE_FLAGS))
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


# pytest-xdist's workers (and a suite started as a background job) ignore SIGINT, and a
# child inherits an ignored signal: the Ctrl-C tests' trainers would never see theirs, and
# the in-process ones would restore "ignored". The suite takes Python's default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


# The files that take longest (BENCHMARKS.md, "Test suite"), longest first. Under pytest-xdist
# (`-n 2 --dist loadfile`) a file is a unit of work and the queue is taken in collection order:
# the long files go first and the many short ones fill in behind them, instead of a long file
# starting last and running alone at the end (xdist's own reordering, by number of tests per
# file, puts the one-test README chains last; it is switched off in pytest_configure).
LONG_FILES = (
  "test_readme.py",
  "test_reliability.py",
  "test_scale.py",
  "test_training.py",
  "test_samplers_trained.py",
  "test_collectives.py",
  "test_sd_import.py",
  "test_pretrained.py",
  "test_distill_runs.py",
  "test_text_digits.py",
  "test_autoencoder.py",
  "test_fid.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  """The long files first (a stable sort: each file's tests keep their order)."""
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


def xla_flags(devices: int, *, fast_compile: bool = True) -> str:
  """XLA_FLAGS for a subprocess with `devices` fake CPU devices (and the suite's fast compile,
  unless the process computes more than it compiles: `fast_compile=False`)."""
  flags = f"--xla_force_host_platform_device_count={devices}"
  return f"{flags} {FAST_COMPILE}" if fast_compile else flags


def _session_dir(request, name: str, build) -> str:
  """`name`, a directory that `build(path)` fills once per test session.

  Under pytest-xdist every worker is its own process with its own session fixtures; the
  workers share the session's base temporary directory, so the first one to get there builds
  (holding a file lock) and the others reuse the result."""
  tmp_path_factory = request.getfixturevalue("tmp_path_factory")
  if not hasattr(request.config, "workerinput"):  # not an xdist worker
    path = str(tmp_path_factory.mktemp(name))
    build(path)
    return path
  from filelock import FileLock  # pylint: disable=g-import-not-at-top

  root = tmp_path_factory.getbasetemp().parent  # shared by this session's workers
  path, done = root / name, root / f"{name}.done"
  with FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)
      path.mkdir()
      build(str(path))
      done.touch()
  return str(path)


@pytest.fixture(scope="session")
def digits_dir(request) -> str:
  """A tfds data_dir holding the digits dataset at 16x16, built once per session."""
  from jdiff.data import digits  # pylint: disable=g-import-not-at-top

  build = lambda path: digits.prepare_digits(image_size=16, data_dir=path)
  return _session_dir(request, "tfds", build)


def run_python(
  args: list[str],
  *,
  devices: int = 1,
  timeout: float = 600,
  env=None,
  check: bool = True,
  fast_compile: bool = True,
) -> subprocess.CompletedProcess:
  """Runs `python ARGS` from the repo root with `devices` fake CPU devices."""
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = xla_flags(devices, fast_compile=fast_compile)
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env.update(env or {})
  proc = subprocess.run(
    [sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
  )
  if check and proc.returncode != 0:
    raise AssertionError(
      f"python {' '.join(args)} failed ({proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
  return proc


def main_args(mode: str, workdir: str, data_dir: str, config: str = "tiny", **overrides) -> list:
  """Arguments of `python -m experiments.main` with --config.KEY=VALUE overrides."""
  args = [
    "-m",
    "experiments.main",
    f"--config=jdiff/configs/{config}.py",
    f"--workdir={workdir}",
    f"--mode={mode}",
    f"--config.data.data_dir={data_dir}",
  ]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  return args


@dataclasses.dataclass(frozen=True)
class TinyRun:
  """A finished `--mode=train` run of the tiny config (the `tiny_run` fixture).

  Attributes:
    workdir: its workdir (read-only for tests: copy it to write).
    data_dir: the tfds data_dir it trained on (`digits_dir`).
    log: the run's stderr (absl log lines, the params checksum at step 6).
  """

  workdir: str
  data_dir: str
  log: str

  def copy(self, dst) -> str:
    """A private copy of the workdir at `dst`/tiny_run (returned), for runs that write."""
    path = os.path.join(str(dst), "tiny_run")
    shutil.copytree(self.workdir, path)
    return path


# tiny_run's overrides of the tiny config: a checkpoint and a metrics row at every step, all
# kept (the fault-injection tests corrupt, kill and resume around every step).
TINY_RUN = {"train.ckpt_every": 1, "train.log_every": 1, "train.keep_checkpoints": 10}


@pytest.fixture(scope="session")
def tiny_run(digits_dir, request) -> TinyRun:
  """The tiny config trained once per session through the CLI (see the module docstring)."""

  def build(path):
    proc = run_python(main_args("train", os.path.join(path, "workdir"), digits_dir, **TINY_RUN))
    with open(os.path.join(path, "train.log"), "w", encoding="utf-8") as f:
      f.write(proc.stderr)

  path = _session_dir(request, "tiny_run", build)
  with open(os.path.join(path, "train.log"), encoding="utf-8") as f:
    log = f.read()
  return TinyRun(workdir=os.path.join(path, "workdir"), data_dir=digits_dir, log=log)


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_two_processes(wd: str, data_dir: str, env: dict, **overrides) -> list:
  """Two `--mode=train` processes of the tiny config on one coordinator (gloo on CPU)."""
  port = free_port()
  return [
    subprocess.Popen(
      [
        sys.executable,
        *main_args("train", wd, data_dir, **overrides),
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
