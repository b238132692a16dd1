"""Packaging facts: `import jdiff` is light and the public names resolve."""

from __future__ import annotations

import subprocess
import sys

LIGHT = r"""
import sys
import jdiff, jdiff.models, jdiff.samplers, jdiff.training, jdiff.data
from jax._src import xla_bridge
assert "tensorflow" not in sys.modules, "importing jdiff imported TensorFlow"
assert not xla_bridge._backends, f"importing jdiff initialised devices: {xla_bridge._backends}"
print("LIGHT")
"""


def test_import_is_light():
  proc = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "LIGHT" in proc.stdout


def test_public_api():
  import jdiff  # pylint: disable=g-import-not-at-top
  from jdiff import models, samplers  # pylint: disable=g-import-not-at-top
  for name in ("q_sample", "q_posterior", "denoising_loss", "variational_bound", "ode_nll",
               "linear", "cosine", "sigmoid", "scaled_linear", "rescale_zero_terminal_snr"):
    assert callable(getattr(jdiff, name)), name
  for name in ("ddpm_sample", "ddim_sample", "dpmpp_2m_sample", "unipc_sample", "heun_sample",
               "edm_sample", "euler_ancestral_sample", "pc_sample", "sample_loop"):
    assert callable(getattr(samplers, name)), name
  for name in ("UNet", "AutoencoderKL", "make_model_fn", "cfg_model_fn"):
    assert hasattr(models, name), name
