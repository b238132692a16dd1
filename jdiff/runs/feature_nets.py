"""The feature networks of sample-quality evaluation: FID Inception, or the digits classifier.

`load_feature_net(config, image_shape)` returns a `FeatureNet` whose pure `apply(params,
images [B, H, W, C] in [-1, 1], or uint8)` gives (features [B, D], class probabilities
[B, K]). Every image, real or generated, enters it through `to_pixels`: the network sees
the 8-bit image a PNG of it holds, as pytorch-fid (on PNGs) and ADM's evaluator (on uint8
`.npz`) see samples. The networks:

* 'inception': pytorch-fid's FID InceptionV3 (pool3, softmax of the 1008 logits pool3 @ W),
  weights from `config.eval.inception_weights` (jdiff.models.inception_convert), its
  convolutions per `config.eval.inception_conv_impl` ('auto': Winograd on XLA:CPU, XLA's
  convolutions elsewhere);
* 'digits': `SmallClassifier` trained by jdiff on the dataset's train split (penultimate
  features, softmax), cached beside the dataset under `jdiff_feature_nets/`, the file name
  keyed by a hash of its settings; its held-out (test split) accuracy is stored with it;
* 'audio': for 1-D signals (the embedded jdiff_notes), the same training and cache with
  `jdiff.metrics.audio.SpectrogramClassifier` (SmallClassifier on the log spectrogram), the
  signals taken to the 16-bit grid a WAV file holds (`to_pcm16_grid`) instead of `to_pixels`;
* 'auto': 'digits' for the embedded jdiff_digits dataset, 'audio' for jdiff_notes, else
  'inception'.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jdiff.data import pipeline
from jdiff.data.digits import NAME as DIGITS_NAME
from jdiff.data.notes import NAME as NOTES_NAME
from jdiff.metrics.audio import SpectrogramClassifier
from jdiff.models.classifier import SmallClassifier
from jdiff.models.inception import NUM_FEATURES, NUM_LOGITS, InceptionV3
from jdiff.models.inception_convert import flatten, load_inception_params, unflatten
from jdiff.ops.winograd import resolve_conv_impl
from jdiff.training.writers import atomic_write

# Settings of the digits classifier: part of its cache key (change one, retrain).
DIGITS_CLASSIFIER = dict(width=32, features=128, batch_size=128, lr=2e-3, seed=0)
AUDIO_CLASSIFIER = dict(width=16, features=128, batch_size=64, lr=2e-3, seed=0, num_classes=12)
CACHE_DIR = "jdiff_feature_nets"


class FeatureNet(NamedTuple):
  """name: identifies the network and its weights (stored with reference statistics);
  apply: pure (params, images) -> (features [B, dim], probs [B, num_classes]);
  info: scalars to report with its scores (e.g. the classifier's held-out accuracy)."""

  name: str
  apply: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
  params: Any
  dim: int
  num_classes: int
  info: dict


def resolve_feature_net(config) -> str:
  name = config.eval.feature_net
  if name == "auto":
    base = config.data.name.split("/")[0]
    return {DIGITS_NAME: "digits", NOTES_NAME: "audio"}.get(base, "inception")
  return name


def to_pixels(images: jax.Array) -> jax.Array:
  """Images [B, H, W, C] as a feature network sees them: float32 on the 8-bit grid.

  Float images in [-1, 1] are clipped and rounded to the levels k = round(127.5 (x + 1))
  in 0..255 that jdiff's PNGs store (`jdiff.training.writers.image_grid`; ADM's sampling
  scripts truncate instead), uint8 images are taken as k. Both map to k * 2/255 - 1, as
  the data pipeline maps uint8 pixels, so real images come through bit-identical and a
  sample scores what it scores written to a PNG and read back. NaN stays NaN.
  """
  x = jnp.asarray(images)
  if x.dtype == jnp.uint8:
    k = x.astype(jnp.float32)
  else:
    k = jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0.0, 255.0)
  return k * jnp.float32(2 / 255) - jnp.float32(1)


def inception_conv_impl(config) -> str:
  """config.eval.inception_conv_impl with 'auto' resolved for this process's backend."""
  return resolve_conv_impl(config.eval.inception_conv_impl, jnp.float32)


def load_feature_net(config, image_shape) -> FeatureNet:
  """The feature network of `config.eval` for images of shape `image_shape` (H, W, C);
  its `apply` takes the images through `to_pixels` first."""
  if resolve_feature_net(config) == "inception":
    net = _inception(config)
  else:
    net = digits_classifier(config, image_shape)
  apply, quantize = net.apply, to_pcm16_grid if len(image_shape) == 2 else to_pixels
  return net._replace(apply=lambda p, images: apply(p, quantize(images)))


def to_pcm16_grid(signals: jax.Array) -> jax.Array:
  """Signals [B, L, C] as the audio feature network sees them: clipped to [-1, 1) and rounded
  to the 16-bit grid k / 32768 a WAV file stores (`jdiff.audio_io`): real data, stored as
  int16, come through bit-identical."""
  k = jnp.clip(jnp.round(jnp.asarray(signals, jnp.float32) * 32768.0), -32768.0, 32767.0)
  return k / jnp.float32(32768)


