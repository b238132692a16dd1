"""Imported U-Nets are the same functions as diffusers' / ADM's torch models (jdiff.pretrained).

diffusers' own `UNet2DModel` (random weights, saved with `save_pretrained(...,
safe_serialization=True)`) is the reference for the diffusers import; for ADM, which no
package provides, `tests/adm_torch.py` rebuilds openai's `UNetModel` module structure in
torch. Schedules are compared with diffusers' `DDPMScheduler.alphas_cumprod`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import main_args, run_python

from jdiff.pretrained import adm, build, load_pretrained, mapping, schedulers
from jdiff.pretrained.load import hub_download

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# The google/ddpm-* architectures (their hub config.json values) at small widths.
DDPM = dict(
  act_fn="silu",
  attention_head_dim=None,
  center_input_sample=False,
  downsample_padding=0,
  flip_sin_to_cos=False,
  freq_shift=1,
  mid_block_scale_factor=1,
  norm_eps=1e-6,
  time_embedding_type="positional",
  in_channels=3,
  out_channels=3,
  layers_per_block=2,
)
CIFAR10 = dict(  # google/ddpm-cifar10-32
  DDPM,
  sample_size=32,
  block_out_channels=(128, 256, 256, 256),
  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
  norm_num_groups=32,
)
CONFIGS = {
  "cifar10_small": dict(
    CIFAR10, sample_size=16, block_out_channels=(16, 32, 32, 32), norm_num_groups=8
  ),
  # google/ddpm-celebahq-256 and ddpm-ema-church-256: 6 levels, attention at level 4.
  "celebahq_church_small": dict(
    DDPM,
    sample_size=32,
    block_out_channels=(8, 8, 16, 16, 32, 32),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    norm_num_groups=8,
    layers_per_block=1,
  ),
  # diffusers' defaults elsewhere: flip/shift 0, padding 1, heads of 8 channels, FiLM,
  # class labels, [0, 1] inputs, no mid attention.
  "conditional_scale_shift": dict(
    sample_size=8,
    in_channels=2,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D"),
    norm_num_groups=4,
    resnet_time_scale_shift="scale_shift",
    num_class_embeds=5,
    center_input_sample=True,
    add_attention=False,
  ),
  # FiLM with a middle attention: diffusers' UNetMidBlock2D builds that attention without
  # a GroupNorm unless attn_norm_num_groups is given (then with one).
  "scale_shift_mid_attention": dict(
    sample_size=8,
    in_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    resnet_time_scale_shift="scale_shift",
  ),
  "scale_shift_mid_attention_norm": dict(
    sample_size=8,
    in_channels=3,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attn_norm_num_groups=4,
    resnet_time_scale_shift="scale_shift",
  ),
}
# The CLI / mapping-only tests' model: 16x16x1 (the digits data), two levels.
TINY = dict(
  DDPM,
  sample_size=16,
  in_channels=1,
  out_channels=1,
  block_out_channels=(8, 16),
  layers_per_block=1,
  down_block_types=("DownBlock2D", "AttnDownBlock2D"),
  up_block_types=("AttnUpBlock2D", "UpBlock2D"),
  norm_num_groups=4,
)


def _perturbed(module):
  """Random weights everywhere (diffusers zero-inits nothing, but make biases non-trivial)."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return module.eval()


