"""Sample quality: `--mode=fid`, `--mode=fid_ref`, and the score at the end of training.

Samples are generated sharded over every device of every process: batch k of the global
batch B draws its noise from the stream 'x_T' and the sampler's randomness from the stream
'sampler' of `fold_in(rng, k)` inside one jitted function that also runs the feature
network, so every device generates and featurises its own rows (the same rows
`generate.generate` draws for that rng). Each process folds the rows it holds into
float64 running statistics (`jdiff.metrics.streaming`); the processes' statistics are
summed at the end. Only `config.eval.pr_samples` feature rows are kept, for precision /
recall and KID.

The reference statistics (`config.eval.ref_stats`, or a cache file beside the dataset
keyed by dataset, split, size and feature network) hold the reference split's mean and
covariance, a feature subset, and the scores of the held-out split (`config.data.
eval_split`) against them: what real data score.
"""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jdiff import metrics
from jdiff.data import pipeline
from jdiff.data.sources import stored_name
from jdiff.runs import audio, feature_nets, generate
from jdiff.runs.setup import Setup, log_process_info
from jdiff.training.progress import Progress
from jdiff.training.sharding import DATA_AXIS
from jdiff.training.writers import MetricWriter

KIND = "diffusion"


# ----------------------------------------------------------------------------- collection


class Collector:
  """Folds (features, probs, index) of the rows this process holds into statistics.

  index is the global sample index (-1 for padding); rows with index < keep are kept. With
  `label_classes` K (a model conditioned on class index mod K whose classes the feature
  network's are), it also counts the rows the network classifies as their class.
  """

  def __init__(
    self,
    net: feature_nets.FeatureNet,
    num: int,
    *,
    splits: int,
    keep: int,
    label_classes: int | None = None,
  ):
    self.num, self.splits, self.keep = num, splits, keep
    self.stats = metrics.init_stats(net.dim)
    self.scores = metrics.init_scores(net.num_classes, splits)
    self.kept_index, self.kept = [], []
    self.label_classes, self.hits = label_classes, 0

  def add(self, feats: jax.Array, probs: jax.Array, index: jax.Array) -> None:
    for f, p, i in zip(*(_local_rows(a) for a in (feats, probs, index))):
      valid = (i >= 0) & (i < self.num)
      self.stats = metrics.accumulate(self.stats, f, valid)
      split = metrics.streaming.split_of(np.where(valid, i, 0), self.num, self.splits)
      self.scores = metrics.accumulate_scores(self.scores, p, split, valid)
      if self.label_classes:
        pred = np.argmax(np.asarray(p), axis=-1)
        self.hits += int(np.sum(valid & (pred == i % self.label_classes)))
      k = valid & (i < self.keep)
      if k.any():
        self.kept_index.append(i[k])
        self.kept.append(np.asarray(f[k], np.float32))

  def label_accuracy(self) -> float | None:
    """The share of samples classified as the class they were conditioned on (None if not
    counted), over all processes."""
    if not self.label_classes:
      return None
    hits = np.asarray([self.hits], np.int64)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      hits = np.sum(multihost_utils.process_allgather(hits), 0)
    return float(hits[0]) / self.num

  def gather(self):
    """(FeatureStats, ScoreStats, kept features [K, D] in index order) over all processes."""
    d = self.stats.total.shape[0]
    idx = np.concatenate(self.kept_index) if self.kept else np.zeros((0,), np.int64)
    feats = np.concatenate(self.kept) if self.kept else np.zeros((0, d), np.float32)
    stats, scores = self.stats, self.scores
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      pad = self.keep - len(idx)
      idx = np.concatenate([idx, -np.ones(pad, np.int64)])
      feats = np.concatenate([feats, np.zeros((pad, d), np.float32)])
      allg = multihost_utils.process_allgather
      stats = metrics.FeatureStats(*(np.sum(allg(x), 0) for x in stats))
      scores = metrics.ScoreStats(*(np.sum(allg(x), 0) for x in scores))
      idx, feats = allg(idx).reshape(-1), allg(feats).reshape(-1, d)
      feats, idx = feats[idx >= 0], idx[idx >= 0]
    return stats, scores, feats[np.argsort(idx, kind="stable")]


