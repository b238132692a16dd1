"""Packaging facts: imports are light, every public name is its home module's object, the
toolkit is config-free, and a call through the public API computes the right thing."""

from __future__ import annotations
import __future__

import importlib
import os
import subprocess
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PACKAGES = (
  "jdiff",
  "jdiff.models",
  "jdiff.samplers",
  "jdiff.training",
  "jdiff.data",
  "jdiff.ops",
  "jdiff.runs",
  "jdiff.metrics",
  "jdiff.pretrained",
)

LIGHT = r"""
import sys
import jdiff, jdiff.models, jdiff.samplers, jdiff.training, jdiff.data, jdiff.ops, jdiff.runs
from jax._src import xla_bridge
assert "tensorflow" not in sys.modules, "importing jdiff imported TensorFlow"
assert not xla_bridge._backends, f"importing jdiff initialised devices: {xla_bridge._backends}"
print("LIGHT")
"""

# The toolkit must not read configs: importing every module of jdiff.training (and the
# pure layer) leaves ml_collections unimported.
CONFIG_FREE = r"""
import pkgutil, sys, importlib
import jdiff, jdiff.training, jdiff.data
for pkg in (jdiff.training, jdiff.data):
  for info in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"{pkg.__name__}.{info.name}")
bad = sorted(m for m in sys.modules if m.split(".")[0] == "ml_collections")
assert not bad, f"the config-free layers imported {bad}"
print("CONFIG-FREE")
"""


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_is_light():
  proc = _run(LIGHT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LIGHT" in proc.stdout


def test_training_and_data_do_not_import_configs():
  proc = _run(CONFIG_FREE)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "CONFIG-FREE" in proc.stdout


def _public(package: types.ModuleType) -> dict[str, object]:
  """The names a package's __init__ binds, less submodules, dunders and `from __future__`."""
  return {
    k: v
    for k, v in vars(package).items()
    if not k.startswith("_")
    and not isinstance(v, types.ModuleType)
    and not isinstance(v, __future__._Feature)
  }  # pylint: disable=protected-access


def _home(package_name: str, attr: str, obj) -> str | None:
  """The module that defines `obj`: its __module__, or for constants (tuples, dicts) the
  submodule of the package that binds the same object under the same name."""
  home = getattr(obj, "__module__", None)
  if home is not None:
    return home
  for name, module in sorted(sys.modules.items()):
    if (
      name.startswith(package_name + ".")
      and module is not None
      and getattr(module, attr, None) is obj
    ):
      return name
  return None


@pytest.mark.parametrize("name", PACKAGES)
def test_public_names_are_defined_in_their_home_module(name):
  """Each re-export is the very object its defining module holds, inside the package."""
  package = importlib.import_module(name)
  public = _public(package)
  if name != "jdiff.runs":  # the runs package exposes modules only
    assert public, f"{name} exports nothing"
  for attr, obj in public.items():
    home = _home(name, attr, obj)
    assert home is not None, f"{name}.{attr}: no module of the package defines it"
    assert home.startswith(name), f"{name}.{attr} is defined outside the package, in {home}"
    assert home != name, f"{name}.{attr} is defined in __init__ (re-exports only)"
    assert getattr(importlib.import_module(home), attr) is obj, f"{name}.{attr} != {home}.{attr}"


def test_expected_public_api():
  import jdiff  # pylint: disable=g-import-not-at-top
  from jdiff import data, models, samplers, training  # pylint: disable=g-import-not-at-top

  expected = {
    jdiff: (
      "q_sample",
      "q_posterior",
      "denoising_loss",
      "variational_bound",
      "ode_nll",
      "linear",
      "cosine",
      "sigmoid",
      "scaled_linear",
      "rescale_zero_terminal_snr",
    ),
    samplers: (
      "ddpm_sample",
      "ddim_sample",
      "dpmpp_2m_sample",
      "unipc_sample",
      "heun_sample",
      "edm_sample",
      "euler_ancestral_sample",
      "pc_sample",
      "sample_loop",
    ),
    models: ("UNet", "AutoencoderKL", "make_model_fn", "cfg_model_fn"),
    training: (
      "TrainState",
      "AutoencoderState",
      "Checkpointer",
      "make_train_step",
      "make_optimizer",
      "train_loop",
      "stream",
      "MetricWriter",
    ),
    data: (
      "make_train_iterator",
      "make_eval_iterator",
      "load_source",
      "LatentSource",
      "LatentCodec",
      "encode_source",
    ),
  }
  for package, names in expected.items():
    missing = [n for n in names if n not in _public(package)]
    assert not missing, f"{package.__name__} lacks {missing}"


def test_q_sample_is_the_closed_form():
  """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with abar from the betas (float64)."""
  import jdiff  # pylint: disable=g-import-not-at-top

  schedule = jdiff.linear(100)
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 37, 99])
  abar = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))[np.asarray(t)]
  expected = np.sqrt(abar)[:, None, None, None] * np.asarray(x0) + np.sqrt(1.0 - abar)[
    :, None, None, None
  ] * np.asarray(noise)
  np.testing.assert_allclose(
    np.asarray(jdiff.q_sample(schedule, x0, t, noise)), expected, rtol=1e-5, atol=1e-6
  )