def _compare(pt, ref_fn, *, shape, labels=None, t=(3, 999), rtol=1e-4):
  b = len(t)
  x = np.random.RandomState(1).randn(b, shape[2], shape[0], shape[1]).astype(np.float32)
  with torch.no_grad():
    ref = ref_fn(torch.from_numpy(x), torch.tensor(t)).numpy()
  y = None if labels is None else jnp.asarray(labels)
  apply = jax.jit(lambda p, x, t, y: pt.module.apply({"params": p}, x, t, y, train=False))
  out = apply(pt.params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), y)
  out = np.asarray(out).transpose(0, 3, 1, 2)
  assert out.shape == ref.shape
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert err < rtol, err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_unet_same_function_and_exact_round_trip(name, tmp_path):
  cfg = CONFIGS[name]
  model = _perturbed(diffusers.UNet2DModel(**cfg))
  model.save_pretrained(tmp_path, safe_serialization=True)
  assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors")
  pt = load_pretrained(str(tmp_path), conv_impl="xla")
  labels = [1, 4] if cfg.get("num_class_embeds") else None
  ref_y = None if labels is None else torch.tensor(labels)
  size = cfg["sample_size"]
  _compare(
    pt,
    lambda x, t: model(x, t, class_labels=ref_y).sample,
    shape=(size, size, cfg["in_channels"]),
    labels=labels,
  )
  sd, ref = pt.state_dict(), model.state_dict()
  assert sorted(sd) == sorted(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_diffusers_real_cifar10_size(tmp_path):
  """google/ddpm-cifar10-32's architecture at full size (35.7M parameters), batch 1."""
  model = _perturbed(diffusers.UNet2DModel(**CIFAR10))
  model.save_pretrained(tmp_path, safe_serialization=True)
  pt = load_pretrained(str(tmp_path), conv_impl="xla")  # compiles 7x faster than Winograd
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(pt.params))
  assert n == sum(p.numel() for p in model.parameters())
  assert 35.7e6 < n < 35.8e6  # DDPM's CIFAR-10 model, 35.7M parameters (Ho et al. 2020, App. B)
  _compare(pt, lambda x, t: model(x, t).sample, shape=(32, 32, 3), t=(500,))


def test_deprecated_attention_key_names(tmp_path):
  """Checkpoints saved before diffusers 0.14 (the google/ddpm-* hub files) name the
  attention weights query / key / value / proj_attn: same params."""
  from safetensors.numpy import save_file

  cfg = TINY
  model = _perturbed(diffusers.UNet2DModel(**cfg))
  new = {k: v.numpy() for k, v in model.state_dict().items()}
  renames = {
    ".to_q.": ".query.",
    ".to_k.": ".key.",
    ".to_v.": ".value.",
    ".to_out.0.": ".proj_attn.",
  }
  old = {}
  for k, v in new.items():
    for a, b in renames.items():
      k = k.replace(a, b)
    old[k] = v
  assert old.keys() != new.keys()
  save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **cfg}))
  a = load_pretrained(str(tmp_path))
  b = build("diffusers", new, config=cfg)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert sorted(a.state_dict()) == sorted(old)


def test_unsupported_and_mismatched_configs_are_clear_errors():
  cfg = TINY
  sd = {k: v.numpy() for k, v in diffusers.UNet2DModel(**cfg).state_dict().items()}
  with pytest.raises(ValueError, match="time_embedding_type='fourier'"):
    build("diffusers", sd, config=dict(cfg, time_embedding_type="fourier"))
  with pytest.raises(ValueError, match="missing keys"):
    build("diffusers", sd, config=dict(cfg, layers_per_block=3))
  with pytest.raises(ValueError, match="ResnetDownsampleBlock2D"):
    build("diffusers", sd, config=dict(cfg, down_block_types=("ResnetDownsampleBlock2D",) * 2))
  with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub name"):
    load_pretrained("./no/such/dir")


# ----------------------------------------------------------------------------- ADM

ADM_CASES = {
  # ImageNet-64-like: class labels, learned sigma, BigGAN up/down, head channels, new qkv order.
  "guided_imagenet_like": (
    dict(
      image_size=16,
      num_channels=32,
      num_res_blocks=2,
      channel_mult="1,2",
      attention_resolutions="8",
      class_cond=True,
      num_classes=5,
      learn_sigma=True,
      resblock_updown=True,
      use_new_attention_order=True,
      num_head_channels=16,
      use_scale_shift_norm=True,
    ),
    "guided",
  ),
  # improved-diffusion: additive time conditioning, 2 legacy-order heads, T = 4000 rescaled.
  "improved_legacy": (
    dict(
      image_size=16,
      num_channels=32,
      num_res_blocks=1,
      channel_mult="1,2,2",
      attention_resolutions="16,4",
      num_heads=2,
      use_scale_shift_norm=False,
      diffusion_steps=4000,
    ),
    "improved",
  ),
}


