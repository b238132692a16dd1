r"""The stall a checkpoint save puts on the training loop, by the record's checksums.

`Checkpointer.save` returns once orbax holds its own copy of the state (the files are written
in the background); until then the next train step waits. The checksum record is computed in
that window. This measures, on full train states (params, EMA, Adam moments) of the
benchmark U-Nets, interleaved in one process, the median of --runs after a warm-up of:

  - `device hash`: `integrity.make_record` as jdiff saves it, a 32-bit hash per array
    computed where the state lives; one uint32 per array comes back to the host. `first`:
    its first call in the process, which traces and compiles a program per array signature;
  - `host CRC-32`: the previous record, each array copied to the host and its bytes hashed
    with zlib's CRC-32 there (the peer, computed here as that record was);
  - `save()`: the whole call, record included, into a fresh directory (--save only: it writes
    the state to disk).

Usage::

  .venv/bin/python -m experiments.benchmark_checkpoint --models=tiny,ddpm_cifar10,adm_imagenet64
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark_memory
from experiments.benchmark_sd_unet import median_seconds
from jdiff.configs import tiny
from jdiff.runs.builders import build_model
from jdiff.training import integrity
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.optim import make_optimizer
from jdiff.training.state import init_train_state, param_count


def build(name: str):
  """(module, image shape): benchmark_memory's presets, and `tiny`, the test suite's U-Net
  (jdiff/configs/tiny.py's model)."""
  if name == "tiny":
    config = tiny.get_config()
    size = config.data.image_size
    return build_model(config, num_classes=None, channels=1), (size, size, 1)
  return benchmark_memory.build(name, "float32")


def train_state(name: str):
  """A train state of model `name` (`build`), every array filled (values do not matter to the
  timings; nothing is initialised or compiled for the model)."""
  module, shape = build(name)
  opt, x = make_optimizer(lr=1e-4), jnp.zeros((1, *shape))
  init = lambda k: init_train_state(module, opt, k, x, num_classes=module.num_classes)  # noqa: E731
  shapes = jax.eval_shape(init, jax.random.key(0))
  leaves, tree = jax.tree.flatten(shapes)
  filled = [
    x if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.full(x.shape, 0.5, x.dtype)
    for x in leaves
  ]
  return tree.unflatten(filled), param_count(shapes.params)


def host_crc_record(state) -> dict:
  """The previous record's arrays: each copied to the host and CRC-32'd there."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    value = np.ascontiguousarray(np.asarray(jax.device_get(x))).reshape(-1).view(np.uint8)
    out[integrity.leaf_name(path)] = zlib.crc32(value)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="ddpm_cifar10,adm_imagenet64")
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--save", action="store_true", help="also time Checkpointer.save()")
  args = p.parse_args()
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
  columns = "model | arrays | params | state MB | device hash ms (first) | host CRC-32 ms | ratio"
  print(f"| {columns} | save() ms |")
  print("|---|---|---|---|---|---|---|---|")
  for name in args.models.split(","):
    state, n_params = train_state(name)
    mb = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes")) / 2**20
    first = median_seconds(lambda s=state: integrity.make_record(s), 1, warmup=0)  # compiles
    host_crc_record(state)  # warm-up
    dev, host = [], []
    for _ in range(args.runs):  # interleaved one call at a time, so load drifts hit both alike
      dev.append(median_seconds(lambda s=state: integrity.make_record(s), 1, warmup=0))
      host.append(median_seconds(lambda s=state: host_crc_record(s), 1, warmup=0))
    save_ms = "-"
    if args.save:
      root = tempfile.mkdtemp(prefix="jdiff_ckpt_bench_")
      try:
        with Checkpointer(root, max_to_keep=1) as ck:
          ck.save(0, state)  # warm-up
          ck._manager.wait_until_finished()  # pylint: disable=protected-access
          times = []
          for i in range(1, args.runs + 1):
            t0 = time.perf_counter()
            ck.save(i, state)
            times.append(time.perf_counter() - t0)
            ck._manager.wait_until_finished()  # pylint: disable=protected-access
        save_ms = f"{1e3 * statistics.median(times):.0f}"
      finally:
        shutil.rmtree(root, ignore_errors=True)
    d, h = statistics.median(dev), statistics.median(host)
    print(
      f"| {name} | {len(jax.tree.leaves(state))} | {n_params / 1e6:.2f}M | {mb:.1f} | "
      f"{1e3 * d:.0f} ({1e3 * first:.0f}) | {1e3 * h:.0f} | "
      f"{h / d:.2f}x | {save_ms} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
