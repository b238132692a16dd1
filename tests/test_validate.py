"""The config rules (`jdiff.runs.validate`), called directly: each bad value is one ValueError
naming the key and what is accepted; nothing is built and no data are read."""

from __future__ import annotations

import re

import pytest

from jdiff.configs import ae_digits, default, digits, edm_digits, flow_digits, t2i_digits, tiny
from jdiff.runs import diffusion
from jdiff.runs.distilled import resolve, sampler_of
from jdiff.runs.validate import validate


def _set(c, **overrides):
  for key, value in overrides.items():
    *path, field = key.split(".")
    target = c
    for part in path:
      target = target[part]
    target[field] = value
  return c


def config(**overrides):
  return _set(tiny.get_config(), **overrides)


BAD = [
  # the training loop's periods and sizes
  ("train.num_steps", 0, "config.train.num_steps must be an integer >= 1, got 0"),
  ("train.log_every", 0, "config.train.log_every must be an integer >= 1, got 0"),
  ("train.log_every", -2, "config.train.log_every must be an integer >= 1, got -2"),
  ("train.ckpt_every", -1, "config.train.ckpt_every must be an integer >= 0, got -1"),
  ("train.grad_accum_steps", 0, "config.train.grad_accum_steps must be an integer >= 1"),
  ("train.profile_steps", (5, 2), "config.train.profile_steps must be two integers (a, b)"),
  ("train.label_dropout", 0.1, "label_dropout > 0 needs config.conditional=True"),
  ("mesh.fsdp", 3, "the fixed sizes multiply to 3, which does not divide the device count 1"),
  ("mesh.data", 0, "config.mesh.data must be a positive integer or -1, got 0"),
  # ranges
  ("optim.lr", -1e-3, "config.optim.lr must be a finite number > 0.0"),
  ("optim.b2", 1.0, "config.optim.b2 must be a finite number in [0.0, 1.0)"),
  ("optim.optimizer", "sgd", "config.optim: "),
  ("model.dropout", 1.0, "config.model.dropout must be a finite number in [0.0, 1.0)"),
  ("model.num_groups", 3, "divisible by config.model.num_groups=3"),
  ("eval.bound_examples", -1, "config.eval.bound_examples must be an integer >= 0"),
  ("sample.num_samples", 0, "config.sample.num_samples must be an integer >= 1, got 0"),
  ("sample.grid_size", -2, "config.sample.grid_size must be an integer >= 1"),
  ("sample.guidance_scale", 3.0, "config.sample.guidance_scale=3.0 needs a conditional"),
  # the model and the schedule (once inside build_model and get_schedule)
  ("model.dtype", "float16", "config.model.dtype must be one of"),
  ("model.conv_impl", "fft", "config.model.conv_impl must be one of"),
  ("model.attention_impl", "flash", "config.model.attention_impl must be one of"),
  ("model.norm_impl", "fused", "config.model.norm_impl must be one of"),
  ("train.prng_impl", "philox", "config.train.prng_impl must be one of"),
  ("model.residual_dtype", "float16", "config.model.residual_dtype must be one of"),
  ("model.residual_dtype", "bfloat16", "applies to model.arch='dit' only"),
  ("diffusion.schedule", "quadratic", "config.diffusion.schedule: unknown schedule 'quadratic'"),
  ("diffusion.variance", "learned_range", "learn_sigma=True goes with"),
  # the sampler
  ("sample.sampler", "magic", "config.sample: unknown sampler 'magic'"),
  ("sample.spacing", "karras", "sampler 'ddim' does not accept spacing 'karras'"),
  ("sample.guidance_schedule", "exp", "config.sample.guidance_schedule must be one of"),
  # objective and architecture
  ("objective", "vp", "config.objective must be one of"),
  ("model.arch", "vit", "config.model.arch must be one of"),
  ("sample.sampler", "flow_euler", "config.sample.sampler='flow_euler' needs config.objective="),
  ("edm.uncertainty", True, "config.edm.uncertainty=True needs config.objective='edm'"),
  # sample quality
  ("eval.feature_net", "vgg", "config.eval.feature_net must be one of"),
  ("eval.num_samples", 0, "config.eval.num_samples must be an integer >= 2"),
  ("eval.inception_weights", "/nope/w.npz", "file not found"),
  ("eval.samples_npz", "x.png", "config.eval.samples_npz must be a .npz file"),
  ("eval.quality_samples", 1, "config.eval.quality_samples must be 0 (off) or >= 2, got 1"),
]


