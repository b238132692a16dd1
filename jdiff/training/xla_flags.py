"""The XLA GPU flags recipe for training: set in the launch path, only on a GPU, only when
the user has not set XLA_FLAGS.

The flags (NVIDIA JAX-Toolbox "GPU performance" and MaxText's GPU recipes): the
latency-hiding scheduler overlaps collectives with compute; pipelined all-gather /
reduce-scatter / all-reduce and while-loop double buffering overlap FSDP's parameter gathers
and the gradient reductions of a scanned loop with the neighbouring iterations. They only
change scheduling, not the arithmetic. Not measured in jdiff yet (no GPU in that session).

XLA reads XLA_FLAGS once, when the first backend initialises: call `apply_gpu_flags()`
before any JAX computation (importing jax is fine), e.g. first thing in a launcher's main().
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import MutableMapping

GPU_FLAGS = (
  "--xla_gpu_enable_latency_hiding_scheduler=true",
  "--xla_gpu_enable_pipelined_all_gather=true",
  "--xla_gpu_enable_pipelined_reduce_scatter=true",
  "--xla_gpu_enable_pipelined_all_reduce=true",
  "--xla_gpu_enable_while_loop_double_buffering=true",
  "--xla_gpu_enable_highest_priority_async_stream=true",
)


def gpu_present(environ: MutableMapping[str, str] = os.environ) -> bool:
  """True when JAX will use a CUDA GPU: JAX_PLATFORMS allows it, a CUDA plugin for jaxlib is
  installed and an NVIDIA device node exists (nothing initialised, so XLA_FLAGS still counts)."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and not any(p in platforms for p in ("cuda", "gpu")):
    return False
  plugin = any(
    importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")
  )
  return plugin and os.path.exists("/dev/nvidiactl")


def apply_gpu_flags(environ: MutableMapping[str, str] = os.environ, *, gpu: bool | None = None):
  """Sets XLA_FLAGS to `GPU_FLAGS` when on a GPU and XLA_FLAGS is unset or empty.

  Args:
    environ: the environment to change (os.environ by default).
    gpu: whether the backend is a GPU; None: `gpu_present(environ)`.

  Returns:
    The flags set, or None when nothing was changed (not a GPU, or the user's XLA_FLAGS).
  """
  if environ.get("XLA_FLAGS", "").strip():
    return None
  if not (gpu_present(environ) if gpu is None else gpu):
    return None
  environ["XLA_FLAGS"] = " ".join(GPU_FLAGS)
  return environ["XLA_FLAGS"]
