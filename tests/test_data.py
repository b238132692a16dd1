"""Tests of jdiff.data: the embedded digits builder and the grain pipeline.

Everything runs offline and without TensorFlow; the digits are built once per
session into a temporary TFDS data_dir.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from sklearn.datasets import load_digits

from jdiff.data import digits as digits_lib
from jdiff.data import pipeline, sources

TF_INSTALLED = sources._tensorflow_available()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  digits_lib.prepare_digits(image_size=16, data_dir=str(path))
  return str(path)


@pytest.fixture(scope="session")
def sk_digits():
  return load_digits()


def _expected_digit(image_0_16, size):
  """Independent resize: integer rescale to 0..255, then PIL bicubic."""
  scaled = ((image_0_16.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
  if size == 8:
    return scaled
  return np.asarray(Image.fromarray(scaled).resize((size, size), resample=Image.Resampling.BICUBIC))


class IdSource:
  """Random-access source whose uint8 images encode the record id.

  image[0, 0, 0] = id % 256, image[0, 1, 0] = id // 256, image[1, 0, 0] = 255
  (so a horizontal flip is visible); label = id % 10.
  """

  def __init__(self, n, size=4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.zeros((self.size, self.size, 1), np.uint8)
    image[0, 0, 0], image[0, 1, 0], image[1, 0, 0] = i % 256, i // 256, 255
    return {"image": image, "label": i % 10}

  def __repr__(self):
    return f"IdSource(n={self.n})"


def _ids(batch):
  u8 = np.round((batch["image"] + 1) * 127.5).astype(np.int64)
  return u8[:, 0, 0, 0] + 256 * u8[:, 0, 1, 0]


def _take(it, k):
  return [next(it) for _ in range(k)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------- digits builder


def test_digits_metadata_and_counts(data_dir):
  meta = sources.dataset_metadata("jdiff_digits/16x16", data_dir=data_dir)
  assert meta.image_shape == (16, 16, 1)
  assert meta.num_classes == 10
  assert meta.num_examples == {"train": 1597, "test": 200}
  assert len(sources.load_source("jdiff_digits", split="train", data_dir=data_dir)) == 1597
  assert len(sources.load_source("jdiff_digits", split="test", data_dir=data_dir)) == 200
  resized = sources.dataset_metadata("jdiff_digits", data_dir=data_dir, image_size=32)
  assert resized.image_shape == (32, 32, 1)


def test_digits_image_size_picks_stored_config(data_dir, sk_digits):
  # Plain "jdiff_digits" at image_size=8 reads the 8x8 build (built here, once),
  # not the 16x16 build resized down.
  it = pipeline.make_eval_iterator(
    "jdiff_digits", data_dir=data_dir, global_batch_size=4, image_size=8
  )
  batch = next(it)
  source = tfds.data_source("jdiff_digits/8x8", split="test", data_dir=data_dir, download=False)
  for i in range(4):
    row = int(source[i]["index"])
    want = _expected_digit(sk_digits.images[row], 8).astype(np.float32) / 127.5 - 1
    np.testing.assert_allclose(batch["image"][i, :, :, 0], want, atol=1e-6)


def test_digits_split_is_documented_permutation(data_dir):
  perm = np.random.default_rng(0).permutation(1797)
  for split, want in (("test", perm[:200]), ("train", perm[200:])):
    source = sources.load_source("jdiff_digits", split=split, data_dir=data_dir)
    got = sorted(int(source[i]["index"]) for i in range(len(source)))
    assert got == sorted(want.tolist())


def test_digits_match_sklearn_resized_independently(data_dir, sk_digits):
  source = tfds.data_source("jdiff_digits/16x16", split="train", data_dir=data_dir, download=False)
  for i in range(8):
    ex = source[i]
    row = int(ex["index"])
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (16, 16, 1)
    np.testing.assert_array_equal(ex["image"][:, :, 0], _expected_digit(sk_digits.images[row], 16))
    assert int(ex["label"]) == int(sk_digits.target[row])


def test_resize_digit_sizes(sk_digits):
  img = sk_digits.images[5]
  for size in (8, 16, 32):
    np.testing.assert_array_equal(
      digits_lib.resize_digit(img, image_size=size)[:, :, 0], _expected_digit(img, size)
    )
  np.testing.assert_array_equal(
    digits_lib.resize_digit(np.full((8, 8), 16.0), image_size=32), np.full((32, 32, 1), 255)
  )
  with pytest.raises(ValueError, match=r"\(7, 8\)"):
    digits_lib.resize_digit(np.zeros((7, 8)), image_size=16)
  with pytest.raises(ValueError, match="64"):
    digits_lib.digits_builder(image_size=64)


def test_digits_module_imported_twice_does_not_clash(data_dir):
  code = textwrap.dedent(f"""
      import importlib, importlib.util, sys
      import jdiff.data.digits as d
      importlib.reload(d)
      spec = importlib.util.spec_from_file_location("jdiff_digits_copy", d.__file__)
      copy = sys.modules["jdiff_digits_copy"] = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(copy)
      import tensorflow_datasets as tfds
      b = tfds.builder("jdiff_digits/16x16", data_dir={data_dir!r})
      assert b.is_prepared() and b.info.splits["train"].num_examples == 1597
      assert len(copy.prepare_digits(image_size=16, data_dir={data_dir!r})
                 .as_data_source("test")) == 200
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ok")