def _adm_reference(flags, variant, *, device=None):
  from tests.adm_torch import UNetModel

  f = adm.complete_flags(flags, variant=variant)
  size = f["image_size"]
  mult = adm._ints(f["channel_mult"]) if f["channel_mult"] else adm.CHANNEL_MULT[size]
  with torch.device(device or "cpu"):
    return UNetModel(
      in_channels=3,
      model_channels=f["num_channels"],
      out_channels=6 if f["learn_sigma"] else 3,
      num_res_blocks=f["num_res_blocks"],
      attention_resolutions=tuple(size // r for r in adm._ints(f["attention_resolutions"])),
      channel_mult=mult,
      num_classes=f["num_classes"] if f["class_cond"] else None,
      num_heads=f["num_heads"],
      num_head_channels=f["num_head_channels"],
      use_scale_shift_norm=f["use_scale_shift_norm"],
      resblock_updown=f["resblock_updown"],
      use_new_attention_order=f["use_new_attention_order"],
    )


@pytest.mark.parametrize("name", sorted(ADM_CASES))
def test_adm_same_function_and_exact_round_trip(name, tmp_path):
  flags, variant = ADM_CASES[name]
  model = _perturbed(_adm_reference(flags, variant))
  path = tmp_path / "model.pt"
  torch.save(model.state_dict(), path)
  pt = load_pretrained(str(path), format="adm", flags=flags, variant=variant, conv_impl="xla")
  labels = [1, 4] if flags.get("class_cond") else None
  ref_y = None if labels is None else torch.tensor(labels)
  # improved-diffusion's wrapper feeds the model t * 1000 / T (rescale_timesteps).
  scale = pt.module.timestep_scale
  _compare(
    pt,
    lambda x, t: model(x, t.float() * scale, ref_y),
    shape=(16, 16, 3),
    labels=labels,
    t=(3, 1500),
  )
  sd, ref = pt.state_dict(), model.state_dict()
  assert sorted(sd) == sorted(ref)
  for k, v in ref.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_adm_improved_flags_under_the_guided_variant_are_an_error(tmp_path):
  """improved-diffusion's T = 4000 models read with guided-diffusion's defaults would see
  t instead of t * 1000 / T (relative error 0.2 in the output): an error naming the
  variant, unless rescale_timesteps is given."""
  flags, variant = ADM_CASES["improved_legacy"]
  assert variant == "improved" and flags["diffusion_steps"] == 4000
  model = _perturbed(_adm_reference(flags, variant))
  path = tmp_path / "model.pt"
  torch.save(model.state_dict(), path)
  with pytest.raises(ValueError, match="adm_variant='improved'"):
    load_pretrained(str(path), format="adm", flags=flags)
  explicit = load_pretrained(
    str(path), format="adm", flags=dict(flags, rescale_timesteps=True), conv_impl="xla"
  )
  assert explicit.module.timestep_scale == 0.25
  _compare(explicit, lambda x, t: model(x, t.float() / 4, None), shape=(16, 16, 3), t=(3, 1500))
  plain = load_pretrained(str(path), format="adm", flags=dict(flags, rescale_timesteps=False))
  assert plain.module.timestep_scale == 1.0  # asked for: guided's convention


# The README flags of the released checkpoints (guided-diffusion).
RELEASED = {
  "imagenet64_cond": "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
  "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
  "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True "
  "--use_fp16 True --use_scale_shift_norm True",
  "lsun256_uncond": "--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 "
  "--dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
  "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
  "--use_scale_shift_norm True",
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_adm_released_architectures_keys_and_shapes(name):
  """At the released sizes (no weights: torch's meta device, jax.eval_shape): the rules
  cover exactly the reference's keys and turn each of its shapes into jdiff's."""
  flags = adm.parse_flags(RELEASED[name])
  ref = {
    k: tuple(v.shape)
    for k, v in _adm_reference(flags, "guided", device="meta").state_dict().items()
  }
  kwargs, shape = adm.unet_kwargs(flags)
  from jdiff.models.unet import UNet

  shapes = mapping.param_shapes(
    UNet(**kwargs, conv_impl="xla"),
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
    conditional=flags["class_cond"],
  )
  rules = adm.rules(kwargs, shapes, new_attention_order=flags.get("use_new_attention_order", False))
  mapping.check_rules(rules, shapes)
  mapping.check_keys(rules, ref, what=name)
  for rule in rules:
    views = [np.broadcast_to(np.float32(0), ref[k]) for k in rule.torch]
    for path, value in zip(rule.flax, rule.to_flax(*views), strict=True):
      assert tuple(value.shape) == shapes[path], (rule.torch, path)


# ----------------------------------------------------------------------------- schedules

SCHEDULER_CASES = [
  dict(beta_schedule="linear"),
  dict(beta_schedule="linear", num_train_timesteps=500, beta_start=2e-4, beta_end=0.03),
  dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
  dict(beta_schedule="squaredcos_cap_v2"),
  dict(beta_schedule="sigmoid"),
  dict(trained_betas=list(np.linspace(1e-4, 0.05, 200))),
  dict(
    beta_schedule="scaled_linear", rescale_betas_zero_snr=True, beta_start=0.00085, beta_end=0.012
  ),
]


@pytest.mark.parametrize("cfg", SCHEDULER_CASES, ids=lambda c: c.get("beta_schedule", "trained"))
def test_schedules_equal_diffusers_alphas_cumprod(cfg):
  ref = diffusers.DDPMScheduler(**cfg)
  s = schedulers.from_diffusers(dict(ref.config))
  np.testing.assert_allclose(
    np.asarray(s.schedule.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6, rtol=0
  )
  if not cfg.get("rescale_betas_zero_snr"):  # diffusers derives those in float32: 2e-4 rel.
    np.testing.assert_allclose(
      np.asarray(s.schedule.betas), ref.betas.numpy(), rtol=1e-4, atol=1e-7
    )


def test_scheduler_settings():
  s = schedulers.from_diffusers(
    dict(
      prediction_type="v_prediction",
      clip_sample=True,
      clip_sample_range=2.0,
      variance_type="fixed_large",
      timestep_spacing="trailing",
    )
  )
  assert (s.prediction, s.variance, s.clip_x0, s.spacing) == ("v", "fixed_large", 2.0, "trailing")
  s = schedulers.from_diffusers(dict(prediction_type="sample", clip_sample=False))
  assert (s.prediction, s.clip_x0, s.spacing) == ("x0", 0.0, None) and s.notes  # leading: a note
  with pytest.raises(ValueError, match="beta_schedule='exp'"):
    schedulers.from_diffusers(dict(beta_schedule="exp"))
  a = schedulers.from_adm(
    dict(
      noise_schedule="cosine", diffusion_steps=4000, learn_sigma=True, timestep_respacing="ddim25"
    )
  )
  # IDDPM eq. 17 with s = 0.008, written out independently.
  f = np.cos((np.arange(4001) / 4000 + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(
    np.asarray(a.schedule.alphas_cumprod),
    np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999)),
    atol=1e-6,
  )
  assert (a.variance, a.sampler, a.num_steps, a.eta, a.clip_x0) == (
    "learned_range",
    "ddim",
    25,
    0.0,
    1.0,
  )
  b = schedulers.from_adm(dict(predict_xstart=True, timestep_respacing="250"))
  np.testing.assert_allclose(np.asarray(b.schedule.betas), np.linspace(1e-4, 0.02, 1000), atol=1e-9)
  assert (b.prediction, b.variance, b.num_steps, b.eta) == ("x0", "fixed_large", 250, 1.0)


SAMPLER_ONLY = (  # diffusers schedulers without clip_sample: they never clip x0
  "PNDMScheduler",
  "EulerDiscreteScheduler",
  "EulerAncestralDiscreteScheduler",
  "UniPCMultistepScheduler",
  "DEISMultistepScheduler",
  "DPMSolverMultistepScheduler",
)


@pytest.mark.parametrize("name", sorted(schedulers.CLASS_DEFAULTS))
def test_scheduler_class_defaults_are_diffusers_constructor_defaults(name):
  """Each class's table entry is the installed diffusers class's __init__ default, or for an
  option the class does not have, that option switched off."""
  import inspect

  params = inspect.signature(getattr(diffusers, name).__init__).parameters
  for key, value in schedulers.CLASS_DEFAULTS[name].items():
    want = params[key].default if key in params else schedulers._WITHOUT[key]
    assert value == want, (name, key, value, want)


@pytest.mark.parametrize("name", SAMPLER_ONLY)
def test_schedulers_without_clip_sample_do_not_clip(name):
  cls = getattr(diffusers, name)
  s = schedulers.from_diffusers(json.loads(cls().to_json_string()))  # save_config's json
  assert (s.clip_x0, s.dynamic_threshold, s.variance) == (0.0, 0.0, "fixed_small")
  np.testing.assert_allclose(
    np.asarray(s.schedule.alphas_cumprod), cls().alphas_cumprod.numpy(), atol=1e-6
  )


def test_scheduler_class_defaults_fill_omitted_keys_and_set_alpha_to_one_is_noted():
  heun = schedulers.from_diffusers({"_class_name": "HeunDiscreteScheduler"})
  np.testing.assert_allclose(
    np.asarray(heun.schedule.alphas_cumprod),
    diffusers.HeunDiscreteScheduler().alphas_cumprod.numpy(),
    atol=1e-6,
  )
  ddim = schedulers.from_diffusers({"_class_name": "DDIMScheduler"})
  assert ddim.clip_x0 == 1.0 and not any("set_alpha_to_one" in n for n in ddim.notes)
  for cfg in (
    {"_class_name": "DDIMScheduler", "set_alpha_to_one": False},
    {"_class_name": "PNDMScheduler"},  # PNDM's default is False
  ):
    s = schedulers.from_diffusers(cfg)
    assert any("set_alpha_to_one=False" in n for n in s.notes), (cfg, s.notes)


def test_unreadable_scheduler_config_warns_and_loads_the_unet(caplog):
  sd = {k: v.numpy() for k, v in diffusers.UNet2DModel(**TINY).state_dict().items()}
  dpm = json.loads(diffusers.DPMSolverMultistepScheduler().to_json_string())
  assert dpm["variance_type"] is None
  assert build("diffusers", sd, config=TINY, scheduler=dpm).settings.clip_x0 == 0.0
  bad = dict(dpm, beta_schedule="exp")
  with caplog.at_level("WARNING"):
    pt = build("diffusers", sd, config=TINY, scheduler=bad, source="tiny")
  assert pt.settings is None and pt.params
  lines = [r.getMessage() for r in caplog.records if "scheduler config" in r.getMessage()]
  assert len(lines) == 1 and "beta_schedule='exp'" in lines[0] and "\n" not in lines[0]


RESPACINGS = [
  (1000, "ddim25"),
  (1000, "ddim50"),
  (4000, "ddim100"),
  (1000, "250"),
  (1000, "50"),
  (1000, "27"),
  (4000, "250"),
  (1000, "10,20,30"),
  (100, "1,2,3,4"),
  (101, "7,0,9"),
  (1000, "1000"),
]


@pytest.mark.parametrize("steps,resp", RESPACINGS)
def test_space_timesteps_is_adms(steps, resp):
  from jdiff.pretrained.respace import space_timesteps
  from tests import adm_torch

  ours = space_timesteps(steps, resp)
  assert ours.tolist() == sorted(adm_torch.space_timesteps(steps, resp))
  with pytest.raises(ValueError, match="timestep_respacing='ddim40'"):
    space_timesteps(100, "ddim40")


def _toy_model(x, t, xp):
  """A smooth stand-in network (numpy or jax): eps and variance values from x and t."""
  s = xp.reshape(t / 100.0, (-1,) + (1,) * (x.ndim - 1)) if xp is jnp else t / 100.0
  return xp.concatenate([0.6 * x * xp.cos(s) + 0.1 * s, xp.tanh(x + s) * 0.9], axis=-1)


@pytest.mark.parametrize(
  "variance,resp", [("learned_range", "10"), ("fixed_large", "3,4,5"), ("learned_range", "2,5")]
)
def test_adm_sample_is_adms_respaced_p_sample_loop(variance, resp):
  from jdiff.pretrained.respace import adm_sample, space_timesteps
  from jdiff.schedules import cosine
  from tests import adm_torch

  schedule, shape, rng = cosine(100), (2, 4, 4, 3), jax.random.key(3)
  x_T = jax.random.normal(jax.random.key(1), shape)
  ts = space_timesteps(100, resp)
  learned = variance == "learned_range"

  def model_fn(x, t, cond):
    out = _toy_model(x, t.astype(jnp.float32), jnp)
    return out if learned else out[..., :3]

  got = adm_sample(schedule, model_fn, x_T, rng, timesteps=ts, variance=variance, clip_x0=1.0)
  noises = [
    np.asarray(jax.random.normal(jax.random.fold_in(rng, k), shape)) for k in range(len(ts))
  ]
  ref = adm_torch.spaced_p_sample_loop(
    np.asarray(schedule.alphas_cumprod, np.float64),
    set(ts.tolist()),
    lambda x, t: _toy_model(x, float(t), np)[..., : 6 if learned else 3],
    np.asarray(x_T, np.float64),
    noises,
    model_var_type=variance,
  )
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5, rtol=0)  # float32: 2e-7


def test_ddim_eta_1_on_adms_grid_is_adms_fixed_small_chain():
  """What the CLI runs for ADM's 'N' respacing (DDIM, eta 1, linspace) is ADM's ancestral
  chain on that grid with the respaced posterior variance."""
  from jdiff.pretrained.respace import adm_sample
  from jdiff.samplers.ddim import ddim_sample
  from jdiff.samplers.denoisers import make_denoiser
  from jdiff.samplers.grids import timestep_grid
  from jdiff.schedules import cosine

  s = schedulers.from_adm(dict(diffusion_steps=100, timestep_respacing="10", sigma_small=True))
  assert (s.sampler, s.num_steps, s.eta, s.spacing, s.notes) == ("ddim", 10, 1.0, "linspace", ())
  schedule, shape, rng = cosine(100), (2, 4, 4, 3), jax.random.key(3)
  x_T = jax.random.normal(jax.random.key(1), shape)
  model_fn = lambda x, t, c: _toy_model(x, t.astype(jnp.float32), jnp)[..., :3]  # noqa: E731
  denoise = make_denoiser(schedule, model_fn, space="vp", clip_x0=1.0)
  a = ddim_sample(denoise, x_T, timestep_grid(100, 10, spacing="linspace"), rng, eta=1.0)
  b = adm_sample(
    schedule, model_fn, x_T, rng, timesteps=s.timesteps, variance="fixed_small", clip_x0=1.0
  )
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_adm_sampler_settings_replace_config_sample_and_are_logged():
  from jdiff.configs import pretrained
  from jdiff.pretrained import respace
  from jdiff.runs.pretrained import apply_settings

  flags = dict(diffusion_steps=1000, learn_sigma=True, noise_schedule="cosine")
  cases = {
    "250": ("ddim", 250, 1.0, "linspace"),
    "ddim25": ("ddim", 25, 0.0, "trailing"),
    "1000": ("ddpm", 50, None, "auto"),  # ddpm: every timestep, num_steps unused
  }
  for resp, want in cases.items():
    s = schedulers.from_adm(dict(flags, timestep_respacing=resp))
    np.testing.assert_array_equal(s.timesteps, respace.space_timesteps(1000, resp))
    c = pretrained.get_config()
    with c.unlocked():
      notes = apply_settings(c, s, scheduler_sampling=True)
    got = (c.sample.sampler, c.sample.num_steps, c.sample.eta, c.sample.spacing)
    assert got == want, (resp, got)
    assert c.sample.clip_x0 == 1.0 and c.diffusion.variance == "learned_range"
    assert any("replaced by the publisher's" in n for n in notes), notes
    learned_unused = [n for n in (*s.notes, *notes) if "variance" in n]
    assert bool(learned_unused) == (want[0] != "ddpm"), (resp, learned_unused)
  c = pretrained.get_config()
  with c.unlocked():
    apply_settings(c, s, scheduler_sampling=False)
  assert (c.sample.sampler, c.sample.num_steps) == ("ddim", 50)


# ----------------------------------------------------------------------------- loading


def test_hub_name_offline_is_one_clear_error(monkeypatch, tmp_path):
  pytest.importorskip("huggingface_hub")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  import huggingface_hub.constants

  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(OSError, match="could not fetch 'google/ddpm-cifar10-32'") as e:
    hub_download("google/ddpm-cifar10-32")
  assert "\n" not in str(e.value)


# A pipeline repository (the layout of google/ddpm-cifar10-32's later revisions and of
# Stable Diffusion's): only the U-Net and its scheduler are to be fetched.
PIPELINE_FILES = [
  "README.md",
  "model_index.json",
  "scheduler/scheduler_config.json",
  "unet/config.json",
  "unet/diffusion_pytorch_model.safetensors",
  "unet/diffusion_pytorch_model.fp16.safetensors",
  "unet/diffusion_pytorch_model.bin",
  "vae/config.json",
  "vae/diffusion_pytorch_model.safetensors",
  "text_encoder/config.json",
  "text_encoder/model.safetensors",
  "safety_checker/model.safetensors",
  "tokenizer/vocab.json",
  "feature_extractor/preprocessor_config.json",
]


@pytest.mark.parametrize("torch_weights", [False, True])
def test_hub_download_names_the_unet_and_scheduler_files(monkeypatch, tmp_path, torch_weights):
  hub = pytest.importorskip("huggingface_hub")
  from huggingface_hub.utils import filter_repo_objects

  calls = []

  def fake_snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kw):
    calls.append(allow_patterns)
    return str(tmp_path)

  monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
  assert hub_download("owner/pipeline", torch_weights=torch_weights) == str(tmp_path)
  # snapshot_download selects files with this function (fnmatch, where * matches '/').
  fetched = set(filter_repo_objects(PIPELINE_FILES, allow_patterns=calls[0]))
  want = {"scheduler/scheduler_config.json", "unet/config.json"}
  want |= {"unet/diffusion_pytorch_model.safetensors"}
  want |= {"unet/diffusion_pytorch_model.bin"} if torch_weights else set()
  assert fetched == want
  root = [p.split("/")[-1] for p in PIPELINE_FILES if p.startswith("unet/")] + [
    "scheduler_config.json",
    "model_index.json",
  ]
  fetched = set(filter_repo_objects(root, allow_patterns=calls[0]))
  assert fetched == {p.split("/")[-1] for p in want}


_SHARDED = r"""
import sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jdiff.pretrained import load_pretrained
assert jax.device_count() == 4
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
def spec(path, shape):  # shard the last (output-channel) axis where it divides
  return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "fsdp") if shape[-1] % 4 == 0 else P())
full = load_pretrained(sys.argv[1])
sharded = load_pretrained(sys.argv[1], shardings=spec)
n_sharded = 0
pairs = zip(jax.tree_util.tree_leaves_with_path(full.params), jax.tree.leaves(sharded.params))
for (path, a), b in pairs:
  assert b.sharding == spec(path, b.shape), path
  if b.shape[-1] % 4 == 0:
    n_sharded += 1
    assert {s.data.shape[-1] for s in b.addressable_shards} == {b.shape[-1] // 4}
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert n_sharded > 10, n_sharded
print("SHARDED_OK", n_sharded)
"""


def test_sharded_restore_onto_a_mesh(tiny_dir):
  proc = run_python(["-c", _SHARDED, tiny_dir], devices=4)
  assert "SHARDED_OK" in proc.stdout


# ----------------------------------------------------------------------------- entry point


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_diffusers")
  _perturbed(diffusers.UNet2DModel(**TINY)).save_pretrained(d, safe_serialization=True)
  diffusers.DDPMScheduler(
    num_train_timesteps=50, clip_sample=True, variance_type="fixed_large"
  ).save_config(d)
  return str(d)


def _pretrained_config(tiny_dir, digits_dir, **overrides):
  from jdiff.configs import pretrained

  c = pretrained.get_config()
  c.pretrained.path = tiny_dir
  c.data.name, c.data.image_size, c.data.data_dir, c.data.random_flip = (
    "jdiff_digits",
    16,
    digits_dir,
    False,
  )
  c.sample.num_steps, c.sample.num_samples, c.sample.grid_size, c.sample.batch_size = 3, 4, 4, 4
  c.train.num_steps, c.train.batch_size, c.train.log_every, c.train.ckpt_every = 1, 8, 1, 1
  c.eval.batch_size = 200
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = v
  return c


def test_cli_samples_an_imported_model(tmp_path, tiny_dir, digits_dir):
  args = main_args(
    "sample",
    str(tmp_path / "wd"),
    digits_dir,
    config="pretrained",
    **{
      "pretrained.path": tiny_dir,
      "data.name": "jdiff_digits",
      "data.image_size": 16,
      "sample.num_steps": 3,
      "sample.num_samples": 4,
      "sample.grid_size": 4,
      "sample.batch_size": 4,
    },
  )
  run_python(args)
  out = np.load(tmp_path / "wd" / "samples" / "samples_ddim3_step0.npz")
  images = out["images"]
  assert images.shape == (4, 16, 16, 1) and np.all(np.isfinite(images))
  assert np.abs(images).max() <= 1.0 + 1e-6  # scheduler_config's clip_sample


def _fourier_dir(tmp_path, tiny_dir):
  import shutil

  d = tmp_path / "fourier"
  shutil.copytree(tiny_dir, d)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, time_embedding_type="fourier")))
  return str(d), "FATAL PretrainedError: config.json: time_embedding_type='fourier'"


