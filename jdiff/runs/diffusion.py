"""Diffusion runs: `train_and_evaluate`, `sample` and `evaluate` of a diffusion config.

`train_and_evaluate(config, workdir)` trains with a sharded, donated, jitted step over
all devices of all processes, checkpoints periodically, at the end and on SIGTERM,
and resumes from the workdir (resume always wins). `sample` and `evaluate` restore
the latest checkpoint's (EMA) parameters.

Random streams (`jdiff.training.rng`): training uses `keys.train` (see `RunKeys` for
why it is not a named stream); the grids drawn during training use the stream 'grid',
`--mode=sample` the stream 'sample' (both with the checkpoint step folded in), and
evaluation the streams 'eval' (denoising loss) and 'bound' (the variational bound),
with the batch index folded in.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jdiff import losses
from jdiff.data import captions
from jdiff.models.bridge import make_model_fn
from jdiff.runs import audio, objectives
from jdiff.runs.generate import generate, sample_fn  # noqa: F401 (sample_fn re-exported)
from jdiff.runs.setup import Setup, log_process_info, run_training
from jdiff.runs.text2image import prompts_of
from jdiff.runs.train import MeanLogger, TrainMode, train
from jdiff.training import sharding
from jdiff.training.progress import Progress
from jdiff.training.state import TrainState, param_count
from jdiff.training.step import make_eval_step, make_train_step
from jdiff.training.writers import (
  MetricWriter,
  save_npz,
  unique_stem,
  write_scalars_once,
)

Array = jax.Array
KIND = "diffusion"


def loss_kwargs(config) -> dict:
  """The loss options of `config.diffusion` (and `model.learn_sigma`)."""
  d = config.diffusion
  return dict(
    prediction=d.prediction,
    weighting=d.weighting,
    min_snr_gamma=d.min_snr_gamma,
    learn_sigma=config.model.learn_sigma,
    vlb_weight=d.vlb_weight,
  ) | objectives.loss_overrides(config)


def superres_cond_fn(config):
  """The training conditioning of a super-resolution config (`config.superres.factor` > 0)."""
  sr = config.get("superres")
  if sr is None or not sr.factor:
    return None
  from jdiff import conditioning  # pylint: disable=g-import-not-at-top

  return conditioning.make_superres_cond_fn(sr.factor, sr.aug_max)


def params_checksum(params) -> float:
  """A float64 checksum of this process's copy of the parameters (gathered if sharded)."""
  leaves = jax.tree.leaves(params)
  if any(not x.sharding.is_fully_replicated for x in leaves):
    mesh = leaves[0].sharding.mesh
    leaves = jax.tree.leaves(sharding.replicate(params, mesh))
  leaves = [np.asarray(x.addressable_data(0), np.float64) for x in leaves]
  return float(sum(np.sum(x * (1.0 + 1e-3 * i)) for i, x in enumerate(leaves)))


# ----------------------------------------------------------------------------- training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint) and returns the final state."""
  return run_training(config, workdir, KIND, _train)


def _train(setup: Setup, writer: MetricWriter) -> TrainState:
  cfg, mesh = setup.config, setup.mesh

  def describe(state):
    return (
      f"model: {param_count(state.params)} parameters; image shape {setup.image_shape}; "
      f"{setup.module.__class__.__name__}"
    )

  def make_step(state, train_iter):
    state_sh = setup.state_shardings(state)
    train_step = jax.jit(
      make_train_step(
        setup.module,
        setup.optimizer,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
        label_dropout=cfg.train.label_dropout,
        null_label=setup.null_label,
        grad_accum_steps=cfg.train.grad_accum_steps,
        micro_sharding=setup.data_sh,
        grad_shardings=state_sh.params,
        reflow=bool(cfg.flow.reflow_pairs),
        cond_fn=superres_cond_fn(cfg),
        label_fn=setup.caption_fn,
        **loss_kwargs(cfg),
      ),
      in_shardings=(state_sh, setup.data_sh, setup.repl, setup.repl),
      out_shardings=(state_sh, setup.repl),
      donate_argnums=(0,),
    )

    def step_fn(state):
      batch = sharding.to_global({k: v for k, v in next(train_iter).items() if k != "mask"}, mesh)
      return train_step(state, batch, setup.schedule, setup.keys.train)

    return step_fn

  grids = SampleGrids(setup, writer)

  def finish(step, state):
    grids(step, state)
    if cfg.eval.quality_samples:
      from jdiff.runs import fid  # pylint: disable=g-import-not-at-top

      rng = jax.random.fold_in(setup.keys.stream("quality"), step)
      fid.quality(setup, state.ema_params, cfg.eval.quality_samples, rng, writer=writer, step=step)

  mode = TrainMode(
    describe=describe,
    make_step=make_step,
    logger=MeanLogger(writer, cfg.train.num_steps),
    periodic=grids.periodic,
    finish=finish,
    after=log_checksum,
  )
  return train(setup, writer, mode)