def _local_rows(x: jax.Array):
  """This process's shards of a batch-sharded array, in order of their row offsets."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return [np.asarray(s.data) for s in shards]


def summarize(
  collector: Collector, ref: metrics.reference.Reference, k: int, *, save: str = ""
) -> dict:
  """FD, IS (mean, std), and with kept features on both sides precision, recall and KID.

  `save`: also write the samples' statistics there (a jdiff reference file; process 0).
  """
  stats, scores, feats = collector.gather()
  mu, sigma = metrics.mean_cov(stats)
  if ref.mu.shape != mu.shape:
    raise ValueError(
      f"reference statistics have {ref.mu.shape[0]} features, the feature network "
      f"{mu.shape[0]}: they come from another network"
    )
  if save and jax.process_index() == 0:
    metrics.save_reference(
      save, mu, sigma, features=feats, count=int(stats.count), feature_net=ref.feature_net
    )
  out = {"fd": metrics.frechet_distance(mu, sigma, ref.mu, ref.sigma)}
  out["is"], out["is_std"] = metrics.score_from_stats(scores)
  out["num_samples"] = float(stats.count)
  if ref.features is not None and min(len(feats), len(ref.features)) > k:
    out["precision"], out["recall"] = metrics.precision_recall(ref.features, feats, k=k)
    out["kid"], out["kid_std"] = metrics.kid(ref.features, feats)
  return out


# ----------------------------------------------------------------------------- featurising


def _feature_fn(setup: Setup, net: feature_nets.FeatureNet):
  """jit of (net params, {'image', 'index'} batch-sharded) -> (feats, probs, index)."""

  def fn(net_params, batch):
    feats, probs = net.apply(net_params, batch["image"])
    return feats, probs, batch["index"]

  return jax.jit(fn, in_shardings=(setup.repl, setup.data_sh), out_shardings=setup.data_sh)


def score_images(setup, net, images_fn, num: int, *, batch: int, what: str) -> Collector:
  """Streams `num` images through `net`: `images_fn(rows)` returns the images [len(rows),
  H, W, C] in [-1, 1] of the given global rows; each process reads only its own rows."""
  c = setup.config.eval
  batch = generate.global_batch(setup, batch)
  p, n_proc = jax.process_index(), jax.process_count()
  local = batch // n_proc
  fn = _feature_fn(setup, net)
  col = Collector(net, num, splits=c.is_splits, keep=c.pr_samples)
  with Progress(num, what) as progress:
    for k in range(math.ceil(num / batch)):
      rows = np.arange(k * batch + p * local, k * batch + (p + 1) * local)
      valid = rows < num
      images = images_fn(rows[valid])
      pad = np.zeros((local - len(images), *images.shape[1:]), np.float32)
      local_batch = {
        "image": np.concatenate([np.asarray(images, np.float32), pad]),
        "index": np.where(valid, rows, -1).astype(np.int32),
      }
      col.add(*fn(net.params, _to_global(local_batch, setup.mesh)))
      progress.update(int(valid.sum()) * n_proc)
  return col


def _to_global(local_batch, mesh):
  sh = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, x), local_batch)


def split_images(config, split: str):
  """(count, images_fn) of a tfds split of config.data, in [-1, 1]."""
  d = config.data
  source = pipeline.load_source(
    stored_name(d.name, d.image_size or None), split=split, data_dir=d.data_dir or None
  )
  prep = pipeline._Preprocess(image_size=d.image_size or None)  # pylint: disable=protected-access

  def images_fn(rows):
    return (
      np.stack([prep.map(source[int(r)])["image"] for r in rows])
      if len(rows)
      else (np.zeros((0, *prep.map(source[0])["image"].shape), np.float32))
    )

  return len(source), images_fn


def npz_images(path: str):
  """(count, images_fn) of a samples `.npz`: jdiff's `images` (float in [-1, 1]) or
  guided-diffusion's / the usual `arr_0` (uint8 [N, H, W, C] in 0..255)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.eval.samples_npz={path!r}: file not found")
  f = np.load(path, mmap_mode="r")
  key = "images" if "images" in f.files else "arr_0" if "arr_0" in f.files else None
  if key is None:
    raise ValueError(f"{path}: expected an 'images' or 'arr_0' array, found {f.files}")
  arr = f[key]
  if arr.ndim != 4:
    raise ValueError(f"{path}: {key} must be [N, H, W, C], got shape {arr.shape}")

  def images_fn(rows):
    x = np.asarray(arr[rows])
    return x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)

  return int(arr.shape[0]), images_fn