def _improved_under_guided(tmp_path, tiny_dir):
  flags, _ = ADM_CASES["improved_legacy"]
  d = tmp_path / "adm"
  d.mkdir()
  torch.save(_adm_reference(flags, "improved").state_dict(), d / "model.pt")
  (d / "flags.json").write_text(json.dumps(flags))
  return str(d), "FATAL PretrainedError: ADM flags: diffusion_steps=4000 with variant 'guided'"


@pytest.mark.parametrize("case", [_fourier_dir, _improved_under_guided])
def test_cli_bad_pretrained_input_is_one_fatal_line(tmp_path, tiny_dir, digits_dir, case):
  path, want = case(tmp_path, tiny_dir)
  fmt = "adm" if case is _improved_under_guided else "diffusers"
  args = main_args(
    "sample",
    str(tmp_path / "wd"),
    digits_dir,
    config="pretrained",
    **{"pretrained.path": path, "pretrained.format": fmt, "data.name": "jdiff_digits"},
  )
  proc = run_python(args, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(want), last


def test_eval_and_finetune_start_from_the_imported_weights(tmp_path, tiny_dir, digits_dir):
  from jdiff.runs import diffusion

  res = diffusion.evaluate(_pretrained_config(tiny_dir, digits_dir), str(tmp_path / "ev"))
  assert np.isfinite(res["eval/loss"]) and res["eval/examples"] > 0
  cfg = _pretrained_config(tiny_dir, digits_dir)
  state = diffusion.train_and_evaluate(cfg, str(tmp_path / "ft"))
  imported = load_pretrained(tiny_dir).params
  # One Adam step of lr 2e-5 moves each weight by at most ~2e-5; a fresh init is O(0.1) away.
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, imported)
  assert 0 < max(jax.tree.leaves(diffs)) < 5e-5
  assert int(state.step) == 1