def test_import_and_use_does_not_import_tensorflow(data_dir):
  code = textwrap.dedent(f"""
      import sys
      import jdiff.data, jdiff.data.digits, jdiff.data.pipeline as p
      it = p.make_train_iterator("jdiff_digits", data_dir={data_dir!r},
                                 global_batch_size=4, seed=0)
      next(it)
      next(p.make_eval_iterator("jdiff_digits", data_dir={data_dir!r}, global_batch_size=4))
      print("tensorflow" in sys.modules)
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- train iterator


def test_train_batches_shapes_and_values(data_dir):
  source = sources.load_source("jdiff_digits", split="train", data_dir=data_dir)
  it = pipeline.make_train_iterator("jdiff_digits", data_dir=data_dir, global_batch_size=32, seed=0)
  labels = []
  for batch in _take(it, 4):
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (32, 16, 16, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    u8 = (batch["image"] + 1) * 127.5
    np.testing.assert_allclose(u8, np.round(u8), atol=1e-4)
    labels.append(batch["label"])
  labels = np.concatenate(labels)
  assert labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) > 5
  # Every yielded image is a stored record, mapped by x / 127.5 - 1.
  stored = {source[i]["image"].tobytes(): int(source[i]["label"]) for i in range(len(source))}
  first = next(pipeline.make_train_iterator(source, global_batch_size=8, seed=0))
  for img, lab in zip(first["image"], first["label"]):
    key = np.round((img + 1) * 127.5).astype(np.uint8).tobytes()
    assert stored[key] == lab


def test_train_iterator_deterministic_from_seed(data_dir):
  make = lambda seed: pipeline.make_train_iterator(
    "jdiff_digits", data_dir=data_dir, global_batch_size=16, seed=seed
  )
  a, b, c = _take(make(3), 3), _take(make(3), 3), _take(make(4), 3)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_cover_shard_and_reshuffle():
  source = IdSource(37)
  it = pipeline.make_train_iterator(source, global_batch_size=37, seed=5, num_epochs=2)
  e1, e2 = _ids(next(it)), _ids(next(it))
  assert sorted(e1) == list(range(37)) and sorted(e2) == list(range(37))
  assert not np.array_equal(e1, e2)  # Reshuffled each epoch.
  assert not np.array_equal(e1, np.arange(37))
  with pytest.raises(StopIteration):
    next(it)


def test_shards_disjoint_and_cover():
  n, procs = 101, 2
  seen = []
  for p in range(procs):
    it = pipeline.make_train_iterator(
      IdSource(n),
      global_batch_size=2 * procs,
      seed=9,
      process_index=p,
      process_count=procs,
      num_epochs=1,
    )
    ids = np.concatenate([_ids(b) for b in it])
    assert len(ids) == n // procs and len(set(ids.tolist())) == n // procs
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1]
  union = seen[0] | seen[1]
  assert len(union) == n - n % procs and union <= set(range(n))


def test_digits_two_processes_disjoint(data_dir):
  per_proc = []
  for p in range(2):
    it = pipeline.make_train_iterator(
      "jdiff_digits",
      data_dir=data_dir,
      global_batch_size=4,
      seed=1,
      process_index=p,
      process_count=2,
      num_epochs=1,
    )
    imgs = np.concatenate([b["image"] for b in it])
    assert imgs.shape == (798, 16, 16, 1)
    per_proc.append({np.round((x + 1) * 127.5).astype(np.uint8).tobytes() for x in imgs})
  # Disjoint up to duplicate digit images in the source itself.
  source = sources.load_source("jdiff_digits", split="train", data_dir=data_dir)
  counts = {}
  for i in range(len(source)):
    key = source[i]["image"].tobytes()
    counts[key] = counts.get(key, 0) + 1
  shared = per_proc[0] & per_proc[1]
  assert all(counts[k] > 1 for k in shared)
  assert len(per_proc[0] | per_proc[1]) >= len(counts) - 1  # Together: all but the dropped one.


@pytest.mark.parametrize("flip", [False, True])
def test_resume_yields_identical_batches(flip):
  # 23 records, batch 4: the 12 batches span two epoch boundaries.
  kwargs = dict(global_batch_size=4, seed=11, random_flip=flip)
  it = pipeline.make_train_iterator(IdSource(23), **kwargs)
  _take(it, 3)
  state = it.get_state()
  assert isinstance(state, bytes)
  assert json.loads(state.decode())["worker_count"] == 0
  want = _take(it, 9)
  fresh = pipeline.make_train_iterator(IdSource(23), **kwargs)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 9), want)


def test_resume_digits(data_dir):
  kwargs = dict(data_dir=data_dir, global_batch_size=16, seed=2, process_index=1, process_count=2)
  it = pipeline.make_train_iterator("jdiff_digits", **kwargs)
  _take(it, 5)
  state = it.get_state()
  want = _take(it, 4)
  fresh = pipeline.make_train_iterator("jdiff_digits", **kwargs)
  fresh.set_state(state)
  _assert_same_batches(_take(fresh, 4), want)


def test_random_flip_is_seeded_and_only_mirrors():
  source = IdSource(64, size=6)
  batch = next(pipeline.make_train_iterator(source, global_batch_size=64, seed=0, random_flip=True))
  again = next(pipeline.make_train_iterator(source, global_batch_size=64, seed=0, random_flip=True))
  np.testing.assert_array_equal(batch["image"], again["image"])
  # The marker pixel (1, 0) moves to (1, 5) exactly when the image is flipped.
  flipped = batch["image"][:, 1, 5, 0] == 1.0
  assert 10 < flipped.sum() < 54
  u8 = np.round((batch["image"] + 1) * 127.5).astype(np.uint8)
  for img, f, lab in zip(u8, flipped, batch["label"]):
    orig = img[:, ::-1] if f else img
    rid = int(orig[0, 0, 0]) + 256 * int(orig[0, 1, 0])
    np.testing.assert_array_equal(orig, source[rid]["image"])
    assert lab == rid % 10
  plain = next(pipeline.make_train_iterator(source, global_batch_size=64, seed=0))
  assert (plain["image"][:, 1, 0, 0] == 1.0).all()


def test_image_size_center_crops_and_resizes():
  image = np.zeros((6, 10, 3), np.uint8)
  image[:, 2:8] = 200  # The central 6x6 square.
  out = pipeline._center_crop_resize(image, 3)
  np.testing.assert_array_equal(out, np.full((3, 3, 3), 200, np.uint8))

  class Src(IdSource):
    def __getitem__(self, i):
      return {"image": image, "label": 1}

  batch = next(pipeline.make_train_iterator(Src(4), global_batch_size=2, seed=0, image_size=3))
  np.testing.assert_allclose(batch["image"], np.full((2, 3, 3, 3), 200 / 127.5 - 1), atol=1e-6)


# ---------------------------------------------------------------- eval iterator


@pytest.mark.parametrize("procs,global_batch", [(1, 64), (2, 64), (2, 2 * 200)])
def test_eval_exact_single_pass(data_dir, procs, global_batch):
  source = sources.load_source("jdiff_digits", split="test", data_dir=data_dir)
  want = np.stack([source[i]["image"] for i in range(200)]).astype(np.float32) / 127.5 - 1
  want_labels = np.array([int(source[i]["label"]) for i in range(200)])
  got, labels, counts = [], [], []
  for p in range(procs):
    batches = list(
      pipeline.make_eval_iterator(
        "jdiff_digits",
        data_dir=data_dir,
        global_batch_size=global_batch,
        process_index=p,
        process_count=procs,
      )
    )
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (global_batch // procs, 16, 16, 1)
      assert b["mask"].dtype == bool and b["label"].dtype == np.int32
      np.testing.assert_array_equal(b["image"][~b["mask"]], 0.0)
      got.append(b["image"][b["mask"]])
      labels.append(b["label"][b["mask"]])
  assert len(set(counts)) == 1  # Same number of eval steps on every process.
  np.testing.assert_allclose(np.concatenate(got), want, atol=1e-6)
  np.testing.assert_array_equal(np.concatenate(labels), want_labels)


# ---------------------------------------------------------------- errors


def test_batch_not_divisible_error(data_dir):
  with pytest.raises(ValueError, match="global_batch_size=10 is not divisible by process_count=3"):
    pipeline.make_train_iterator(
      "jdiff_digits", data_dir=data_dir, global_batch_size=10, seed=0, process_count=3
    )
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.make_eval_iterator(IdSource(10), global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_train_iterator(
      IdSource(10), global_batch_size=4, seed=0, process_index=2, process_count=2
    )
  with pytest.raises(ValueError, match="num_epochs=1"):
    pipeline.make_train_iterator(IdSource(10), global_batch_size=16, seed=0, num_epochs=1)


def test_unknown_dataset_and_split(data_dir):
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'"):
    sources.load_source("no_such_dataset_xyz", split="train", data_dir=data_dir)
  with pytest.raises(ValueError, match="unknown config '64x64'"):
    sources.load_source("jdiff_digits/64x64", split="train", data_dir=data_dir)
  with pytest.raises(ValueError, match="unknown split 'validation'"):
    sources.load_source("jdiff_digits", split="validation", data_dir=data_dir)
  with pytest.raises(TypeError, match="int"):
    pipeline.make_train_iterator(3, global_batch_size=4, seed=0)


# Small builders standing in for catalog datasets (registered once per session).
class JdiffTestTiny(tfds.core.GeneratorBasedBuilder):
  """A catalog-style builder that needs no TensorFlow (raw tensor features)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=3),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((4, 4, 3), 10 * i, np.uint8), "label": i % 3}


