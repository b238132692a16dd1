"""`--mode=edit`: img2img (SDEdit), inpainting (replacement / RePaint) and super-resolution.

`edit(config, workdir)` restores the EMA parameters of the diffusion model in `workdir`,
reads images from `config.edit.input` (an .npz with the key 'images', or its only array;
uint8 in [0, 255] or float in [-1, 1]; or a folder of PNGs) and, for inpainting, a mask
from `config.edit.mask` (.png / .npy / .npz, [H, W], [H, W, 1] or one per image; 1 / white =
generate, 0 / black = keep). It writes, beside the input, `<input>_<task>.png` (the inputs
in the first row, the results in the second) and `<input>_<task>.npz` (`results`, `inputs`),
never over an existing file (`writers.unique_path` picks `-1`, `-2`, ...).

Every task is `samplers.registry.make_sample_fn`'s `sample_fn` with one argument more:
img2img passes `x0` (with `strength`), inpaint an `editing.Inpaint`, superres the
conditioning image (`conditioning.superres_cond`). Super-resolution without an input runs
the cascade: `config.edit.base_config` / `base_workdir` name a base model whose samples are
the low-res inputs (written to `<workdir>/edits/cascade_superres.png`).
"""

from __future__ import annotations

import glob
import os
import runpy

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdiff import conditioning
from jdiff.runs.generate import generate, sample_fn
from jdiff.runs.setup import Setup, log_process_info
from jdiff.samplers import editing
from jdiff.training.progress import Progress
from jdiff.training.rng import stream
from jdiff.training.writers import save_image_grid, save_npz, unique_stem

TASKS = ("img2img", "inpaint", "superres")


# ----------------------------------------------------------------------------- inputs


def _to_unit_range(a: np.ndarray, what: str) -> np.ndarray:
  if a.dtype == np.uint8:
    return a.astype(np.float32) / 127.5 - 1.0
  a = a.astype(np.float32)
  if a.size and (a.min() < -1.0 - 1e-3 or a.max() > 1.0 + 1e-3):
    raise ValueError(
      f"{what}: float images must lie in [-1, 1] (or be uint8), got range [{a.min()}, {a.max()}]"
    )
  return a


