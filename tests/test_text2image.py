"""Prompt -> image from the config (jdiff/runs/text2image.py): `--mode=sample` with
`sample.prompts` writes the images of `make_text_to_image` (one seed per prompt, CFG with
the negative prompt) as PNGs and an .npz; bad keys are one clear error."""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
from test_sd_import import sd_dir  # noqa: F401  (the tiny saved StableDiffusionPipeline)

from jdiff import cli
from jdiff.configs import text2image as t2i_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")


def _config(path, **sample):
  c = t2i_config.get_config()
  c.pretrained.path = str(path)
  c.model.conv_impl = "xla"
  c.sample.update({**dict(num_steps=3, sampler="ddim", guidance_scale=3.0), **sample})
  return c


def test_sample_mode_writes_the_prompts_images(sd_dir, tmp_path):  # noqa: F811
  """The .npz holds diffusers' images of each prompt from the latents of its seed."""
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("the digit seven\n\nseven\n")
  c = _config(sd_dir, prompts_file=str(prompts_file), negative_prompt="the", seeds=(3, 9))
  npz = cli.MODES["sample"](c, str(tmp_path / "w"))
  out = np.load(npz)
  assert list(out["prompts"]) == ["the digit seven", "seven"]
  assert list(out["seeds"]) == [3, 9]
  z = np.stack([jax.random.normal(jax.random.key(s), (8, 8, 4)) for s in (3, 9)])
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None)
  with torch.no_grad():
    ref = pipe(
      ["the digit seven", "seven"],
      latents=torch.from_numpy(z.transpose(0, 3, 1, 2)),
      negative_prompt=["the"] * 2,
      num_inference_steps=3,
      guidance_scale=3.0,
      output_type="np",
    ).images
  np.testing.assert_allclose(out["images"], ref, atol=1e-3)
  pngs = sorted(glob.glob(os.path.join(os.path.dirname(npz), "*.png")))
  assert [os.path.basename(p) for p in pngs] == [
    "prompts_ddim3_000_the_digit_seven_seed3.png",
    "prompts_ddim3_001_seven_seed9.png",
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


def test_pixel_pretrained_config_refuses_a_text_unet(sd_dir):  # noqa: F811
  import types

  from jdiff.configs import pretrained as pretrained_config
  from jdiff.pretrained import PretrainedError
  from jdiff.runs.pretrained import attach

  c = pretrained_config.get_config()
  c.pretrained.path = str(sd_dir / "unet")
  setup = types.SimpleNamespace(config=c, repl=None, reads_data=False)
  with pytest.raises(PretrainedError, match="text-conditioned .* jdiff/configs/text2image.py"):
    attach(setup)