def test_one_ddim_step_on_an_exact_model_returns_the_data():
  """For data concentrated at mu, the exact eps model is (x_t - sqrt(abar) mu) / sqrt(1-abar);
  one deterministic DDIM step from any x_T then lands exactly on mu."""
  import jdiff  # pylint: disable=g-import-not-at-top
  from jdiff.samplers import registry  # pylint: disable=g-import-not-at-top

  schedule = jdiff.cosine(50)
  mu = jnp.linspace(-0.5, 0.5, 8).reshape(1, 2, 4, 1)

  def model_fn(x_t, t, cond):
    del cond
    a = schedule.sqrt_alphas_cumprod[t][:, None, None, None]
    s = schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None]
    return (x_t - a * mu) / s

  x_T = jax.random.normal(jax.random.key(2), (2, 2, 4, 1))
  out = registry.sample(
    "ddim", schedule, model_fn, x_T, jax.random.key(3), num_steps=1, eta=0.0, spacing="trailing"
  )
  np.testing.assert_allclose(np.asarray(out), np.broadcast_to(np.asarray(mu), x_T.shape), atol=2e-4)


def test_wheel_installs_only_jdiff(tmp_path):
  """`pip install jdiff` puts the package `jdiff` (with its configs) in site-packages, and
  nothing else: no top-level `experiments` to collide with other projects."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  build = subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    + ["-w", str(tmp_path), repo],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert build.returncode == 0, build.stderr[-3000:]
  (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  with zipfile.ZipFile(os.path.join(tmp_path, wheel)) as z:
    names = z.namelist()
    entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
  tops = {n.split("/")[0] for n in names}
  assert {t for t in tops if not t.endswith(".dist-info")} == {"jdiff"}, tops
  assert "jdiff/configs/digits.py" in names and "jdiff/cli.py" in names
  assert "jdiff = jdiff.cli:run" in entry_points


def test_cli_resolves_shipped_config_names(tmp_path):
  from jdiff import cli  # pylint: disable=g-import-not-at-top

  argv = cli.resolve_config_names(["prog", "--config=tiny", "--config.seed=1", "--mode=train"])
  assert argv[1] == f"--config={os.path.join(cli.CONFIG_DIR, 'tiny.py')}"
  assert argv[2:] == ["--config.seed=1", "--mode=train"]
  # Paths, files and unknown names are left to ml_collections (which names them if bad).
  own = tmp_path / "mine.py"
  own.write_text("")
  for arg in [f"--config={own}", "--config=no_such_config", "--config=jdiff/configs/tiny.py:x"]:
    assert cli.resolve_config_names([arg]) == [arg]
  assert cli.resolve_config_names(["--config=tiny:arg"]) == [
    f"--config={os.path.join(cli.CONFIG_DIR, 'tiny.py')}:arg"
  ]


def test_python_m_jdiff_runs_a_shipped_config_by_name(tmp_path):
  """`python -m jdiff --config=NAME` (as after a plain pip install) reaches the mode."""
  proc = subprocess.run(
    [sys.executable, "-m", "jdiff", "--config=tiny", f"--workdir={tmp_path}", "--mode=sample"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=str(tmp_path),  # not the checkout: only the installed package is importable by name
  )
  assert proc.returncode != 0
  assert "no checkpoint under" in proc.stderr, proc.stderr[-3000:]
