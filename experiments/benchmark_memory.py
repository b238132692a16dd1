r"""Per-device memory of the train step, data-parallel against FSDP (compile only).

Lowers and compiles jdiff's train step (forward, backward, Adam, EMA) for
`jax.ShapeDtypeStruct`s on N simulated CPU devices, on a (N data x 1 fsdp) and a
(1 data x N fsdp) mesh, and reads the compiled step's `memory_analysis()`: arguments
(state + batch), temporaries, outputs and donated aliases, per device. Nothing runs.
It also sums the state's shard sizes (params, EMA, Adam moments: the memory FSDP
divides), and finds the widest U-Net (`ch`, in steps of 64) whose step fits a per-device
budget each way.

Usage::

  .venv/bin/python -m experiments.benchmark_memory --devices=8
  .venv/bin/python -m experiments.benchmark_memory --devices=8 --presets=ddpm_cifar10 \
      --search=adm_imagenet64 --budget_gib=16

CPU buffer assignment is not a GPU's or a TPU's, so the temporaries are indicative; the
argument (state) sizes are exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--presets", default="ddpm_cifar10,adm_imagenet64")
  p.add_argument("--per_device_batch", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--search", default="adm_imagenet64", help="preset whose ch is searched")
  p.add_argument("--budget_gib", type=float, default=16.0)
  p.add_argument("--max_ch", type=int, default=2048)
  p.add_argument(
    "--estimate",
    action="store_true",
    help="search without compiling each width: exact state bytes (from the shardings) plus "
    "the temporaries of the compiled base width scaled by ch / ch_base",
  )
  return p.parse_args(argv)


ARGS = _parse_args(sys.argv[1:] if __name__ == "__main__" else [])
if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
  )
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jdiff.models.unet import PRESETS, UNet  # noqa: E402
from jdiff.schedules import get_schedule  # noqa: E402
from jdiff.training import sharding  # noqa: E402
from jdiff.training.optim import make_optimizer  # noqa: E402
from jdiff.training.state import init_train_state, param_count  # noqa: E402
from jdiff.training.step import make_train_step  # noqa: E402

GIB = 2**30
# ADM's ImageNet 64x64 model (Dhariwal & Nichol 2021, Table 11 / guided-diffusion's
# flags): ~296M parameters with 1000 classes and a learned variance.
ADM_IMAGENET64 = dict(
  ch=192,
  ch_mult=(1, 2, 3, 4),
  num_res_blocks=3,
  attn_resolutions=(32, 16, 8),
  head_channels=64,
  dropout=0.1,
  num_groups=32,
  use_scale_shift_norm=True,
  resblock_updown=True,
  learn_sigma=True,
  num_classes=1000,
)
# (UNet kwargs, image shape).
MODELS = {
  "ddpm_cifar10": (dict(PRESETS["ddpm_cifar10"]), (32, 32, 3)),
  "adm_imagenet64": (ADM_IMAGENET64, (64, 64, 3)),
}


def build(name: str, dtype: str, **overrides) -> tuple[UNet, tuple[int, int, int]]:
  kwargs, shape = MODELS[name]
  kwargs = {**kwargs, **overrides}
  return UNet(dtype=jnp.dtype(dtype), conv_impl="xla", **kwargs), shape


def measure(module: UNet, image_shape, mesh, per_device_batch: int) -> dict:
  """Compiles the train step for `mesh` and returns its per-device sizes in bytes."""
  optimizer = make_optimizer(lr=1e-4)
  conditional = module.num_classes is not None
  init = lambda key: init_train_state(  # noqa: E731
    module,
    optimizer,
    key,
    jnp.zeros((1, *image_shape)),
    num_classes=module.num_classes if conditional else None,
  )
  key = jax.random.key(0)
  shapes = jax.eval_shape(init, key)
  state_sh = sharding.fsdp_shardings(shapes, mesh)
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh
  )
  b = per_device_batch * mesh.devices.size
  data_sh, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
  batch = {
    "image": jax.ShapeDtypeStruct((b, *image_shape), jnp.float32, sharding=data_sh),
    "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=data_sh),
  }
  schedule = get_schedule("linear", 1000)
  learn_sigma = module.learn_sigma
  step = make_train_step(
    module,
    optimizer,
    null_label=module.null_label if conditional else None,
    grad_shardings=state_sh.params,
    learn_sigma=learn_sigma,
  )
  t0 = time.perf_counter()
  compiled = (
    jax.jit(
      step,
      in_shardings=(state_sh, data_sh, repl, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
    )
    .lower(abstract, batch, schedule, key)
    .compile()
  )
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  state_bytes = 0
  for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(state_sh), strict=True):
    shard = sh.shard_shape(s.shape)
    n = 1
    for d in shard:
      n *= d
    state_bytes += n * jnp.dtype(s.dtype).itemsize
  total = (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  return dict(
    params=param_count(shapes.params),
    state=state_bytes,
    args=m.argument_size_in_bytes,
    temp=m.temp_size_in_bytes,
    out=m.output_size_in_bytes,
    alias=m.alias_size_in_bytes,
    total=total,
    compile_s=compile_s,
  )


def meshes(n: int):
  return {"data-parallel": sharding.make_mesh_2d(fsdp=1), "fsdp": sharding.make_mesh_2d(fsdp=n)}


def row(name: str, how: str, r: dict) -> str:
  g = lambda x: f"{x / GIB:.3f}"  # noqa: E731
  return (
    f"| {name} | {how} | {r['params'] / 1e6:.1f}M | {g(r['state'])} | {g(r['args'])} | "
    f"{g(r['temp'])} | {g(r['total'])} | {r['compile_s']:.0f} |"
  )


def widest(name: str, mesh, budget: float, per_device_batch: int, dtype: str, max_ch: int):
  """The largest ch (multiple of 64) whose step fits `budget` bytes per device: doubling,
  then bisection. Returns (ch, its measurement, the first ch that does not fit)."""
  fits = lambda ch: measure(*build(name, dtype, ch=ch), mesh, per_device_batch)  # noqa: E731
  lo, lo_r, hi = None, None, 64
  while hi <= max_ch:
    r = fits(hi)
    print(f"  {name} ch={hi}: {r['total'] / GIB:.2f} GiB ({r['compile_s']:.0f} s)", flush=True)
    if r["total"] > budget:
      break
    lo, lo_r, hi = hi, r, hi * 2
  if hi > max_ch:
    return lo, lo_r, None
  a, b = (lo or 0) // 64, hi // 64
  while b - a > 1:
    mid = (a + b) // 2
    r = fits(mid * 64)
    print(f"  {name} ch={mid * 64}: {r['total'] / GIB:.2f} GiB", flush=True)
    if r["total"] <= budget:
      a, lo, lo_r = mid, mid * 64, r
    else:
      b = mid
  return lo, lo_r, b * 64


def state_bytes(module: UNet, image_shape, mesh) -> tuple[int, int]:
  """(parameter count, per-device bytes of the FSDP-laid-out TrainState), no compile."""
  optimizer = make_optimizer(lr=1e-4)
  shapes = jax.eval_shape(
    lambda k: init_train_state(
      module, optimizer, k, jnp.zeros((1, *image_shape)), num_classes=module.num_classes
    ),
    jax.random.key(0),
  )
  total = 0
  for s, sh in zip(
    jax.tree.leaves(shapes), jax.tree.leaves(sharding.fsdp_shardings(shapes, mesh)), strict=True
  ):
    n = 1
    for d in sh.shard_shape(s.shape):
      n *= d
    total += n * jnp.dtype(s.dtype).itemsize
  return param_count(shapes.params), total


def widest_estimate(name: str, mesh, budget: float, base: dict, base_ch: int, max_ch: int):
  """The largest ch (multiple of 64) with exact state + base temporaries x ch / base_ch
  (activations grow linearly in the width at a fixed batch and resolution) under budget."""
  best = None
  for ch in range(64, max_ch + 1, 64):
    module, shape = build(name, ARGS.dtype, ch=ch)
    params, state = state_bytes(module, shape, mesh)
    total = state + (base["args"] - base["state"]) + base["temp"] * ch / base_ch
    if total > budget:
      return best, ch
    best = (ch, params, total)
  return best, None


def main():
  n = jax.device_count()
  print(
    f"{n} devices ({jax.default_backend()}), {ARGS.per_device_batch} images/device, {ARGS.dtype}"
  )
  print("| model | layout | params | state/dev GiB | args/dev | temp/dev | total/dev | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  base = {}
  for name in filter(None, ARGS.presets.split(",")):
    for how, mesh in meshes(n).items():
      r = measure(*build(name, ARGS.dtype), mesh, ARGS.per_device_batch)
      base[name, how] = r
      print(row(name, how, r), flush=True)
  if ARGS.search and ARGS.estimate:
    budget = ARGS.budget_gib * GIB
    base_ch = MODELS[ARGS.search][0]["ch"]
    for how, mesh in meshes(n).items():
      best, first_bad = widest_estimate(
        ARGS.search, mesh, budget, base[ARGS.search, how], base_ch, ARGS.max_ch
      )
      ch, params, total = best or (None, 0, 0)
      print(
        f"widest {ARGS.search} under {ARGS.budget_gib} GiB/device, {how} (estimate): ch={ch} "
        f"({params / 1e6:.0f}M params, {total / GIB:.2f} GiB); ch={first_bad} does not fit",
        flush=True,
      )
  elif ARGS.search:
    budget = ARGS.budget_gib * GIB
    for how, mesh in meshes(n).items():
      ch, r, first_bad = widest(
        ARGS.search, mesh, budget, ARGS.per_device_batch, ARGS.dtype, ARGS.max_ch
      )
      print(
        f"widest {ARGS.search} under {ARGS.budget_gib} GiB/device, {how}: ch={ch} "
        f"({(r or {}).get('params', 0) / 1e6:.0f}M params, {(r or {}).get('total', 0) / GIB:.2f}"
        f" GiB); ch={first_bad} does not fit",
        flush=True,
      )


if __name__ == "__main__":
  main()
