"""`--mode=distill`: few-step students of a trained DDPM teacher, as ordinary training runs.

  method                student                                  sampled with
  progressive           [PD] rounds N = steps/2, ..., final_steps:  DDIM on its own grid
                        each an ordinary run in <workdir>/steps_<N>   (`distill.progressive`)
                        whose teacher is the previous round
  consistency           [CM] Alg. 2, one run in <workdir>: one       [CM] Alg. 1
                        teacher ODE step between adjacent levels      ('consistency')
  consistency_training  [CM] Alg. 3 with [iCT]'s curriculum, started  [CM] Alg. 1
                        from the teacher (consistency tuning)

Every run is the training skeleton (`runs.train`): it checkpoints, resumes bit-exactly (the
step is the clock; the teacher is read from its workdir), logs metrics and TensorBoard and
writes sample grids; a round that finished is skipped on a rerun. The student keeps the
teacher's network, schedule and prediction; its consistency function is
`distill.sampling.denoiser_consistency_fn` of its denoiser on sigma(t = 0) .. distill.sigma_max.
Each workdir records what it is (`runs.distilled`), so sample / fid / edit pick its sampler.

References:
  [PD] Salimans, Ho 2022, Alg. 2. [CM] Song et al. 2023, Algs. 1-3. [iCT] Song, Dhariwal 2024.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from jdiff import continuous
from jdiff.distill import consistency, progressive
from jdiff.distill.sampling import denoiser_consistency_fn
from jdiff.models.bridge import make_model_fn
from jdiff.runs import distilled, stored_config
from jdiff.runs.diffusion import SampleGrids, log_checksum
from jdiff.runs.setup import Setup, run_training
from jdiff.runs.train import MeanLogger, TrainMode, train
from jdiff.runs.validate_modes import check_teacher
from jdiff.training import sharding
from jdiff.training.checkpoint import Checkpointer
from jdiff.training.lock import lock_if_free
from jdiff.training.state import TrainState, param_count
from jdiff.training.step import apply_gradients

KIND = "diffusion"


def distill(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
  """Runs `config.distill.method` into `workdir`; returns the last run's final state.

  Raises:
    ValueError: `config.distill.teacher_workdir` is not a DDPM workdir with a checkpoint.
  """
  check_teacher(config)  # before anything is written
  if config.distill.method != "progressive":
    return run_training(config, workdir, KIND, _train)
  state, teacher, n = None, config.distill.teacher_workdir, config.distill.steps
  while n > config.distill.final_steps:
    n //= 2
    round_dir = os.path.join(workdir, f"steps_{n:04d}")
    record = distilled.read_record(round_dir) or {}
    if "finished_step" not in record:
      state = run_training(round_config(config, teacher, n), round_dir, KIND, _train)
      if "finished_step" not in (distilled.read_record(round_dir) or {}):
        logging.warning("round N=%d stopped before its last step; rerun to resume", n)
        return state
    logging.info("progressive distillation: the %d-step student is in %s", n, round_dir)
    teacher = round_dir
  return state


def round_config(config, teacher_workdir: str, num_steps: int):
  """The config of the PD round whose student takes `num_steps` steps: `train.num_steps`
  (the whole distillation's) shared equally by the rounds, steps / 2 down to final_steps."""
  c = config.copy_and_resolve_references()
  rounds = distilled.pd_rounds(config.distill)
  with c.unlocked():
    c.distill.teacher_workdir = os.path.abspath(teacher_workdir)
    c.distill.round_steps = num_steps
    c.train.num_steps = config.train.num_steps // rounds
  c.lock()
  return c


def load_teacher(setup: Setup, workdir: str):
  """(EMA params, prediction) of the teacher in `workdir`, on the student's layout.

  Raises:
    ValueError: the teacher's network or schedule differs from the student's (names the key).
    FileNotFoundError: the teacher has no checkpoint.
  """
  mine = stored_config.flatten(setup.config)
  stored = stored_config.read(workdir, mine)  # flat: {'model.ch': 32, ...}
  for key in sorted(mine):
    same = ("model.", "diffusion.schedule", "diffusion.num_steps", "diffusion.zero_terminal_snr")
    if key.startswith(same + ("conditional",)) and stored.get(key) != mine[key]:
      raise ValueError(
        f"config.distill.teacher_workdir={workdir!r}: the teacher's config.{key}="
        f"{stored.get(key)!r} differs from the student's {mine[key]!r} (the student starts "
        "from the teacher's network and schedule)"
      )
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), guard=lambda: lock_if_free(workdir))
  with ckpt:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(
        f"config.distill.teacher_workdir={workdir!r} has no checkpoint: train the teacher first"
      )
    target = {"ema_params": setup.abstract_state().ema_params}
    restored, step = ckpt.restore_partial(target)
  logging.info("teacher: %s at step %d", workdir, step)
  return restored["ema_params"], stored.get("diffusion.prediction", "eps")


