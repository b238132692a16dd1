"""One `Setup` for every mode: what a run derives from (config, workdir).

Two kinds of config exist: diffusion configs (jdiff/configs/default.py and its
variants) and stage-1 autoencoder configs (those with an `autoencoder` section, e.g.
ae_digits.py). `Setup` validates either (`jdiff.runs.validate`), prepares the dataset when
the mode reads it (process 0 first, the others after a barrier), builds the mesh, the model,
the optimiser, the random keys and the checkpointer. Use it as a context manager: the
checkpointer is closed on every path, errors included.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from jdiff.data import pipeline, sources
from jdiff.data.latents import latent_shape_of
from jdiff.runs import objectives, sd_finetune, stage1, stored_config
from jdiff.runs import pretrained as pretrained_run
from jdiff.runs.builders import build_autoencoder, build_model, text_conditioning
from jdiff.runs.distilled import resolve
from jdiff.runs.validate import kind_of, validate
from jdiff.runs.validate import validate as validate_config  # noqa: F401 (its former name)
from jdiff.schedules import get_schedule
from jdiff.training import sharding
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.lock import WorkdirLock, lock_if_free
from jdiff.training.loop import train_loop
from jdiff.training.optim import make_optimizer
from jdiff.training.progress import Progress
from jdiff.training.rng import run_keys
from jdiff.training.state import init_autoencoder_state, init_train_state
from jdiff.training.writers import MetricWriter

MODES = {
  "diffusion": "--mode=train|sample|eval|fid|fid_ref",
  "autoencoder": "--mode=train_autoencoder|eval_autoencoder",
}


def log_process_info() -> None:
  logging.info(
    "process %d/%d, %d local devices (%s), %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.default_backend(),
    jax.device_count(),
  )


# ----------------------------------------------------------------------------- builders


def prepared_metadata(config) -> sources.DatasetMetadata:
  """Dataset metadata, preparing the dataset once: process 0 first, the others after a barrier
  (so processes sharing a data_dir never build it concurrently)."""
  get = functools.partial(
    sources.dataset_metadata,
    config.data.name,
    data_dir=config.data.data_dir or None,
    image_size=config.data.image_size or None,
  )
  if jax.process_count() == 1:
    return get()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  meta = get() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("jdiff: dataset prepared")
  return meta if meta is not None else get()


# ----------------------------------------------------------------------------- Setup


class Setup:
  """Everything derived from (config, workdir) that the modes share.

  Attributes:
    kind: 'diffusion' or 'autoencoder' (`kind_of(config)`).
    config, workdir: as given (workdir made absolute).
    data_dir, image_size: config.data's, with '' / 0 as None.
    meta: the dataset's metadata (opened on first use: a mode that reads no data never
      opens the dataset).
    pixel_shape: (H, W, C) of the data's images: the dataset's, or without `reads_data`
      the imported weights', the autoencoder's or the workdir's record of them.
    image_shape: (H, W, C) of the model's input: the pixels, or for latent diffusion
      the latents.
    mesh, repl, data_sh: the device mesh, replicated and batch-sharded shardings.
    keys: the run's random keys (`jdiff.training.rng.RunKeys`).
    optimizer: from config.optim.
    module: the U-Net, or the AutoencoderKL.
    checkpointer: on workdir/checkpoints.
    Diffusion only: schedule, codec (None in pixel space), num_classes (None when
    unconditional), null_label. Autoencoder only: latent_shape.

  Args:
    config: a locked ml_collections config.
    workdir: the run's directory.
    kind: the kind the mode needs; a config of the other kind is a clear error.
    writer: a training run: process 0 takes the workdir's lock (`jdiff.training.lock`)
      for the whole run and stores the config in the workdir if it has none. A
      read-only run (sample, eval) only compares the stored config and leaves corrupt
      checkpoints in place while another run holds the lock.
    reads_data: the mode reads the dataset (train, eval, reference statistics). Without
      it the image shape and class count come from the imported weights, the stage-1
      autoencoder or the workdir's `dataset.json` (written by training), and the dataset
      is opened only if none of them has them.
  """

  def __init__(
    self,
    config,
    workdir: str,
    *,
    kind: str | None = None,
    writer: bool = False,
    reads_data: bool = True,
  ):
    self.kind = kind_of(config)
    if kind is not None and kind != self.kind:
      raise ValueError(
        f"this mode runs {kind} configs ({MODES[kind]}); the config given is "
        f"of kind {self.kind!r}: run it with {MODES[self.kind]}"
      )
    validate(config)  # first: a bad value stops the run before anything is touched
    self.config, self.workdir = resolve(config, workdir), os.path.abspath(workdir)
    self.reads_data = reads_data
    self._meta = None
    self.lock = WorkdirLock(self.workdir) if writer and jax.process_index() == 0 else None
    if self.lock is not None:
      self.lock.acquire()  # first: a second trainer fails before it prepares anything
    try:
      self._build(writer)
    except BaseException:
      self._release()
      raise

  def _build(self, writer: bool) -> None:
    config = self.config
    stored_config.check_or_store(config, self.workdir, write=writer)
    self.data_dir = config.data.data_dir or None
    self.image_size = config.data.image_size or None
    self.codec = None
    # A text model's captions, label prompts, prompt encoder; a prepared (encoded) source.
    self.caption_fn = self.cond_table = self.encode_text = self.prepared_source = None
    self.pretrained = None  # a jdiff.pretrained.Pretrained with config.pretrained.path
    if "mesh" in config:
      self.mesh = sharding.make_mesh_2d(data=config.mesh.data, fsdp=config.mesh.fsdp)
    else:
      self.mesh = sharding.make_mesh()
    self.repl = sharding.replicated(self.mesh)
    self.data_sh = sharding.data_sharding(self.mesh)
    if self.kind == "diffusion":
      self._build_diffusion(writer)
    else:
      self.pixel_shape = self.image_shape = tuple(self.meta.image_shape)
      self.module = build_autoencoder(config, self.image_shape)
      self.latent_shape = latent_shape_of(self.module, self.image_shape)
    self.optimizer = make_optimizer(total_steps=config.train.num_steps, **config.optim)
    self.keys = run_keys(config.seed, config.train.get("prng_impl", "threefry"))
    # Last: nothing after it can fail, so an error above leaves nothing open.
    guard = self.lock.verified if self.lock else None  # re-checked before saves and moves
    self.checkpointer = Checkpointer(
      os.path.join(self.workdir, stage1.CKPT_DIR),
      max_to_keep=config.train.keep_checkpoints,
      guard=guard if writer else lambda: lock_if_free(self.workdir),
      allow_unverified=config.train.get("allow_unverified_checkpoints", False),
    )

  @property
  def meta(self) -> sources.DatasetMetadata:
    """The dataset's metadata, prepared on first use (`prepared_metadata`)."""
    if self._meta is None:
      d = self.config.data
      try:
        self._meta = prepared_metadata(self.config)
      except (ValueError, ImportError) as e:  # one line: who needs the data, which, why not
        why = (
          "this mode reads the dataset"
          if self.reads_data
          else "the image shape comes from the dataset (no imported weights, autoencoder or "
          f"{stored_config.DATASET_FILE} in the workdir)"
        )
        raise type(e)(f"{why} config.data.name={d.name!r} (data_dir={d.data_dir!r}): {e}") from e
    return self._meta

  def _dataset(self, writer: bool) -> tuple[tuple[int, int, int], int | None]:
    """(pixel shape, class count): the dataset's (stored in the workdir by a training run),
    or without `reads_data` the workdir's record or the autoencoder's shape."""
    c = self.config
    if not self.reads_data:
      record = stored_config.read_dataset(self.workdir, c)
      if record is not None:
        return record
      if self.codec is not None and not c.conditional:
        return tuple(self.codec.image_shape), None
    shape, classes = tuple(self.meta.image_shape), self.meta.num_classes
    if writer:
      stored_config.store_dataset(self.workdir, c, shape, classes)
    return shape, classes

  def _build_diffusion(self, writer: bool) -> None:
    c = self.config
    d = c.diffusion
    self.schedule = get_schedule(d.schedule, d.num_steps, zero_terminal_snr=d.zero_terminal_snr)
    if c.objective != "ddpm":  # edm / flow: the continuous process (jdiff.processes)
      self.schedule = objectives.make_process(c)
    if c.latent.autoencoder_workdir:
      self.codec = stage1.load_codec(
        c.latent.autoencoder_workdir, scale_factor=c.latent.scale_factor
      )
    if pretrained_run.enabled(c):  # module, schedule, params, shapes, classes, config copy
      (sd_finetune.attach if sd_finetune.enabled(c) else pretrained_run.attach)(self)
      return
    self.pixel_shape, classes = self._dataset(writer)
    self.image_shape = self.pixel_shape
    if c.conditional and not classes:
      raise ValueError(f"config.conditional=True but dataset {c.data.name!r} has no labels")
    if self.codec is not None:
      if tuple(self.codec.image_shape) != self.pixel_shape:
        raise ValueError(
          f"the autoencoder in {c.latent.autoencoder_workdir} was trained on "
          f"images {self.codec.image_shape}, but config.data gives "
          f"{self.pixel_shape}"
        )
      self.image_shape = tuple(self.codec.latent_shape)
    self.num_classes = classes if c.conditional else None
    self.module = build_model(c, num_classes=classes, channels=self.image_shape[-1])
    self.null_label = self.num_classes  # the U-Net reserves label num_classes for "no class"
    if c.get("text") is not None:  # token ids for labels; the empty prompt is the null
      self.caption_fn, self.null_label, self.cond_table = text_conditioning(c, classes)

  def __enter__(self) -> Setup:
    return self

  def __exit__(self, *exc) -> None:
    try:
      self.checkpointer.__exit__(*exc)
    finally:
      self._release()

  def close(self) -> None:
    try:
      self.checkpointer.close()
    finally:
      self._release()

  def _release(self) -> None:
    if self.lock is not None:
      self.lock.release()

  # --------------------------------------------------------------------------- data

  @property
  def iter_image_size(self) -> int | None:
    """The resize the input pipeline applies (none for precomputed latents)."""
    if self.kind == "diffusion" and self.config.flow.reflow_pairs:
      return None  # reflow pairs are stored model-ready
    return None if self.codec is not None else self.image_size

  def source(self, split: str):
    """The dataset name, or for latent diffusion the encoded split (a random-access source)."""
    if self.prepared_source is not None:  # e.g. a caption folder's latents and contexts
      return self.prepared_source
    if (
      self.kind == "diffusion"
      and self.config.flow.reflow_pairs
      and split == self.config.data.train_split
    ):
      return objectives.pair_source(self.config.flow.reflow_pairs)
    if self.codec is None:
      return self.config.data.name
    from jdiff.data import latents  # pylint: disable=g-import-not-at-top

    return latents.encode_source(
      self.codec,
      self.config.data.name,
      split=split,
      data_dir=self.data_dir,
      image_size=self.image_size,
      shardings=local_shardings(),
    )

  def train_iterator(self):
    """This process's shuffled training batches of config.data.train_split."""
    c = self.config
    sharding.check_global_batch(c.train.batch_size, self.mesh)
    k, n_dev = c.train.get("grad_accum_steps", 1), self.mesh.devices.size
    if c.train.batch_size % (k * n_dev):
      raise ValueError(
        f"config.train.batch_size={c.train.batch_size} must be a multiple of "
        f"grad_accum_steps={k} x {n_dev} devices, so that every microbatch fills the devices"
      )
    return pipeline.make_train_iterator(
      self.source(c.data.train_split),
      global_batch_size=c.train.batch_size,
      seed=c.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      split=c.data.train_split,
      data_dir=self.data_dir,
      image_size=self.iter_image_size,
      random_flip=c.data.random_flip,
    )

  def eval_iterator(self, batch_size: int):
    """This process's part of one padded pass over config.data.eval_split."""
    sharding.check_global_batch(batch_size, self.mesh)
    split = self.config.data.eval_split
    return pipeline.make_eval_iterator(
      self.source(split),
      global_batch_size=batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      split=split,
      data_dir=self.data_dir,
      image_size=self.iter_image_size,
    )

  def eval_progress(self, batch_size: int) -> Progress:
    """A progress meter over the batches of one eval pass (of the split's stored size)."""
    split = self.config.data.eval_split
    n = self.meta.num_examples.get(split) or self.meta.num_examples.get(split.split("[")[0])
    return Progress(max(1, math.ceil((n or batch_size) / batch_size)), "eval batches")

  # --------------------------------------------------------------------------- state

  def state_shardings(self, shapes):
    """The state's shardings: by the FSDP rule over config.mesh for diffusion (replicated
    when fsdp = 1), replicated for the autoencoder. `shapes`: the state or its shapes."""
    if self.kind != "diffusion" or "mesh" not in self.config:
      return jax.tree.map(lambda _: self.repl, shapes)
    return sharding.fsdp_shardings(shapes, self.mesh, min_size=self.config.mesh.fsdp_min_size)

  def _init_fn(self):
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    if self.kind == "diffusion":
      cond_ch = getattr(self.module, "image_cond_channels", 0)
      cond = jnp.zeros((*x.shape[:-1], cond_ch), jnp.float32) if cond_ch else None
      if self.cond_table is not None:  # a text model: token ids [1, L] or a context
        cond = jnp.zeros((1, *self.cond_table.shape[1:]), self.cond_table.dtype)
      return functools.partial(
        init_train_state,
        self.module,
        self.optimizer,
        sample_x=x,
        num_classes=self.num_classes,
        sample_cond=cond,
      )
    return functools.partial(init_autoencoder_state, self.module, self.optimizer, sample_x=x)

  def init_state(self):
    """The step-0 state (`TrainState` or `AutoencoderState`), laid out by `state_shardings`
    (replicated unless config.mesh.fsdp > 1)."""
    init = self._init_fn()
    shapes = jax.eval_shape(init, self.keys.init)
    shardings = self.state_shardings(shapes)
    state = jax.jit(init, out_shardings=shardings)(self.keys.init)
    if getattr(self, "pretrained", None) is not None:  # fine-tuning from imported weights
      p = self.pretrained.params  # two copies: the train step donates its state
      state = state.replace(
        params=jax.device_put(jax.tree.map(jnp.copy, p), shardings.params),
        ema_params=jax.device_put(jax.tree.map(jnp.copy, p), shardings.ema_params),
      )
    return state

  def abstract_state(self, *, sharded: bool = False):
    """`init_state`'s shapes and dtypes (nothing computed): replicated, or with
    `state_shardings` if `sharded`."""
    shapes = jax.eval_shape(self._init_fn(), self.keys.init)
    shs = self.state_shardings(shapes) if sharded else jax.tree.map(lambda _: self.repl, shapes)
    return jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shs
    )

  def restore_params(self, field: str = "params") -> tuple[Any, int]:
    """One field of the latest checkpoint's state ('params' or 'ema_params'), replicated.

    Only that field is read. Raises FileNotFoundError naming the workdir if there is no
    checkpoint.
    """
    if self.checkpointer.latest_step() is None and self.pretrained is not None:
      logging.info("no checkpoint in %s: using the imported weights", self.workdir)
      return self.pretrained.params, 0
    if self.checkpointer.latest_step() is None:
      train = "train" if self.kind == "diffusion" else "train_autoencoder"
      raise FileNotFoundError(
        f"no checkpoint under {self.checkpointer.directory}; train first "
        f"with --mode={train} --workdir={self.workdir}"
      )
    target = {field: getattr(self.abstract_state(), field)}
    restored, step = self.checkpointer.restore_partial(target)
    return restored[field], step

  def train_loop(self, state, step_fn, train_iter, start: int, **kwargs):
    """`training.loop.train_loop` with this config's steps, batch, logging and checkpoint
    periods, saving `state` with `train_iter`'s position; waits for the last save.

    Returns:
      (state, step, preempted), as `train_loop`.
    """
    t = self.config.train
    out = train_loop(
      state,
      step_fn,
      start=start,
      total=t.num_steps,
      batch_size=t.batch_size,
      log_every=t.log_every,
      ckpt_every=t.ckpt_every,
      save=lambda step, state: self.checkpointer.save(step, state, train_iter),
      preemption_check_every=t.get("preemption_check_every", 1),
      profile_steps=tuple(t.get("profile_steps", (0, 0))),
      profile_dir=os.path.join(self.workdir, "tensorboard"),
      **kwargs,
    )
    self.checkpointer.wait()
    return out


def local_shardings():
  """(replicated, batch-sharded) over this process's devices: per-process work such as
  encoding a dataset once per process (`jdiff.data.latents.encode_split`)."""
  local = sharding.local_mesh()
  return sharding.replicated(local), sharding.data_sharding(local)


def run_training(
  config, workdir: str, kind: str, train: Callable[[Setup, MetricWriter], Any]
) -> Any:
  """Opens a training run's resources, calls `train(setup, writer)`, closes them on every path.

  The `Setup` (its checkpointer) and the `MetricWriter` are closed whether `train` returns,
  raises or is interrupted; an in-flight checkpoint save is finished first.
  """
  log_process_info()
  with Setup(config, workdir, kind=kind, writer=True) as setup:
    with MetricWriter(setup.workdir) as writer:
      step = setup.checkpointer.latest_step() or 0
      writer.write_text(step, "config", "```\n" + str(config) + "\n```")
      return train(setup, writer)
