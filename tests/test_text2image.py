"""Prompt -> image from the config (jdiff/runs/text2image.py): `--mode=sample` with
`sample.prompts` writes the images of `make_text_to_image` (one seed per prompt, CFG with
the negative prompt) as PNGs and an .npz; bad keys are one clear error."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from test_sd_import import sd_dir  # noqa: F401  (the tiny saved StableDiffusionPipeline)

from jdiff import cli
from jdiff.configs import text2image as t2i_config
from jdiff.pretrained.stable_diffusion import load_stable_diffusion, make_text_to_image

pytest.importorskip("transformers")


def _config(path, **sample):
  c = t2i_config.get_config()
  c.pretrained.path = str(path)
  c.model.conv_impl = "xla"
  c.sample.update({**dict(num_steps=3, sampler="euler", guidance_scale=3.0), **sample})
  return c


def test_sample_mode_writes_the_prompts_images(sd_dir, tmp_path):  # noqa: F811
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("the digit seven\n\nseven\n")
  c = _config(sd_dir, prompts_file=str(prompts_file), negative_prompt="the", seeds=(3, 9))
  npz = cli.MODES["sample"](c, str(tmp_path / "w"))
  out = np.load(npz)
  assert list(out["prompts"]) == ["the digit seven", "seven"]
  assert list(out["seeds"]) == [3, 9]
  sd = load_stable_diffusion(str(sd_dir), conv_impl="xla")
  generate = make_text_to_image(
    sd, negative_prompt="the", guidance=3.0, sampler="euler", num_steps=3
  )
  images, z0 = generate(["the digit seven", "seven"], seeds=[3, 9])
  np.testing.assert_array_equal(out["images"], images)
  np.testing.assert_array_equal(out["latents"], z0)
  pngs = sorted(glob.glob(os.path.join(os.path.dirname(npz), "*.png")))
  assert [os.path.basename(p) for p in pngs] == [
    "prompts_euler3_000_the_digit_seven_seed3.png",
    "prompts_euler3_001_seven_seed9.png",
  ]


@pytest.mark.parametrize(
  "sample,match",
  [
    (dict(prompts=()), "sample.prompts must be a non-empty tuple of strings"),
    (dict(prompts=("a", "b"), seeds=(1,)), r"sample.seeds must be one int .* per prompt \(2\)"),
    (dict(prompts_file="/nonexistent/p.txt"), "sample.prompts_file: no file"),
    (dict(spacing="karras", sampler="ddim"), "does not accept spacing 'karras'"),
  ],
)
def test_bad_prompt_keys_are_one_clear_error(tmp_path, sample, match):
  c = _config(tmp_path, **sample)
  with pytest.raises(ValueError, match=match):
    cli.MODES["sample"](c, str(tmp_path / "w"))


def test_missing_pipeline_path_is_named(tmp_path):
  c = _config("")
  with pytest.raises(ValueError, match="config.pretrained.path"):
    cli.MODES["sample"](c, str(tmp_path))