def make_loss(setup: Setup, teacher_prediction: str):
  """`loss(params, target_params, teacher_params, x0, rng, step) -> [B]` of the method."""
  cfg, module, schedule = setup.config, setup.module, setup.schedule
  d, prediction = cfg.distill, cfg.diffusion.prediction
  net = lambda p: make_model_fn(module, p, train=False)  # noqa: E731
  # The teacher as it samples: its x0_hat clipped to the data range (sample.clip_x0).
  clip_x0 = cfg.sample.clip_x0 if cfg.sample.clip_x0 > 0 else None
  if d.method == "progressive":

    def pd(params, target_params, teacher_params, x0, rng, step):
      del target_params, step
      return progressive.pd_loss(
        schedule, net(params), net(teacher_params), x0, rng, num_steps=d.round_steps,
        student_prediction=prediction, teacher_prediction=teacher_prediction,
        weighting=d.pd_weighting, clip_x0=clip_x0,
      )  # fmt: skip

    return pd
  sigma_min = float(schedule.sigma_min_max()[0])

  def denoiser(p, pred, clip=None):
    return continuous.make_denoiser(schedule, net(p), prediction=pred, clip_x0=clip)

  def f_apply(params, x, sigma):
    f = denoiser_consistency_fn(
      denoiser(params, prediction), sigma_min=sigma_min, sigma_data=d.sigma_data
    )
    return f(x, sigma)

  levels = dict(sigma_min=sigma_min, sigma_max=d.sigma_max, metric=d.metric)
  levels |= dict(weighting=d.loss_weighting, level_sampling=d.level_sampling)

  def cm(params, target_params, teacher_params, x0, rng, step):
    if d.method == "consistency":
      return consistency.consistency_distillation_loss(
        f_apply, params, target_params, denoiser(teacher_params, teacher_prediction, clip_x0),
        x0, rng,
        num_levels=d.num_levels, solver=d.solver, **levels,
      )  # fmt: skip
    return consistency.consistency_training_loss(
      f_apply, params, target_params, x0, rng, step=step, total_steps=cfg.train.num_steps,
      s0=d.s0, s1=d.s1, **levels,
    )  # fmt: skip

  return cm


def make_distill_step(loss, optimizer, *, ema_decay: float, ema_warmup: bool, target: str):
  """`step(state, images [B, H, W, C], teacher_params, rng) -> (state, metrics)`: one update
  of the mean `loss` at rng = fold_in(rng, state.step); the target network theta^- is the
  online params ('online', [iCT]) or their EMA ('ema', [CM])."""

  def step(state: TrainState, images, teacher_params, rng):
    rng = jax.random.fold_in(rng, state.step)
    target_params = state.ema_params if target == "ema" else state.params

    def mean_loss(params):
      return jnp.mean(loss(params, target_params, teacher_params, images, rng, state.step))

    value, grads = jax.value_and_grad(mean_loss)(state.params)
    state = apply_gradients(state, grads, optimizer, ema_decay=ema_decay, ema_warmup=ema_warmup)
    return state, {"loss": value, "grad_norm": optax.tree.norm(grads)}

  return step


def record_of(config) -> dict:
  """The workdir's `distilled.json`: what it holds and from which teacher."""
  d = config.distill
  record = {"method": d.method, "teacher_workdir": os.path.abspath(d.teacher_workdir)}
  if d.method == "progressive":
    record["num_steps"] = int(d.round_steps)
  return record


def _train(setup: Setup, writer) -> TrainState:
  cfg, d = setup.config, setup.config.distill
  if d.method == "progressive" and not d.round_steps:
    raise ValueError("config.distill.round_steps=0: progressive rounds are run by distill()")
  teacher_params, teacher_prediction = load_teacher(setup, d.teacher_workdir)
  record = record_of(cfg)
  distilled.write_record(setup.workdir, record)  # before the first grid samples through it

  def init(state):  # the student starts from the teacher (a copy: the step donates its state)
    p = lambda: jax.tree.map(jnp.copy, teacher_params)  # noqa: E731
    return state.replace(params=p(), ema_params=p())

  def make_step(state, train_iter):
    state_sh = setup.state_shardings(state)
    step = jax.jit(
      make_distill_step(
        make_loss(setup, teacher_prediction),
        setup.optimizer,
        ema_decay=cfg.ema_decay,
        ema_warmup=cfg.ema_warmup,
        target=d.target,
      ),  # fmt: skip
      in_shardings=(state_sh, setup.data_sh, setup.repl, setup.repl),
      out_shardings=(state_sh, setup.repl),
      donate_argnums=(0,),
    )

    def step_fn(state):
      images = sharding.to_global(next(train_iter)["image"], setup.mesh)
      return step(state, images, teacher_params, setup.keys.train)

    return step_fn

  grids = SampleGrids(setup, writer)

  def finish(step, state):
    grids(step, state)
    distilled.write_record(setup.workdir, record | {"finished_step": step})

  mode = TrainMode(
    describe=lambda s: f"distill {d.method}: student of {param_count(s.params)} parameters",
    make_step=make_step,
    logger=MeanLogger(writer, cfg.train.num_steps),
    periodic=grids.periodic,
    finish=finish,
    after=log_checksum,
    init=init,
  )
  return train(setup, writer, mode)