def generate_features(setup: Setup, params, net, num: int, rng, **overrides) -> Collector:
  """Generates `num` samples sharded over all devices and processes (the rows of
  `generate.generate` for `rng`), featurising them in the same jitted call."""
  cfg = setup.config
  k = setup.num_classes if setup.num_classes == net.num_classes else None
  col = Collector(net, num, splits=cfg.eval.is_splits, keep=cfg.eval.pr_samples, label_classes=k)
  batches = generate.generate_batches(
    setup, params, num, rng, post=net.apply, post_params=net.params, progress="samples",
    **overrides,
  )  # fmt: skip
  for out in batches:
    col.add(*out)
  return col


# ----------------------------------------------------------------------------- references


def reference_path(config, net: feature_nets.FeatureNet) -> str:
  """config.eval.ref_stats, or the cache file beside the dataset."""
  if config.eval.ref_stats:
    return config.eval.ref_stats
  d = config.data
  name = stored_name(d.name, d.image_size or None).replace("/", "_")
  file = f"{name}_{config.eval.ref_split}_{d.image_size or 'native'}_{net.name}.npz"
  return os.path.join(feature_nets.data_root(d.data_dir), feature_nets.CACHE_DIR, "refs", file)


def compute_reference(config, setup, net) -> str:
  """Scores config.eval.ref_split, and the held-out split against it; writes the `.npz`."""
  c = config.eval
  path = reference_path(config, net)
  num, images_fn = split_images(config, c.ref_split)
  col = score_images(setup, net, images_fn, num, batch=c.batch_size, what=f"{c.ref_split} images")
  stats, _, feats = col.gather()
  mu, sigma = metrics.mean_cov(stats)
  ref = metrics.reference.Reference(mu, sigma, feats, None, net.name, int(stats.count))
  held = {}
  if config.data.eval_split != c.ref_split:
    num_h, images_h = split_images(config, config.data.eval_split)
    col_h = score_images(setup, net, images_h, num_h, batch=c.batch_size, what="held-out images")
    held = summarize(col_h, ref, c.pr_k)
  if jax.process_index() == 0:
    metrics.save_reference(
      path,
      mu,
      sigma,
      features=feats,
      count=int(stats.count),
      feature_net=net.name,
      extra={f"heldout_{k}": v for k, v in held.items()},
    )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("jdiff: reference statistics written")
  logging.info(
    "reference statistics of %s/%s (%d images): %s; held-out %s: %s",
    config.data.name,
    c.ref_split,
    int(stats.count),
    path,
    config.data.eval_split,
    held,
  )
  return path


def load_or_compute_reference(config, setup, net):
  """The reference statistics (computing and caching the default file if absent)."""
  path = reference_path(config, net)
  if not os.path.exists(path):
    if config.eval.ref_stats:
      raise FileNotFoundError(
        f"config.eval.ref_stats={path!r} does not exist; write it with --mode=fid_ref "
        "or point to pytorch-fid / guided-diffusion statistics"
      )
    compute_reference(config, setup, net)
  ref = metrics.load_reference(path, feature_net=net.name)
  if not config.eval.ref_stats and _kept_too_few(ref, config.eval.pr_samples):
    logging.info("%s keeps fewer than eval.pr_samples feature rows: recomputing it", path)
    compute_reference(config, setup, net)
    ref = metrics.load_reference(path, feature_net=net.name)
  if ref.mu is None:  # a guided-diffusion batch of images without statistics
    col = score_images(
      setup,
      net,
      lambda r: ref.images[r].astype(np.float32) / 127.5 - 1.0,
      len(ref.images),
      batch=config.eval.batch_size,
      what="reference images",
    )
    stats, _, feats = col.gather()
    ref = ref._replace(
      mu=metrics.mean_cov(stats)[0], sigma=metrics.mean_cov(stats)[1], features=feats
    )
  return ref, path


