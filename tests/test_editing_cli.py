"""`--mode=edit` end to end on tiny models: img2img, inpainting, the SR cascade, bad input.

One session fixture trains two tiny models through the CLI: an 8x8 base (the tiny config at
the digits' native 8x8) and the 8x8 -> 16x16 super-resolution model (tiny_sr).
"""

from __future__ import annotations

import concurrent.futures
import os
import runpy

import numpy as np
import pytest
from conftest import main_args, run_python
from PIL import Image

from jdiff.runs import edit

pytestmark = pytest.mark.e2e  # every test uses the models the CLI trains

BASE_CONFIG = """
from jdiff.configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.image_size = 8
  return c
"""


@pytest.fixture(scope="session")
def models(tmp_path_factory, digits_dir):
  root = tmp_path_factory.mktemp("edit_models")
  base_cfg = str(root / "tiny8.py")
  with open(base_cfg, "w") as f:
    f.write(BASE_CONFIG)
  base, sr = str(root / "base"), str(root / "sr")
  args = main_args("train", base, digits_dir)
  args[2] = f"--config={base_cfg}"
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:  # independent runs
    runs = [
      pool.submit(run_python, a)
      for a in (args, main_args("train", sr, digits_dir, config="tiny_sr"))
    ]
    for run in runs:
      run.result()
  return dict(base_cfg=base_cfg, base=base, sr=sr, data_dir=digits_dir, root=root)


def _config(models, **edit_keys):
  c = runpy.run_path(models["base_cfg"])["get_config"]()
  c.data.data_dir = models["data_dir"]
  for k, v in edit_keys.items():
    setattr(c.edit, k, v)
  return c


def _digits8(n=3):
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)


def test_superres_trains_and_chains_after_the_base_model(models):
  grids = os.listdir(os.path.join(models["sr"], "samples"))
  assert grids == ["grid_0000006.png"]  # training ends with a before / after SR grid
  args = main_args(
    "edit",
    models["sr"],
    models["data_dir"],
    config="tiny_sr",
    **{
      "edit.task": "superres",
      "edit.base_config": models["base_cfg"],
      "edit.base_workdir": models["base"],
      "edit.num": 3,
    },
  )
  run_python(args)
  out = np.load(os.path.join(models["sr"], "edits", "cascade_superres.npz"))
  assert out["inputs"].shape == (3, 8, 8, 1) and out["results"].shape == (3, 16, 16, 1)
  assert np.all(np.isfinite(out["results"]))
  png = np.asarray(Image.open(os.path.join(models["sr"], "edits", "cascade_superres.png")))
  assert png.shape[:2] == (4 * (2 * 17 + 1), 4 * (3 * 17 + 1))  # inputs over results, x4


def test_img2img_and_inpaint_write_fresh_files_beside_the_input(models, tmp_path):
  images = _digits8()
  src = str(tmp_path / "digits.npz")
  np.savez(src, images=images)
  first = edit.edit(_config(models, task="img2img", input=src, strength=0.5), models["base"])
  assert first == str(tmp_path / "digits_img2img.png")
  before = open(first, "rb").read()
  second = edit.edit(_config(models, task="img2img", input=src, strength=0.5), models["base"])
  assert second == str(tmp_path / "digits_img2img-1.png")  # never over an existing file
  assert open(first, "rb").read() == before
  res = np.load(str(tmp_path / "digits_img2img.npz"))["results"]
  assert res.shape == (3, 8, 8, 1)

  mask = np.zeros((8, 8), np.uint8)
  mask[2:6, 2:6] = 255  # white = generate
  folder = tmp_path / "pngs"
  folder.mkdir()
  for i, im in enumerate(images):
    Image.fromarray(im).save(folder / f"{i}.png")
  Image.fromarray(mask).save(tmp_path / "mask.png")
  cfg = _config(models, task="inpaint", input=str(folder), mask=str(tmp_path / "mask.png"))
  out = edit.edit(cfg, models["base"])
  assert out == str(tmp_path / "pngs_inpaint.png")
  res = np.load(str(tmp_path / "pngs_inpaint.npz"))["results"][..., 0]
  keep = mask == 0
  np.testing.assert_allclose(res[:, keep], images[:, keep] / 127.5 - 1.0, atol=1e-5)


def test_bad_masks_and_shapes_are_clear_errors(models, tmp_path):
  src = str(tmp_path / "d.npz")
  np.savez(src, images=_digits8())
  np.save(tmp_path / "small.npy", np.ones((5, 5), np.float32))
  np.save(tmp_path / "big.npy", np.full((8, 8), 2.0, np.float32))
  np.save(tmp_path / "empty.npy", np.zeros((8, 8), np.float32))
  for name, match in [
    ("small.npy", r"shape \(1, 5, 5, 1\) does not fit the images \(3, 8, 8, 1\)"),
    ("big.npy", r"values must lie in \[0, 1\].*\[2.0, 2.0\]"),
    ("empty.npy", "selects no pixel"),
  ]:
    cfg = _config(models, task="inpaint", input=src, mask=str(tmp_path / name))
    with pytest.raises(ValueError, match=match):
      edit.edit(cfg, models["base"])
  np.savez(tmp_path / "wrong.npz", images=np.zeros((2, 16, 16), np.uint8))
  cfg = _config(models, task="img2img", input=str(tmp_path / "wrong.npz"))
  with pytest.raises(ValueError, match=r"shape \(16, 16, 1\), the model takes \(8, 8, 1\)"):
    edit.edit(cfg, models["base"])
  with pytest.raises(ValueError, match="config.edit.task must be one of"):
    edit.edit(_config(models, task="paint", input=src), models["base"])
  assert not [p for p in os.listdir(tmp_path) if "_inpaint" in p or "_img2img" in p]
