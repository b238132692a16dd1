"""The training, sampling and evaluation loops behind `experiments/main.py`.

`train_and_evaluate(config, workdir)` trains with a sharded, donated, jitted step over
all devices of all processes, checkpoints periodically, at the end and on SIGTERM,
and resumes from the workdir (resume always wins). `sample` and `evaluate` restore
the latest checkpoint and use its EMA parameters.
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jdiff import losses
from jdiff.data import pipeline
from jdiff.models.bridge import make_model_fn
from jdiff.models.unet import UNet
from jdiff.ops.winograd import CONV_IMPLS
from jdiff.runs.sample_options import sample_options, validate_sample_config
from jdiff.schedules import Schedule, get_schedule
from jdiff.training import sharding
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.loop import NonFiniteLossError, train_loop  # noqa: F401 (re-export)
from jdiff.training.optim import make_optimizer
from jdiff.training.sampling import make_sample_fn
from jdiff.training.state import TrainState, init_train_state, param_count
from jdiff.training.step import make_eval_step, make_train_step
from jdiff.training.writers import MetricWriter, save_image_grid, save_npz, write_scalars_once

Array = jax.Array
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------- building blocks

def log_process_info() -> None:
  logging.info("process %d/%d, %d local devices (%s), %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.default_backend(),
               jax.device_count())


def data_dir(config) -> str | None:
  return config.data.data_dir or None


def build_model(config, *, num_classes: int | None, channels: int) -> UNet:
  """The U-Net from `config.model` (its fields are UNet's constructor arguments)."""
  kwargs = dict(config.model)
  dtype = kwargs.pop("dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  if config.model.learn_sigma != (config.diffusion.variance == "learned_range"):
    raise ValueError("config.model.learn_sigma=True goes with config.diffusion.variance="
                     f"'learned_range' and vice versa; got learn_sigma={config.model.learn_sigma}"
                     f", variance={config.diffusion.variance!r}")
  if kwargs.get("conv_impl", "auto") not in CONV_IMPLS:
    raise ValueError(f"config.model.conv_impl must be one of {CONV_IMPLS}, got "
                     f"{kwargs['conv_impl']!r}")
  kwargs["num_classes"] = num_classes if config.conditional else None
  kwargs["out_channels"] = channels
  for key in ("ch_mult", "attn_resolutions"):
    kwargs[key] = tuple(kwargs[key])
  return UNet(dtype=DTYPES[dtype], **kwargs)


def build_schedule(config) -> Schedule:
  d = config.diffusion
  return get_schedule(d.schedule, d.num_steps, zero_terminal_snr=d.zero_terminal_snr)


def loss_kwargs(config) -> dict:
  d = config.diffusion
  return dict(prediction=d.prediction, weighting=d.weighting, min_snr_gamma=d.min_snr_gamma,
              learn_sigma=config.model.learn_sigma, vlb_weight=d.vlb_weight)


def prepared_metadata(config) -> pipeline.DatasetMetadata:
  """Dataset metadata, preparing the dataset once: process 0 first, the others after a barrier
  (so processes sharing a data_dir never build it concurrently)."""
  get = functools.partial(pipeline.dataset_metadata, config.data.name, data_dir=data_dir(config),
                          image_size=config.data.image_size or None)
  if jax.process_count() == 1:
    return get()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  meta = get() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("jdiff: dataset prepared")
  return meta if meta is not None else get()


class Setup:
  """Everything derived from (config, workdir) that the three modes share."""

  def __init__(self, config, workdir: str):
    validate_config(config)
    self.config, self.workdir = config, os.path.abspath(workdir)
    self.meta = prepared_metadata(config)
    if config.conditional and not self.meta.num_classes:
      raise ValueError(f"config.conditional=True but dataset {config.data.name!r} has no labels")
    self.image_shape = tuple(self.meta.image_shape)
    self.pixel_shape = self.image_shape  # what samples decode to; image_shape is the model's
    self.codec = None
    if config.latent.autoencoder_workdir:
      from jdiff.training import latents  # pylint: disable=g-import-not-at-top
      self.codec = latents.load_codec(config.latent.autoencoder_workdir,
                                      scale_factor=config.latent.scale_factor)
      if tuple(self.codec.image_shape) != self.pixel_shape:
        raise ValueError(f"the autoencoder in {config.latent.autoencoder_workdir} was trained on "
                         f"images {self.codec.image_shape}, but config.data gives "
                         f"{self.pixel_shape}")
      self.image_shape = tuple(self.codec.latent_shape)
      self._decode = jax.jit(functools.partial(latents.decode, self.codec))
    self.num_classes = self.meta.num_classes if config.conditional else None
    self.module = build_model(config, num_classes=self.meta.num_classes,
                              channels=self.image_shape[-1])
    self.null_label = self.num_classes  # the U-Net reserves label num_classes for "no class"
    self.schedule = build_schedule(config)
    self.mesh = sharding.make_mesh()
    self.repl = sharding.replicated(self.mesh)
    self.optimizer = make_optimizer(total_steps=config.train.num_steps, **config.optim)
    rng = jax.random.key(config.seed)
    self.train_rng, self.sample_rng, self.eval_rng = jax.random.split(rng, 3)
    # Parameter init uses the 'rbg' PRNG: threefry-based init of every kernel compiles
    # for tens of seconds on a CPU, rbg in about one.
    self.init_rng = jax.random.key(config.seed, impl="rbg")
    self.checkpointer = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                     max_to_keep=config.train.keep_checkpoints)

  @property
  def iter_image_size(self) -> int | None:
    """The resize the input pipeline applies (none for precomputed latents)."""
    return None if self.codec is not None else (self.config.data.image_size or None)

  def source(self, split: str):
    """The dataset name, or for latent diffusion the encoded split (a random-access source)."""
    if self.codec is None:
      return self.config.data.name
    from jdiff.training import latents  # pylint: disable=g-import-not-at-top
    return latents.encode_source(self.codec, self.config.data.name, split=split,
                                 data_dir=data_dir(self.config),
                                 image_size=self.config.data.image_size or None)

  def init_state(self) -> TrainState:
    sample_x = jnp.zeros((1, *self.image_shape), jnp.float32)
    init = functools.partial(init_train_state, self.module, self.optimizer,
                             sample_x=sample_x, num_classes=self.num_classes)
    return jax.jit(init, out_shardings=self.repl)(self.init_rng)

  def restore_params(self, *, use_ema: bool = True):
    """The latest checkpoint's (EMA) parameters, replicated; a clear error if none."""
    step = self.checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.checkpointer.directory}; train first "
                              f"with --mode=train --workdir={self.workdir}")
    abstract = jax.eval_shape(self.init_state)
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.repl), abstract)
    state = self.checkpointer.restore(abstract, step=step)
    return (state.ema_params if use_ema else state.params), step

  def sample_fn(self, **overrides):
    opts = {**sample_options(self.config.sample), **overrides}
    return make_sample_fn(self.module, self.schedule, prediction=self.config.diffusion.prediction,
                          variance=self.config.diffusion.variance, null_label=self.null_label,
                          **opts)

  def generate(self, params, num: int, rng: Array, **overrides) -> np.ndarray:
    """`num` samples [num, H, W, C] in [-1, 1] from `params` (batched, jitted once)."""
    batch = self.config.sample.batch_size
    n_dev = self.mesh.devices.size
    batch = max(n_dev, batch // n_dev * n_dev)
    fn = jax.jit(self.sample_fn(**overrides),
                 in_shardings=(self.repl, sharding.data_sharding(self.mesh), self.repl,
                               sharding.data_sharding(self.mesh)),
                 out_shardings=self.repl)
    out = []
    for k in range(math.ceil(num / batch)):
      key = jax.random.fold_in(rng, k)
      x_T = jax.random.normal(key, (batch, *self.image_shape), jnp.float32)
      labels = (jnp.arange(k * batch, (k + 1) * batch, dtype=jnp.int32)
                % (self.num_classes or 1))
      x0 = fn(params, x_T, jax.random.fold_in(key, 1), labels)
      if self.codec is not None:
        x0 = self._decode(x0)
      out.append(np.asarray(jax.device_get(x0)))
    return np.concatenate(out)[:num]


# ----------------------------------------------------------------------------- config checks

REQUIRED_SECTIONS = ("data", "model", "diffusion", "optim", "train", "sample", "eval")


def validate_config(config) -> None:
  """Raises ValueError naming the bad key/value for inconsistent configs."""
  for section in REQUIRED_SECTIONS:
    if section not in config:
      raise ValueError(f"config is missing the section {section!r}")
  t = config.train
  for key in ("num_steps", "batch_size", "log_every", "ckpt_every", "sample_every",
              "keep_checkpoints"):
    value = t[key]
    if not isinstance(value, int) or value < (0 if key.endswith("every") else 1):
      raise ValueError(f"config.train.{key} must be a positive integer, got {value!r}")
  if not 0.0 <= t.label_dropout < 1.0:
    raise ValueError(f"config.train.label_dropout must be in [0, 1), got {t.label_dropout}")
  if t.label_dropout and not config.conditional:
    raise ValueError("config.train.label_dropout > 0 needs config.conditional=True")
  validate_sample_config(config.sample, latent=bool(config.latent.autoencoder_workdir))
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")


# ----------------------------------------------------------------------------- training

def params_checksum(params) -> float:
  """A float64 checksum of this process's copy of (replicated) parameters."""
  leaves = [np.asarray(x.addressable_data(0), np.float64) for x in jax.tree.leaves(params)]
  return float(sum(np.sum(x * (1.0 + 1e-3 * i)) for i, x in enumerate(leaves)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint) and returns the final state."""
  log_process_info()
  setup = Setup(config, workdir)
  cfg, mesh = config, setup.mesh
  sharding.check_global_batch(cfg.train.batch_size, mesh)
  data_sh = sharding.data_sharding(mesh)
  is_main = jax.process_index() == 0

  state = setup.init_state()
  logging.info("model: %d parameters; image shape %s; %s", param_count(state.params),
               setup.image_shape, setup.module.__class__.__name__)
  train_iter = pipeline.make_train_iterator(
      setup.source(cfg.data.train_split), global_batch_size=cfg.train.batch_size, seed=cfg.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      split=cfg.data.train_split, data_dir=data_dir(cfg), image_size=setup.iter_image_size,
      random_flip=cfg.data.random_flip)
  ckpt = setup.checkpointer
  state, start = ckpt.restore_or_keep(state, train_iter)

  train_step = jax.jit(
      make_train_step(setup.module, setup.optimizer, ema_decay=cfg.ema_decay,
                      ema_warmup=cfg.ema_warmup, label_dropout=cfg.train.label_dropout,
                      null_label=setup.null_label, **loss_kwargs(cfg)),
      in_shardings=(setup.repl, data_sh, setup.repl, setup.repl),
      out_shardings=(setup.repl, setup.repl), donate_argnums=(0,))

  writer = MetricWriter(setup.workdir)

  def step_fn(state):
    batch = sharding.to_global({k: v for k, v in next(train_iter).items() if k != "mask"}, mesh)
    return train_step(state, batch, setup.schedule, setup.train_rng)

  def log(step, metrics, rate, eta_s):
    if not is_main:
      return
    loss = float(np.mean([m["loss"] for m in metrics]))
    logging.info("step %d/%d  loss %.5f  %.1f img/s  ETA %s", step, cfg.train.num_steps, loss,
                 rate, time.strftime("%H:%M:%S", time.gmtime(eta_s)))
    writer.write_scalars(step, {"train/loss": loss, "train/img_per_s": rate,
                                "train/grad_norm": float(metrics[-1]["grad_norm"])})

  def sample_grid(step, state):
    images = setup.generate(state.ema_params, cfg.sample.grid_size,
                            jax.random.fold_in(setup.sample_rng, step))
    if is_main:
      path = save_image_grid(os.path.join(setup.workdir, "samples", f"grid_{step:07d}.png"), images)
      logging.info("wrote sample grid %s", path)

  def periodic(step, state):
    if cfg.train.sample_every and step % cfg.train.sample_every == 0:
      sample_grid(step, state)

  state, step, preempted = train_loop(
      state, step_fn, start=start, total=cfg.train.num_steps, batch_size=cfg.train.batch_size,
      log_every=cfg.train.log_every, ckpt_every=cfg.train.ckpt_every,
      save=lambda step, state: ckpt.save(step, state, train_iter), log=log, periodic=periodic)
  ckpt.wait()
  logging.info("process %d: params checksum %.10e at step %d", jax.process_index(),
               params_checksum(state.params), step)
  if step == cfg.train.num_steps and not preempted:
    sample_grid(step, state)
  writer.close()
  ckpt.close()
  return state


# ----------------------------------------------------------------------------- sample / eval

def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config.sample.num_samples` samples (.npz and a PNG grid) from the EMA params."""
  log_process_info()
  setup = Setup(config, workdir)
  params, step = setup.restore_params(use_ema=config.sample.use_ema)
  s = config.sample
  t0 = time.perf_counter()
  images = setup.generate(params, s.num_samples, jax.random.fold_in(setup.sample_rng, 10**9 + step))
  logging.info("sampled %d images with %s (%d steps) in %.1fs", s.num_samples, s.sampler,
               s.num_steps, time.perf_counter() - t0)
  setup.checkpointer.close()
  out = os.path.join(setup.workdir, "samples", f"samples_{s.sampler}{s.num_steps}_step{step}")
  if jax.process_index() != 0:
    return out + ".npz"
  npz = save_npz(out + ".npz", images=images, step=np.int64(step))
  png = save_image_grid(out + ".png", images[: s.grid_size])
  logging.info("wrote %s and %s", npz, png)
  return npz


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Held-out denoising loss over the eval split, and the bound in bits/dim on a subset."""
  log_process_info()
  setup = Setup(config, workdir)
  params, step = setup.restore_params(use_ema=config.eval.use_ema)
  cfg, mesh = config, setup.mesh
  sharding.check_global_batch(cfg.eval.batch_size, mesh)
  data_sh = sharding.data_sharding(mesh)
  eval_step = jax.jit(make_eval_step(setup.module, conditional=cfg.conditional,
                                     **loss_kwargs(cfg)),
                      in_shardings=(setup.repl, data_sh, setup.repl, setup.repl),
                      out_shardings=setup.repl)
  it = pipeline.make_eval_iterator(
      setup.source(cfg.data.eval_split), global_batch_size=cfg.eval.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), split=cfg.data.eval_split, data_dir=data_dir(cfg),
      image_size=setup.iter_image_size)
  loss_sum, count, bound_sum, bound_count = 0.0, 0.0, 0.0, 0
  bound_fn = jax.jit(functools.partial(_bound, setup), in_shardings=(setup.repl, data_sh,
                                                                     setup.repl),
                     out_shardings=setup.repl)
  for i, batch in enumerate(it):
    batch = sharding.to_global(batch, mesh)
    out = jax.device_get(eval_step(params, batch, setup.schedule,
                                   jax.random.fold_in(setup.eval_rng, i)))
    loss_sum += float(out["loss_sum"])
    count += float(out["count"])
    # The bound in bits/dim is defined for 8-bit pixels, not for continuous latents.
    if setup.codec is None and bound_count < cfg.eval.bound_examples:
      total, n = jax.device_get(bound_fn(params, batch, jax.random.fold_in(setup.eval_rng, 2**30 + i)))
      bound_sum += float(total)
      bound_count += int(n)
  results = {"eval/loss": loss_sum / max(count, 1.0), "eval/examples": count}
  if bound_count:
    results["eval/bpd_bound"] = bound_sum / bound_count
    results["eval/bound_examples"] = float(bound_count)
  logging.info("eval at step %d: %s", step, results)
  write_scalars_once(setup.workdir, step, results)
  setup.checkpointer.close()
  return results


def _bound(setup: Setup, params, batch, rng):
  """Sum of the full variational bound (bits/dim) over the unpadded examples of a batch."""
  cfg = setup.config
  model_fn = make_model_fn(setup.module, params, train=False)
  cond = batch["label"] if cfg.conditional else None
  terms = losses.variational_bound(setup.schedule, model_fn, batch["image"], rng, cond=cond,
                                   prediction=cfg.diffusion.prediction,
                                   variance=cfg.diffusion.variance)
  mask = batch["mask"].astype(jnp.float32)
  return jnp.sum(terms.total * mask), jnp.sum(mask)