def _inception(config) -> FeatureNet:
  params = load_inception_params(config.eval.inception_weights)
  impl = inception_conv_impl(config)
  logging.info(
    "FID Inception: %s convolutions (config.eval.inception_conv_impl=%s, backend %s)",
    impl,
    config.eval.inception_conv_impl,
    jax.default_backend(),
  )
  module = InceptionV3(conv_impl=impl)

  def apply(p, images):
    feats, logits = module.apply({"params": p}, images)
    return feats, jax.nn.softmax(logits)

  return FeatureNet("inception_fid", apply, params, NUM_FEATURES, NUM_LOGITS, {})


def data_root(data_dir: str | None) -> str:
  """The tfds data_dir in use: `data_dir`, else $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  if data_dir:
    return data_dir
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _split_arrays(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  c = config.data
  batches = list(
    pipeline.make_eval_iterator(
      c.name,
      global_batch_size=256,
      split=split,
      data_dir=c.data_dir or None,
      image_size=c.image_size or None,
    )
  )
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[mask]
  return images, np.concatenate([b["label"] for b in batches])[mask]


def digits_classifier(config, image_shape) -> FeatureNet:
  """The cached digits classifier for `config.data` (trained on its train split if absent).

  Process 0 trains and writes it; the others wait at a barrier and read it.
  """
  settings = dict(
    AUDIO_CLASSIFIER if len(image_shape) == 2 else DIGITS_CLASSIFIER,
    steps=config.eval.classifier_steps,
    dataset=config.data.name,
    image_shape=list(image_shape),
  )
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
  size = "x".join(map(str, image_shape[:-1]))  # H x W, or L for signals
  name = f"{'audio' if len(image_shape) == 2 else 'digits'}_classifier_{size}_{digest}"
  path = os.path.join(data_root(config.data.data_dir), CACHE_DIR, name + ".npz")
  if not os.path.exists(path) and jax.process_index() == 0:
    _train_classifier(config, path, settings)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("jdiff: digits classifier cached")
  with np.load(path) as f:
    params = unflatten({k[len("params/") :]: f[k] for k in f.files if k.startswith("params/")})
    accuracy = float(f["test_accuracy"])
  logging.info("feature classifier %s: held-out accuracy %.4f", path, accuracy)
  module = _classifier(settings)

  def apply(p, images):
    feats, logits = module.apply({"params": p}, images)
    return feats, jax.nn.softmax(logits)

  classes = settings.get("num_classes", 10)
  return FeatureNet(
    name, apply, params, settings["features"], classes, {"classifier_accuracy": accuracy}
  )


def _classifier(settings: dict):
  """The digits SmallClassifier, or the audio SpectrogramClassifier (settings with classes)."""
  if "num_classes" in settings:
    return SpectrogramClassifier(settings["num_classes"], settings["width"], settings["features"])
  return SmallClassifier(width=settings["width"], features=settings["features"])


def _train_classifier(config, path: str, settings: dict) -> None:
  """Adam on cross-entropy with +-1 pixel random shifts; writes params and test accuracy."""
  images, labels = _split_arrays(config, config.data.train_split)
  test_images, test_labels = _split_arrays(config, config.data.eval_split)
  module = _classifier(settings)
  rng = jax.random.key(settings["seed"])
  params = module.init(rng, jnp.zeros((1, *images.shape[1:])))["params"]
  opt = optax.adamw(optax.cosine_decay_schedule(settings["lr"], settings["steps"]), 1e-4)
  opt_state = opt.init(params)
  x_all, y_all = jnp.asarray(images), jnp.asarray(labels)

  @jax.jit
  def step(params, opt_state, key):
    k_idx, k_shift = jax.random.split(key)
    idx = jax.random.randint(k_idx, (settings["batch_size"],), 0, x_all.shape[0])
    shift = jax.random.randint(k_shift, (x_all.ndim - 2,), -1, 2)  # +-1 pixel or sample
    x = jnp.roll(x_all[idx], shift, axis=tuple(range(1, x_all.ndim - 1)))

    def loss_fn(p):
      logits = module.apply({"params": p}, x)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_all[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(settings["steps"]):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, i))
  logits = jax.jit(lambda p, x: module.apply({"params": p}, x)[1])(params, test_images)
  accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == test_labels))
  logging.info(
    "trained the digits classifier (%d steps, final loss %.4f): held-out accuracy %.4f "
    "on %d test images",
    settings["steps"],
    float(loss),
    accuracy,
    len(test_labels),
  )
  arrays = {f"params/{k}": v for k, v in flatten(params).items()}
  arrays["test_accuracy"] = np.float64(accuracy)
  arrays["settings"] = np.asarray(json.dumps(settings, sort_keys=True))

  def write(p):
    with open(p, "wb") as f:
      np.savez(f, **arrays)

  atomic_write(path, write, overwrite=True)