@pytest.mark.parametrize("key,value,message", BAD)
def test_bad_value_is_one_clear_error(key, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    validate(config(**{key: value}))


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"objective": "flow", "sample.sampler": "ddim"}, "steps on the discrete DDPM schedule"),
    ({"objective": "edm", "sample.sampler": "pc"}, "steps on the discrete DDPM schedule"),
    ({"objective": "edm", "train.grad_accum_steps": 2}, "needs config.objective='ddpm'"),
    ({"objective": "flow", "model.learn_sigma": True, "diffusion.variance": "learned_range"},
     "config.model.learn_sigma=True (the DDPM hybrid loss) needs objective 'ddpm'"),
    ({"latent.autoencoder_workdir": "/x", "sample.clip_x0": 1.0},
     "config.sample.clip_x0 must be 0 for latent diffusion"),
    ({"superres.factor": 3}, "config.superres.factor must be >= 2 and divide"),
    ({"optim.schedule": "cosine", "optim.warmup_steps": 6},
     "config.optim: a cosine lr schedule needs total_steps (train.num_steps=6) > warmup_steps=6"),
  ],
)  # fmt: skip
def test_bad_combination_is_one_clear_error(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    validate(config(**overrides))


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("loss.recon_loss", "l3", "config.loss.recon_loss must be 'l1' or 'l2'"),
    ("loss.perceptual_weight", 1.0, "are not implemented"),
    ("loss.kl_weight", -1.0, "config.loss.kl_weight must be a finite number >= 0.0"),
    ("autoencoder.overrides.dtype", "float16", "config.autoencoder.overrides.dtype must be"),
    ("train.log_every", 0, "config.train.log_every must be an integer >= 1, got 0"),
  ],
)
def test_bad_autoencoder_value(key, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    validate(_set(ae_digits.get_config(), **{key: value}))


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("objective", "edm", "config.text (captions) needs config.objective='ddpm', got 'edm'"),
    ("text.captions", "coco", "config.text.captions must be 'digits' or 'folder', got 'coco'"),
    ("text.heads", 3, "config.text.width=64 must be divisible by text.heads=3"),
    ("text.max_length", 6, "config.text.max_length=6 is shorter than the longest caption (8"),
    ("text.num_layers", 0, "config.text.num_layers must be an integer >= 1, got 0"),
    ("sample.prompts", ("a purple seven",), "word(s) ['purple'] are not in the caption vocabulary"),
    ("sample.negative_prompt", "blurry zebra", "word(s) ['zebra'] are not in"),
    ("sample.prompts_file", "/nope/prompts.txt", "config.sample.prompts_file: no file"),
    ("superres.factor", 2, "config.text (captions) does not combine with config.superres.factor"),
    ("text.captions", "folder", "config.text.captions='folder' fine-tunes config.pretrained.path"),
  ],
)
def test_bad_text_value(key, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    validate(_set(t2i_digits.get_config(), **{key: value}))


def test_text_needs_a_conditional_model():
  c = _set(t2i_digits.get_config(), conditional=False, **{"sample.guidance_scale": 1.0})
  c.train.label_dropout = 0.0
  with pytest.raises(ValueError, match=re.escape("needs config.conditional=True, got False")):
    validate(c)


@pytest.mark.parametrize(
  "get_config", [default, digits, tiny, edm_digits, flow_digits, ae_digits, t2i_digits]
)
def test_shipped_configs_are_valid(get_config):
  validate(get_config.get_config())


# ----------------------------------------------------------------------------- the sampler choice


@pytest.mark.parametrize(
  "objective,sampler",
  [("ddpm", "ddim"), ("edm", "heun"), ("flow", "flow_euler")],
)
def test_auto_sampler_follows_the_objective(objective, sampler):
  c = config(objective=objective)
  assert c.sample.sampler == "auto"  # the default
  validate(c)  # before: objective edm with the default ddim was an error
  assert sampler_of(c) == sampler
  assert resolve(c).sample.sampler == sampler
  assert c.sample.sampler == "auto"  # resolve copies


def test_main_job_samples_with_its_recipe():
  """digits.py: DPM-Solver++(2M) SDE in 10 steps (BENCHMARKS.md, "The main job's recipe");
  the objective's own sampler ('auto') is still DDIM."""
  c = resolve(digits.get_config())
  assert (c.sample.sampler, c.sample.num_steps) == ("dpmpp_2m_sde", 10)
  with c.unlocked():
    c.sample.sampler = "auto"
  assert resolve(c).sample.sampler == "ddim"


def test_edm_samples_with_the_default_sampler(digits_dir, tmp_path):
  """objective=edm with nothing else set samples (with heun) instead of stopping."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jdiff.runs.setup import Setup  # pylint: disable=g-import-not-at-top

  c = config(
    **{"objective": "edm", "data.data_dir": digits_dir, "sample.num_steps": 1,
       "sample.batch_size": 2, "model.conv_impl": "xla"}
  )  # fmt: skip
  with Setup(c, str(tmp_path / "w")) as setup:
    assert setup.config.sample.sampler == "heun"
    images = diffusion.generate(setup, setup.init_state().params, 2, jax.random.key(0))
  assert images.shape == (2, 16, 16, 1) and np.all(np.isfinite(images))


# ----------------------------------------------------------------------------- files a config names


def test_missing_inception_weights_stop_before_training(tmp_path):
  """cifar10 scored at the end of training needs the Inception weights: an error before the
  dataset is opened or a step is run (before: after the last step)."""
  c = config(**{"data.name": "cifar10", "data.data_dir": str(tmp_path), "eval.quality_samples": 10})
  with pytest.raises(ValueError, match=r"config.eval.inception_weights is empty"):
    validate(c)
  with pytest.raises(ValueError, match=r"config.eval.quality_samples=10 .* is empty"):
    diffusion.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()
  validate(_set(c, **{"eval.quality_samples": 0}))  # nothing scored: nothing needed
  validate(_set(c, **{"eval.quality_samples": 10, "eval.feature_net": "digits"}))


def test_caption_folder_must_exist():
  from jdiff.configs import sd_finetune

  c = _set(sd_finetune.get_config(), **{"pretrained.path": "/m", "text.folder": "/nope"})
  with pytest.raises(ValueError, match=re.escape("config.text.folder='/nope' is not a directory")):
    validate(c)


def test_a_workdir_from_before_a_new_option_still_resumes(tmp_path):
  """A stored config without a key added since reads it at the library default: left at the
  default it changes nothing; set otherwise it is an unsafe change like any other."""
  import json  # noqa: PLC0415

  from jdiff.configs import tiny  # noqa: PLC0415
  from jdiff.runs import stored_config  # noqa: PLC0415

  config = tiny.get_config()
  old = stored_config.flatten(config)
  del old["model.residual_dtype"], old["train.prng_impl"]  # keys the old library lacked
  (tmp_path / stored_config.CONFIG_FILE).write_text(json.dumps(old))
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  stored_config.check_or_store(config, str(tmp_path), write=False)  # no error
  # A distillation's teacher check reads the same way.
  assert (
    stored_config.read(str(tmp_path), old | {"model.residual_dtype": 0})["model.residual_dtype"]
    == "float32"
  )
  with config.unlocked():
    config.model.residual_dtype = "bfloat16"
  with pytest.raises(stored_config.ConfigChangedError, match='residual_dtype: "float32" → "bf'):
    stored_config.check_or_store(config, str(tmp_path), write=False)