def log_checksum(step: int, state) -> None:
  logging.info(
    "process %d: params checksum %.10e at step %d",
    jax.process_index(),
    params_checksum(state.params),
    step,
  )


class SampleGrids:
  """The sample grids of a training run: `periodic(step, state)` every
  `config.train.sample_every` steps, and `self(step, state)` at the end (the EMA params);
  a super-resolution config writes a before/after grid of held-out images instead.

  Args:
    setup, writer: the run's.
    tag: the TensorBoard image tag.
  """

  def __init__(self, setup: Setup, writer: MetricWriter, *, tag: str = "samples/grid"):
    self.setup, self.writer, self.tag = setup, writer, tag
    self.rng = setup.keys.stream("grid")

  def __call__(self, step: int, state, **overrides) -> None:
    setup, cfg = self.setup, self.setup.config
    if superres_cond_fn(cfg) is not None:  # a before/after grid of held-out images
      from jdiff.runs import edit  # pylint: disable=g-import-not-at-top

      edit.superres_eval_grid(setup, state.ema_params, step)
      return
    images = generate(
      setup,
      state.ema_params,
      cfg.sample.grid_size,
      jax.random.fold_in(self.rng, step),
      **overrides,
    )
    if jax.process_index() == 0:
      png = os.path.join(setup.workdir, "samples", f"grid_{step:07d}.png")
      path = audio.save_grid(cfg, png, images, writer=self.writer, step=step)  # images or signals
      self.writer.write_image(step, self.tag, path)
      logging.info("wrote sample grid %s", path)

  def periodic(self, step: int, state) -> None:
    every = self.setup.config.train.sample_every
    if every and step % every == 0:
      self(step, state)


# ----------------------------------------------------------------------------- sample / eval