class JdiffTestNeedsTf(JdiffTestTiny):
  """Like a catalog builder whose generation code imports TensorFlow."""

  def _split_generators(self, dl_manager):
    import tensorflow  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

    return super()._split_generators(dl_manager)


class JdiffTestPng(JdiffTestTiny):
  """Like mnist/cifar10: an Image feature, which tfds PNG-encodes through TF."""

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(4, 4, 3)),
          "label": tfds.features.ClassLabel(num_classes=3),
        }
      ),
    )


def test_catalog_path_prepares_then_reads(tmp_path):
  d = str(tmp_path)
  assert not tfds.builder("jdiff_test_tiny", data_dir=d).is_prepared()
  meta = sources.dataset_metadata("jdiff_test_tiny", data_dir=d)  # Prepares.
  assert meta == sources.DatasetMetadata("jdiff_test_tiny", (4, 4, 3), 3, {"train": 12, "test": 5})
  source = tfds.data_source("jdiff_test_tiny", split="train", data_dir=d, download=False)
  assert len(source) == 12
  it = pipeline.make_train_iterator(
    "jdiff_test_tiny", data_dir=d, global_batch_size=12, seed=0, num_epochs=1
  )
  batch = next(it)
  values = np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5).astype(int)
  assert sorted(values.tolist()) == [10 * i for i in range(12)]
  np.testing.assert_array_equal(batch["label"], (values // 10) % 3)


@pytest.mark.skipif(TF_INSTALLED, reason="checks the error raised when TensorFlow is absent")
def test_missing_tensorflow_clear_error(tmp_path):
  d = str(tmp_path)
  # Raised by the builder's own code.
  with pytest.raises(sources.TensorFlowRequiredError, match=r"pip install tensorflow"):
    sources.load_source("jdiff_test_needs_tf", split="train", data_dir=d)
  # Detected up front from Image features, before any download.
  with pytest.raises(sources.TensorFlowRequiredError, match=r"jdiff\[tf\]"):
    pipeline.make_train_iterator("jdiff_test_png", data_dir=d, global_batch_size=4, seed=0)
  # A real catalog dataset: mnist is refused before anything is downloaded.
  with pytest.raises(sources.TensorFlowRequiredError, match="'mnist'"):
    sources.load_source("mnist", split="train", data_dir=d)
  # Catalog audio (tfds.features.Audio): the builder itself is built with TensorFlow.
  for name in ("speech_commands", "nsynth/gansynth_subset"):
    with pytest.raises(sources.TensorFlowRequiredError, match=rf"'{name}'.*Audio.*jdiff\[tf\]"):
      sources.load_source(name, split="train", data_dir=d)
  downloads = tmp_path / "downloads"
  assert not downloads.exists() or not any(downloads.rglob("*.*"))


def test_missing_tensorflow_reported_when_tf_import_fails(tmp_path, monkeypatch):
  # Runs whether or not TF is installed: the builder's `import tensorflow`
  # fails as it would without TF, and the ImportError must be translated.
  monkeypatch.setattr(sources, "_tensorflow_available", lambda: True)
  import builtins  # pylint: disable=g-import-not-at-top

  real_import = builtins.__import__

  def no_tf(name, *args, **kwargs):
    if name == "tensorflow" or name.startswith("tensorflow."):
      raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr("builtins.__import__", no_tf)
  with pytest.raises(sources.TensorFlowRequiredError, match="pip install tensorflow"):
    sources.load_source("jdiff_test_needs_tf", split="train", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- modes without data
# A mode opens the dataset only if it reads from it (train, eval, reference statistics);
# sample, edit and fid on stored statistics take the image shape from the workdir's record,
# the stage-1 autoencoder or the imported weights.


def _tiny(data_dir, **overrides):
  from jdiff.configs import tiny  # pylint: disable=g-import-not-at-top

  c = tiny.get_config()
  c.data.data_dir = data_dir
  c.model.conv_impl = "xla"
  c.train.num_steps, c.train.ckpt_every = 2, 0
  c.sample.num_steps, c.sample.num_samples, c.sample.grid_size, c.sample.batch_size = 2, 4, 4, 4
  for key, value in overrides.items():
    *path, field = key.split(".")
    node = c
    for part in path:
      node = node[part]
    node[field] = value
  return c


def test_trained_workdir_samples_without_its_data(tmp_path):
  """Train on a private copy of the digits, delete it, sample: nothing reads (or rebuilds)
  the data directory (before: sampling prepared the dataset again)."""
  import shutil  # pylint: disable=g-import-not-at-top

  from jdiff.runs import diffusion  # pylint: disable=g-import-not-at-top

  data = str(tmp_path / "tfds")
  digits_lib.prepare_digits(image_size=16, data_dir=data)
  cfg = _tiny(data, conditional=True)
  wd = str(tmp_path / "wd")
  diffusion.train_and_evaluate(cfg, wd)
  shutil.rmtree(data)
  images = np.load(diffusion.sample(cfg, wd))["images"]
  assert images.shape == (4, 16, 16, 1) and np.all(np.isfinite(images))
  assert not (tmp_path / "tfds").exists()


def test_imported_model_samples_and_scores_without_data(tmp_path, monkeypatch):
  """The pretrained config (data.name cifar10, 32x32x3) on a 16x16x1 diffusers UNet2DModel
  with random weights, and an empty TFDS data dir: --mode=sample takes the weights' shape,
  --mode=fid scores against a reference .npz (random Inception weights). Before: cifar10
  was opened (not prepared) and its shape compared with the weights'."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  import jax  # pylint: disable=g-import-not-at-top

  from jdiff import metrics  # pylint: disable=g-import-not-at-top
  from jdiff.configs import pretrained  # pylint: disable=g-import-not-at-top
  from jdiff.models.inception import NUM_FEATURES, InceptionV3  # pylint: disable=g-import-not-at-top
  from jdiff.models.inception_convert import flatten  # pylint: disable=g-import-not-at-top
  from jdiff.runs import diffusion, fid  # pylint: disable=g-import-not-at-top

  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  monkeypatch.setenv("TFDS_DATA_DIR", str(empty))
  torch.manual_seed(0)
  unet = diffusers.UNet2DModel(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  )  # fmt: skip
  unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
  diffusers.DDPMScheduler(num_train_timesteps=50, clip_sample=True).save_config(tmp_path / "unet")

  # Random Inception weights (shapes only: nothing compiled) and random reference statistics.
  shapes = jax.eval_shape(
    lambda: InceptionV3().init(jax.random.key(0), jax.numpy.zeros((1, 299, 299, 3)))["params"]
  )
  rs = np.random.default_rng(0)
  weights = {}  # Kaiming-scaled: the signal survives the depth
  for k, v in flatten(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)).items():
    fan_in = max(1, int(np.prod(v.shape[:-1])))
    weights[k] = (rs.standard_normal(v.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  np.savez(tmp_path / "inception.npz", **weights)
  f = rs.standard_normal((64, NUM_FEATURES))
  ref = str(tmp_path / "ref.npz")
  metrics.save_reference(
    ref, f.mean(0), np.cov(f, rowvar=False), count=64, feature_net="inception_fid"
  )

  c = pretrained.get_config()
  c.pretrained.path = str(tmp_path / "unet")
  c.sample.num_steps, c.sample.num_samples, c.sample.grid_size, c.sample.batch_size = 2, 4, 4, 4
  c.eval.num_samples, c.eval.is_splits, c.eval.pr_samples = 4, 1, 0
  c.eval.ref_stats, c.eval.inception_weights = ref, str(tmp_path / "inception.npz")
  c.eval.inception_conv_impl = "xla"
  assert c.data.name == "cifar10" and c.data.data_dir == ""
  images = np.load(diffusion.sample(c, str(tmp_path / "wd")))["images"]
  assert images.shape == (4, 16, 16, 1) and np.all(np.abs(images) <= 1.0)
  scores = fid.fid(c, str(tmp_path / "wd"))
  assert scores["num_samples"] == 4 and np.isfinite(scores["fd"]) and np.isfinite(scores["is"])
  assert list(empty.iterdir()) == []  # nothing prepared


def test_a_mode_that_reads_missing_data_says_so(tmp_path):
  from jdiff.runs import diffusion  # pylint: disable=g-import-not-at-top

  cfg = _tiny(str(tmp_path), **{"data.name": "no_such_dataset_xyz"})
  with pytest.raises(ValueError) as err:
    diffusion.evaluate(cfg, str(tmp_path / "wd"))
  line = str(err.value)
  assert "\n" not in line
  assert line.startswith("this mode reads the dataset config.data.name='no_such_dataset_xyz'")
  assert "unknown dataset 'no_such_dataset_xyz'" in line