def _kept_too_few(ref: metrics.reference.Reference, pr_samples: int) -> bool:
  """Whether the cached reference keeps fewer feature rows than `pr_samples` asks for
  (it was written under a smaller eval.pr_samples; the cache key leaves that out)."""
  kept = 0 if ref.features is None else len(ref.features)
  return kept < min(pr_samples, ref.count or 0)


# ----------------------------------------------------------------------------- modes


def quality(setup: Setup, params, num: int, rng, *, writer: MetricWriter, step: int) -> dict:
  """Scores `num` samples of `params` with config.eval's feature network; writes
  `quality/*` scalars (and the held-out real data's `quality/heldout_*`) at `step`."""
  cfg = setup.config
  net = feature_nets.load_feature_net(cfg, setup.pixel_shape)
  ref, path = load_or_compute_reference(cfg, setup, net)
  t0 = time.perf_counter()
  col = generate_features(setup, params, net, num, rng)
  s = cfg.sample
  stats_path = os.path.join(
    setup.workdir, "quality", f"stats_{s.sampler}{s.num_steps}_n{num}_step{step}.npz"
  )
  results = summarize(col, ref, cfg.eval.pr_k, save=stats_path)
  accuracy = col.label_accuracy()  # a conditional model: samples that are their class
  if accuracy is not None:
    results["label_accuracy"] = accuracy
  if len(setup.pixel_shape) == 2:  # 1-D signals: the same rows again, for their FFT pitch
    results.update(audio.pitch_scores(setup, generate.generate(setup, params, num, rng)))
  results["sec"] = time.perf_counter() - t0
  results.update(net.info)
  results.update(metrics.reference.heldout_scores(path))
  logging.info(
    "sample quality (%d samples, %s %d steps; %s vs %s): FD %.4f  IS %.4f +- %.4f%s; "
    "statistics in %s",
    num,
    s.sampler,
    s.num_steps,
    net.name,
    os.path.basename(path),
    results["fd"],
    results["is"],
    results["is_std"],
    _extra(results),
    stats_path,
  )
  writer.write_scalars(step, {f"quality/{k}": v for k, v in results.items()})
  return results


def _extra(r: dict) -> str:
  keys = (
    "precision",
    "recall",
    "kid",
    "label_accuracy",
    "pitch_accuracy",
    "heldout_pitch_accuracy",
  )
  parts = [f"  {k} {r[k]:.4f}" for k in keys if k in r]
  if "heldout_fd" in r:
    parts.append(f"  (real held-out data: FD {r['heldout_fd']:.4f}, IS {r['heldout_is']:.4f})")
  return "".join(parts)


def fid(config, workdir: str) -> dict:
  """--mode=fid: scores config.eval.num_samples samples of the latest checkpoint (EMA per
  config.eval.use_ema), or the `.npz` config.eval.samples_npz; writes metrics."""
  log_process_info()
  c = config.eval
  with (
    Setup(config, workdir, kind=KIND, reads_data=False) as setup,
    MetricWriter(setup.workdir) as writer,
  ):
    if c.samples_npz:
      net = feature_nets.load_feature_net(config, setup.pixel_shape)
      ref, path = load_or_compute_reference(config, setup, net)
      num, images_fn = npz_images(c.samples_npz)
      col = score_images(setup, net, images_fn, num, batch=config.sample.batch_size, what="images")
      results = {**summarize(col, ref, c.pr_k), **net.info}
      logging.info("scores of %s (%s vs %s): %s", c.samples_npz, net.name, path, results)
      writer.write_scalars(0, {f"quality/{k}": v for k, v in results.items()})
      return results
    params, step = setup.restore_params("ema_params" if c.use_ema else "params")
    rng = jax.random.fold_in(setup.keys.stream("fid"), step)
    return quality(setup, params, c.num_samples, rng, writer=writer, step=step)


def fid_ref(config, workdir: str) -> str:
  """--mode=fid_ref: computes and caches the reference statistics of config.eval.ref_split."""
  log_process_info()
  with Setup(config, workdir, kind=KIND) as setup:
    net = feature_nets.load_feature_net(config, setup.pixel_shape)
    return compute_reference(config, setup, net)
