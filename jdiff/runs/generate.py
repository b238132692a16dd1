"""Sampling a `Setup`'s model: the sample function of `config.sample`, the noise and labels of
each batch, and one `generate` for every mode (a leaf of runs/: it imports no mode).

Batch k of the global batch B draws its starting noise from the stream 'x_T' and the
sampler's randomness from the stream 'sampler' of `fold_in(rng, k)`; its labels are the
global sample indices modulo the class count. Noise, sampling, decoding (latent diffusion)
and an optional `post` function (a feature network) run in one jitted call, sharded over
every device of every process, so `--mode=sample`, the training grids, the FID samples and
the reflow teacher all draw the same rows for the same rng.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.runs import distilled, objectives
from jdiff.runs.sample_options import sample_options
from jdiff.samplers.registry import make_sample_fn
from jdiff.training import sharding
from jdiff.training.progress import Progress
from jdiff.training.rng import stream

Array = jax.Array


def sample_fn(setup, **overrides) -> Callable:
  """The pure `sample_fn(params, x_T, rng, labels, **extra)` of `config.sample`, with
  `overrides` of its `make_sample_fn` options (e.g. sampler, num_steps, strength)."""
  c = setup.config
  record = distilled.sample_overrides(setup.workdir, setup.schedule, c.sample.sampler)
  opts = {**sample_options(c.sample), **objectives.sample_overrides(c), **record, **overrides}
  return make_sample_fn(
    setup.module,
    setup.schedule,
    prediction=objectives.prediction_of(c),
    variance=c.diffusion.variance,
    null_label=setup.null_label,
    **opts,
  )


def global_batch(setup, batch: int) -> int:
  """`batch` rounded down to a multiple of the device count (at least one row per device)."""
  n_dev = setup.mesh.devices.size
  return max(n_dev, batch // n_dev * n_dev)


def batch_inputs(setup, rng: Array, k, batch: int) -> tuple[Array, Array, Array]:
  """Batch k's (x_T [B, H, W, C], labels [B], global indices [B]), batch-sharded.

  A text model's labels are prompts: row `index % P` of `setup.cond_table` [P, L] (token
  ids; by default the prompt of each class, "a handwritten seven").
  """
  key = jax.random.fold_in(rng, k)
  x_T = jax.random.normal(stream(key, "x_T"), (batch, *setup.image_shape), jnp.float32)
  index = k * batch + jnp.arange(batch, dtype=jnp.int32)
  labels = index % (setup.num_classes or 1)
  if getattr(setup, "cond_table", None) is not None:
    table = jnp.asarray(setup.cond_table)
    labels = table[index % table.shape[0]]
  constrain = lambda x: jax.lax.with_sharding_constraint(x, setup.data_sh)  # noqa: E731
  return constrain(x_T), constrain(labels), constrain(index)


def generate_batches(
  setup,
  params,
  num: int,
  rng: Array,
  *,
  post: Callable | None = None,
  post_params=None,
  progress: str = "",
  **overrides,
) -> Iterator:
  """Yields batch after batch of samples of `params` until `num` rows are drawn.

  Args:
    setup: a diffusion `jdiff.runs.setup.Setup`.
    params: the model's parameters (gathered once if FSDP-sharded).
    num: how many samples; the last batch is full size (rows past `num` are extra).
    rng: the key whose batch k is `fold_in(rng, k)`.
    post: None, or `post(post_params, images [B, H, W, C]) -> (a, b)` run in the same
      jitted call (a feature network).
    progress: a progress meter's noun ('' for none).
    **overrides: `make_sample_fn` options over `config.sample`'s.

  Yields:
    Without `post`: the batch's images [B, H, W, C] in [-1, 1] (pixels; latents decoded),
    replicated. With `post`: (a, b, global indices [B]), batch-sharded.
  """
  batch = global_batch(setup, setup.config.sample.batch_size)
  sample = sample_fn(setup, **overrides)
  decode = None
  if setup.codec is not None:
    from jdiff.data import latents  # pylint: disable=g-import-not-at-top

    decode = lambda z: latents.decode(setup.codec, z)  # noqa: E731

  def fn(params, post_params, rng, k):
    x_T, labels, index = batch_inputs(setup, rng, k, batch)
    x0 = sample(params, x_T, stream(jax.random.fold_in(rng, k), "sampler"), labels)
    if decode is not None:
      x0 = decode(x0)
    if post is None:
      return x0
    return (*post(post_params, x0), index)

  out_sh = setup.repl if post is None else setup.data_sh
  jfn = jax.jit(fn, in_shardings=(setup.repl,) * 4, out_shardings=out_sh)
  params = sharding.replicate(params, setup.mesh)  # FSDP-sharded EMA: gathered once
  meter = Progress(num, progress) if progress else None
  for k in range(math.ceil(num / batch)):
    yield jfn(params, post_params, rng, jnp.int32(k))
    if meter is not None:
      meter.update(min(batch, num - k * batch))
  if meter is not None:
    meter.close()


def generate(
  setup, params, num: int, rng: Array, *, progress: bool = False, **overrides
) -> np.ndarray:
  """`num` samples [num, H, W, C] in [-1, 1] of `params` (`generate_batches`' rows, on the
  host); with `progress`, logs done/total, rate and ETA (process 0)."""
  batches = generate_batches(
    setup, params, num, rng, progress="samples" if progress else "", **overrides
  )
  return np.concatenate([np.asarray(jax.device_get(x)) for x in batches])[:num]