def _read_array(path: str, key: str) -> np.ndarray:
  if path.endswith(".npy"):
    return np.load(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      if key in z.files:
        return z[key]
      if len(z.files) == 1:
        return z[z.files[0]]
      raise ValueError(f"{path}: no array {key!r} among {z.files}")
  if path.endswith(".png"):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    return np.asarray(Image.open(path))
  raise ValueError(f"cannot read {path!r}: expected an .npz, .npy or .png file")


def load_images(path: str) -> np.ndarray:
  """[N, H, W, C] float32 in [-1, 1] from an .npz / .npy or a folder of PNGs (sorted)."""
  if not path:
    raise ValueError("config.edit.input is empty: give an .npz or a folder of PNGs")
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.png")))
    if not files:
      raise ValueError(f"config.edit.input={path!r}: the folder holds no .png files")
    arrays = [_read_array(f, "images") for f in files]
    if len({a.shape for a in arrays}) > 1:
      raise ValueError(f"{path}: the PNGs differ in shape: {sorted({a.shape for a in arrays})}")
    a = np.stack(arrays)
  elif os.path.exists(path):
    a = _read_array(path, "images")
  else:
    raise ValueError(f"config.edit.input={path!r} does not exist")
  if a.ndim == 3:
    a = a[..., None]
  if a.ndim != 4:
    raise ValueError(f"{path}: images must be [N, H, W] or [N, H, W, C], got shape {a.shape}")
  return _to_unit_range(a, path)


def load_mask(path: str, images_shape: tuple[int, ...]) -> np.ndarray:
  """[N or 1, H, W, 1] float32 in [0, 1] (1 = generate); errors name the bad shape / value."""
  if not path:
    raise ValueError("config.edit.task='inpaint' needs config.edit.mask (1 / white = generate)")
  if not os.path.exists(path):
    raise ValueError(f"config.edit.mask={path!r} does not exist")
  m = _read_array(path, "mask")
  if m.dtype == np.uint8:
    m = m.astype(np.float32) / 255.0
  if m.dtype == bool:
    m = m.astype(np.float32)
  m = np.asarray(m, np.float32)
  n, h, w, _ = images_shape
  if m.ndim == 2:
    m = m[None, ..., None]
  elif m.ndim == 3:
    m = m[..., None] if m.shape[0] in (1, n) and m.shape[1:] == (h, w) else m[None]
  if m.ndim != 4 or m.shape[1:3] != (h, w) or m.shape[0] not in (1, n) or m.shape[3] != 1:
    raise ValueError(
      f"config.edit.mask={path!r}: shape {m.shape} does not fit the images {images_shape}; "
      f"give [H, W], [H, W, 1] or [N, H, W(, 1)] with H, W = {h}, {w}"
    )
  if m.min() < 0.0 or m.max() > 1.0:
    raise ValueError(
      f"config.edit.mask={path!r}: values must lie in [0, 1] (or uint8 0..255), got range "
      f"[{m.min()}, {m.max()}]"
    )
  if not np.any(m > 0):
    raise ValueError(f"config.edit.mask={path!r} selects no pixel to generate (all 0 = keep)")
  return m


def _output_base(path: str) -> str:
  """Where results go: beside the input file (its name without extension) or folder."""
  return os.path.normpath(path) if os.path.isdir(path) else os.path.splitext(path)[0]


# ----------------------------------------------------------------------------- running


def _run_batched(fn, arrays: dict, batch: int, what: str) -> np.ndarray:
  """Runs `fn(k, **batch_arrays)` over batches of `batch` (the last padded), with progress."""
  n = next(iter(arrays.values())).shape[0]
  out = []
  with Progress(n, what) as progress:
    for k, lo in enumerate(range(0, n, batch)):
      part = {}
      for name, a in arrays.items():
        a = a[lo : lo + batch]
        if a.shape[0] < batch:  # pad to one compiled shape
          a = np.concatenate([a, np.repeat(a[-1:], batch - a.shape[0], axis=0)])
        part[name] = jnp.asarray(a)
      y = np.asarray(jax.device_get(fn(k, **part)))
      out.append(y[: min(batch, n - lo)])
      progress.update(out[-1].shape[0])
  return np.concatenate(out)


def superres(setup: Setup, params, lowres: np.ndarray, rng, *, batch: int | None = None):
  """High-resolution samples [N, H, W, C] of an SR model from low-res images [N, h, w, C]."""
  cfg = setup.config
  h, w, c = setup.image_shape
  f = cfg.superres.factor
  if tuple(lowres.shape[1:]) != (h // f, w // f, c):
    raise ValueError(
      f"superres input shape {lowres.shape[1:]} must be the model's {(h, w, c)} / "
      f"factor {f} = {(h // f, w // f, c)}"
    )
  fn = jax.jit(sample_fn(setup))
  level = cfg.superres.aug_level

  def run(k, lowres):
    key = jax.random.fold_in(rng, k)
    b = lowres.shape[0]
    x_T = jax.random.normal(stream(key, "x_T"), (b, h, w, c), jnp.float32)
    aug = jax.random.normal(stream(key, "aug"), (b, h, w, c), jnp.float32)
    cond = conditioning.superres_cond(lowres, (h, w), level, aug)
    return fn(params, x_T, stream(key, "sampler"), None, image_cond=cond)

  return _run_batched(run, {"lowres": lowres}, batch or cfg.sample.batch_size, "images")


def superres_eval_grid(setup: Setup, params, step: int) -> str:
  """Writes `samples/grid_<step>.png`: held-out images downsampled (row 1) and SR'd (row 2)."""
  cfg = setup.config
  n = min(cfg.sample.grid_size, 16)
  truth = []
  for batch in setup.eval_iterator(cfg.eval.batch_size):
    truth.append(np.asarray(batch["image"])[np.asarray(batch["mask"]).astype(bool)])
    if sum(len(t) for t in truth) >= n:
      break
  truth = np.concatenate(truth)[:n]
  lowres = np.asarray(conditioning.downsample(jnp.asarray(truth), cfg.superres.factor))
  rng = jax.random.fold_in(setup.keys.stream("grid"), step)
  hi = superres(setup, params, lowres, rng)
  path = os.path.join(setup.workdir, "samples", f"grid_{step:07d}.png")
  if jax.process_index() == 0:
    path = save_image_grid(path, np.concatenate([_nearest(lowres, hi.shape[1:3]), hi]), ncols=n)
    logging.info("wrote super-resolution grid %s", path)
  return path


def _nearest(x: np.ndarray, size) -> np.ndarray:
  return np.asarray(conditioning.upsample(jnp.asarray(x), tuple(size), method="nearest"))


def _base_samples(config, rng) -> np.ndarray:
  e = config.edit
  if not e.base_config or not e.base_workdir:
    raise ValueError(
      "config.edit.task='superres' needs config.edit.input (low-res images) or both "
      "config.edit.base_config and config.edit.base_workdir (a base model to sample: cascade)"
    )
  base_cfg = runpy.run_path(e.base_config)["get_config"]()
  with Setup(base_cfg, e.base_workdir, kind="diffusion", reads_data=False) as base:
    params, _ = base.restore_params("ema_params")
    return generate(base, params, e.num, rng)


def edit(config, workdir: str) -> str:
  """Runs `config.edit.task` on `config.edit.input`; returns the PNG grid's path."""
  log_process_info()
  e = config.edit
  if e.task not in TASKS:
    raise ValueError(f"config.edit.task must be one of {TASKS}, got {e.task!r}")
  sr = e.task == "superres"
  if sr and not config.superres.factor:
    raise ValueError(
      "config.edit.task='superres' needs a super-resolution config (superres.factor)"
    )
  if not sr and config.superres.factor:
    raise ValueError(f"config.edit.task={e.task!r} needs an image model, not a superres config")
  with Setup(config, workdir, kind="diffusion", reads_data=False) as setup:
    params, step = setup.restore_params("ema_params" if config.sample.use_ema else "params")
    rng = jax.random.fold_in(setup.keys.stream("edit"), step)
    if sr and not e.input:
      inputs = _base_samples(config, stream(rng, "base"))
      stem = os.path.join(setup.workdir, "edits", "cascade")
    else:
      inputs = load_images(e.input)
      stem = _output_base(e.input)
    if sr:
      results = superres(setup, params, inputs, rng)
      before = _nearest(inputs, results.shape[1:3])
    else:
      before, results = _edit_images(setup, params, inputs, rng)
  stem = f"{stem}_{e.task}"
  if jax.process_index() != 0:
    return stem + ".png"
  stem = unique_stem(stem, (".npz", ".png"))  # the two files take one suffix together
  npz = save_npz(stem + ".npz", results=results, inputs=inputs, step=np.int64(step))
  png = save_image_grid(stem + ".png", np.concatenate([before, results]), ncols=len(results))
  logging.info("edit %s: wrote %s and %s", e.task, png, npz)
  return png


def _edit_images(setup: Setup, params, images: np.ndarray, rng):
  cfg, e = setup.config, setup.config.edit
  if tuple(images.shape[1:]) != tuple(setup.image_shape):
    raise ValueError(
      f"config.edit.input images have shape {images.shape[1:]}, the model takes "
      f"{tuple(setup.image_shape)}"
    )
  labels_of = lambda b: (
    None
    if setup.null_label is None
    else jnp.broadcast_to(
      jnp.asarray(setup.null_label, jnp.int32), (b, *np.shape(setup.null_label))
    )
  )
  if e.task == "img2img":
    fn = jax.jit(sample_fn(setup, strength=e.strength))

    def run(k, x0):
      key = jax.random.fold_in(rng, k)
      x_T = jax.random.normal(stream(key, "x_T"), x0.shape, jnp.float32)
      return fn(params, x_T, stream(key, "sampler"), labels_of(x0.shape[0]), x0=x0)

    results = _run_batched(run, {"x0": images}, cfg.sample.batch_size, "images")
    return images, results
  mask = load_mask(e.mask, images.shape)
  mask = np.broadcast_to(mask, images.shape[:3] + (1,)).astype(np.float32)
  fn = jax.jit(sample_fn(setup))

  def run(k, known, mask):
    key = jax.random.fold_in(rng, k)
    x_T = jax.random.normal(stream(key, "x_T"), known.shape, jnp.float32)
    inp = editing.Inpaint(known, mask, jump_length=e.jump_length, jump_n=e.jump_n)
    return fn(params, x_T, stream(key, "sampler"), labels_of(known.shape[0]), inpaint=inp)

  results = _run_batched(run, {"known": images, "mask": mask}, cfg.sample.batch_size, "images")
  return images * (1.0 - mask), results