def sample(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config.sample.num_samples` samples (.npz and a PNG grid) from the EMA params."""
  log_process_info()
  with Setup(config, workdir, kind=KIND, reads_data=False) as setup:
    s = setup.config.sample  # its sampler resolved ('auto')
    prompts = _use_prompts(setup)
    params, step = setup.restore_params("ema_params" if s.use_ema else "params")
    t0 = time.perf_counter()
    images = generate(
      setup,
      params,
      s.num_samples,
      jax.random.fold_in(setup.keys.stream("sample"), step),
      progress=True,
    )
  steps = setup.schedule.num_steps if s.sampler == "ddpm" else s.num_steps  # ddpm walks all T
  logging.info(
    "sampled %d images with %s (%d steps) in %.1fs",
    s.num_samples,
    s.sampler,
    steps,
    time.perf_counter() - t0,
  )
  out = os.path.join(setup.workdir, "samples", f"samples_{s.sampler}{s.num_steps}_step{step}")
  if jax.process_index() != 0:
    return out + ".npz"
  out = unique_stem(out, (".npz", ".png"))  # the two files take one suffix together
  extra = {}
  if prompts:  # the prompt of each sample
    extra["prompts"] = np.asarray([prompts[i % len(prompts)] for i in range(len(images))])
  npz = save_npz(out + ".npz", images=images, step=np.int64(step), **extra)
  with MetricWriter(setup.workdir) as writer:
    # the first grid_size in the PNG; signals [N, L, C]: every one as a WAV file too
    png = audio.save_grid(setup.config, out + ".png", images, writer=writer, step=step)
    writer.write_image(step, f"samples/{s.sampler}{s.num_steps}", png)
  logging.info("wrote %s and %s", npz, png)
  return npz


def _use_prompts(setup: Setup) -> list[str]:
  """A text model's `sample.prompts` (or `prompts_file`): sample i gets prompt i mod P, and
  `sample.negative_prompt` replaces the empty prompt as guidance's null condition. Returns
  the prompts ([] for a model without text or without prompts: one prompt per class)."""
  s = setup.config.sample
  if setup.cond_table is None or not (s.get("prompts") or s.get("prompts_file")):
    return []
  prompts, encode = prompts_of(s), setup.encode_text
  if encode is None:  # the digit captions' word tokenizer
    length = setup.config.text.max_length
    encode = lambda p: captions.tokenize_all(p, max_length=length)  # noqa: E731
  setup.cond_table = encode(prompts)
  setup.null_label = encode([s.negative_prompt])[0]
  logging.info("sampling %d prompt(s), negative prompt %r", len(prompts), s.negative_prompt)
  return prompts


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Held-out denoising loss over the eval split, and the bound in bits/dim on a subset.

  The bound is only computed in pixel space: it is defined for 8-bit pixels, not for
  continuous latents.
  """
  log_process_info()
  with Setup(config, workdir, kind=KIND) as setup:
    params, step = setup.restore_params("ema_params" if config.eval.use_ema else "params")
    results = _evaluate(setup, params)
  logging.info("eval at step %d: %s", step, results)
  write_scalars_once(setup.workdir, step, results)
  return results


def _evaluate(setup: Setup, params) -> dict[str, float]:
  cfg, repl, data_sh = setup.config, setup.repl, setup.data_sh
  eval_step = jax.jit(
    make_eval_step(
      setup.module,
      conditional=cfg.conditional,
      cond_fn=superres_cond_fn(cfg),
      label_fn=setup.caption_fn,
      **loss_kwargs(cfg),
    ),
    in_shardings=(repl, data_sh, repl, repl),
    out_shardings=repl,
  )
  eval_rng = setup.keys.stream("eval")
  loss_sum, count = 0.0, 0.0
  meter = setup.eval_progress(cfg.eval.batch_size)
  for i, batch in enumerate(setup.eval_iterator(cfg.eval.batch_size)):
    batch = sharding.to_global(batch, setup.mesh)
    out = jax.device_get(eval_step(params, batch, setup.schedule, jax.random.fold_in(eval_rng, i)))
    loss_sum += float(out["loss_sum"])
    count += float(out["count"])
    meter.update(1)
  meter.close()
  results = {"eval/loss": loss_sum / max(count, 1.0), "eval/examples": count}
  # The bound is the discrete DDPM's, on pixels; edm / flow report their own loss only.
  if setup.codec is None and cfg.objective == "ddpm" and cfg.eval.bound_examples:
    total, n = _bound(setup, params, cfg.eval.bound_examples)
    results["eval/bpd_bound"] = total / n
    results["eval/bound_examples"] = float(n)
  return results


BOUND_CHUNK = 50  # timesteps per jitted call of the bound: a progress line every chunk


def _bound(setup: Setup, params, num: int) -> tuple[float, int]:
  """Sum of the full T-step variational bound (bits/dim) over the first eval examples.

  Takes the first `num` examples of the eval split, rounded up to a multiple of the device
  count (the batch is sharded), and computes the T terms in chunks of BOUND_CHUNK
  timesteps (`losses.vlb_terms`, the same numbers as `losses.variational_bound` with the
  stream 'bound'), logging progress over the timesteps.

  Returns:
    (sum over the examples of their bound in bits/dim, number of examples).
  """
  cfg = setup.config
  n_dev = setup.mesh.devices.size
  batch = next(iter(setup.eval_iterator(math.ceil(num / n_dev) * n_dev)))
  batch = sharding.to_global(batch, setup.mesh)
  repl, data_sh = setup.repl, setup.data_sh
  kwargs = dict(prediction=cfg.diffusion.prediction, variance=cfg.diffusion.variance)

  def chunk(params, batch, rng, ts, valid):
    model_fn = make_model_fn(setup.module, params, train=False)
    cond = batch["label"] if cfg.conditional else None
    if setup.caption_fn is not None:  # each example's caption, drawn once from the stream
      cond = setup.caption_fn(cond, jax.random.fold_in(rng, 2))
    terms = losses.vlb_terms(setup.schedule, model_fn, batch["image"], rng, ts, cond=cond, **kwargs)
    return jnp.sum(terms * valid * batch["mask"].astype(jnp.float32)[:, None])

  chunk_fn = jax.jit(chunk, in_shardings=(repl, data_sh, repl, repl, repl), out_shardings=repl)
  rng = setup.keys.stream("bound")
  mask = batch["mask"].astype(jnp.float32)
  total = float(jnp.sum(losses.prior_bpd(setup.schedule, batch["image"]) * mask))
  num_steps = setup.schedule.num_steps
  meter = Progress(num_steps, "bound timesteps")
  for t0 in range(0, num_steps, BOUND_CHUNK):
    # One compiled shape: the last chunk repeats timestep T-1 with weight 0.
    ts = np.minimum(np.arange(t0, t0 + BOUND_CHUNK), num_steps - 1).astype(np.int32)
    valid = (np.arange(t0, t0 + BOUND_CHUNK) < num_steps).astype(np.float32)
    total += float(chunk_fn(params, batch, rng, ts, valid))
    meter.update(int(valid.sum()))
  meter.close()
  return float(total), int(jax.device_get(jnp.sum(mask)))
