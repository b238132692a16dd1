"""Every rule a config must satisfy, in one place, checked once before any work.

`validate(config)` raises a ValueError naming the bad key and value (and what is accepted)
for both kinds of config: diffusion (jdiff/configs/default.py and its variants) and stage-1
autoencoder configs (those with an `autoencoder` section, e.g. ae_digits.py). It reads no
file but the ones the config names (Inception weights) and builds nothing; `jdiff.runs.setup.
Setup` calls it first, so a bad value stops a run before the dataset, the mesh or the
workdir's lock are touched (`distilled.resolve` then settles the sampler 'auto').
"""

from __future__ import annotations

import math
import os

import jax

from jdiff.data import captions
from jdiff.models.guidance_schedules import SCALE_SCHEDULES
from jdiff.models.layers import DTYPES, NORM_IMPLS
from jdiff.ops.attention import ATTENTION_IMPLS
from jdiff.ops.winograd import CONV_IMPLS
from jdiff.runs import feature_nets, objectives
from jdiff.runs.distilled import sampler_of
from jdiff.runs.validate_modes import check_distill, check_text2image  # noqa: F401
from jdiff.samplers.registry import FLOW_SAMPLERS, resolve_options
from jdiff.schedules import get_schedule
from jdiff.training import sharding
from jdiff.training.optim import make_optimizer
from jdiff.training.prng import PRNG_IMPLS

KINDS = ("diffusion", "autoencoder")
SECTIONS = {
  "diffusion": ("data", "model", "diffusion", "optim", "train", "sample", "eval", "latent"),
  "autoencoder": ("data", "autoencoder", "loss", "optim", "train", "eval"),
}
FEATURE_NETS = ("auto", "digits", "inception", "audio")

_INT, _FLOAT = "an integer", "a finite number"
# (key, kind, low, high, low inclusive, high inclusive, None allowed). A key a config lacks is
# skipped.
_RANGES = (
  ("train.num_steps", _INT, 1, None, True, None, False),
  ("train.batch_size", _INT, 1, None, True, None, False),
  ("train.keep_checkpoints", _INT, 1, None, True, None, False),
  ("train.log_every", _INT, 1, None, True, None, False),  # the loop logs when step % it == 0
  ("train.ckpt_every", _INT, 0, None, True, None, False),  # 0: only at the end
  ("train.sample_every", _INT, 0, None, True, None, False),
  ("train.grad_accum_steps", _INT, 1, None, True, None, False),
  ("train.preemption_check_every", _INT, 1, None, True, None, False),
  ("train.label_dropout", _FLOAT, 0.0, 1.0, True, False, False),
  ("mesh.fsdp_min_size", _INT, 0, None, True, None, False),
  ("text.max_length", _INT, 3, None, True, None, False),
  ("text.width", _INT, 1, None, True, None, False),
  ("text.num_layers", _INT, 1, None, True, None, False),
  ("text.heads", _INT, 1, None, True, None, False),
  ("text.mlp_dim", _INT, 1, None, True, None, False),
  ("ema_decay", _FLOAT, 0.0, 1.0, True, False, False),
  ("data.image_size", _INT, 0, None, True, None, False),
  ("model.ch", _INT, 1, None, True, None, False),
  ("model.num_res_blocks", _INT, 1, None, True, None, False),
  ("model.num_heads", _INT, 1, None, True, None, False),
  ("model.head_channels", _INT, 1, None, True, None, True),
  ("model.dropout", _FLOAT, 0.0, 1.0, True, False, False),
  ("model.num_groups", _INT, 1, None, True, None, False),
  ("diffusion.num_steps", _INT, 1, None, True, None, False),
  ("diffusion.min_snr_gamma", _FLOAT, 0.0, None, False, None, False),
  ("diffusion.vlb_weight", _FLOAT, 0.0, None, True, None, False),
  ("optim.lr", _FLOAT, 0.0, None, False, None, False),
  ("optim.warmup_steps", _INT, 0, None, True, None, False),
  ("optim.grad_clip", _FLOAT, 0.0, None, True, None, True),
  ("optim.b1", _FLOAT, 0.0, 1.0, True, False, False),
  ("optim.b2", _FLOAT, 0.0, 1.0, True, False, False),
  ("optim.eps", _FLOAT, 0.0, None, False, None, False),
  ("optim.weight_decay", _FLOAT, 0.0, None, True, None, False),
  ("sample.num_steps", _INT, 1, None, True, None, False),
  ("sample.eta", _FLOAT, 0.0, None, True, None, True),
  ("sample.clip_x0", _FLOAT, None, None, None, None, False),
  ("sample.guidance_scale", _FLOAT, None, None, None, None, False),
  ("sample.guidance_rescale", _FLOAT, 0.0, 1.0, True, True, False),
  ("sample.num_samples", _INT, 1, None, True, None, False),
  ("sample.grid_size", _INT, 1, None, True, None, False),
  ("sample.batch_size", _INT, 1, None, True, None, False),
  ("eval.batch_size", _INT, 1, None, True, None, False),
  ("eval.bound_examples", _INT, 0, None, True, None, False),
  ("eval.num_recon_images", _INT, 0, None, True, None, False),
  ("eval.num_samples", _INT, 2, None, True, None, False),
  ("eval.quality_samples", _INT, 0, None, True, None, False),
  ("eval.is_splits", _INT, 1, None, True, None, False),
  ("eval.pr_samples", _INT, 0, None, True, None, False),
  ("eval.pr_k", _INT, 1, None, True, None, False),
  ("eval.classifier_steps", _INT, 1, None, True, None, False),
  ("latent.scale_factor", _FLOAT, 0.0, None, True, None, False),
  ("loss.kl_weight", _FLOAT, 0.0, None, True, None, False),
)
_MISSING = object()


def kind_of(config) -> str:
  """'autoencoder' for a stage-1 config (it has an `autoencoder` section), else 'diffusion'."""
  return "autoencoder" if "autoencoder" in config else "diffusion"


def validate(config) -> None:
  """Raises ValueError naming the first bad key / value: shared rules, then the kind's own."""
  kind = kind_of(config)
  for section in SECTIONS[kind]:
    if section not in config:
      raise ValueError(f"{kind} config is missing the section {section!r}")
  if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
    raise ValueError(f"config.seed must be an int in [0, 2**32), got {config.seed!r}")
  check_ranges(config)
  if (impl := config.train.get("prng_impl", "threefry")) not in PRNG_IMPLS:
    raise ValueError(f"config.train.prng_impl must be one of {tuple(PRNG_IMPLS)}, got {impl!r}")
  try:  # optax transforms only: the optimiser's own checks (names, lr schedule vs steps)
    make_optimizer(total_steps=config.train.num_steps, **config.optim)
  except ValueError as e:
    raise ValueError(f"config.optim: {e}") from None
  if kind == "diffusion":
    _check_diffusion(config)
  else:
    _check_autoencoder(config)


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return _MISSING
    node = node[part]
  return node


def _range_text(kind, low, high, low_inc, high_inc) -> str:
  if low is None and high is None:
    return kind
  if high is None:
    return f"{kind} {'>=' if low_inc else '>'} {low}"
  return f"{kind} in {'[' if low_inc else '('}{low}, {high}{']' if high_inc else ')'}"


def _in_range(value, kind, low, high, low_inc, high_inc) -> bool:
  if isinstance(value, bool) or not isinstance(value, int if kind == _INT else (int, float)):
    return False
  if not math.isfinite(value):
    return False
  if low is not None and (value < low or (value == low and not low_inc)):
    return False
  return high is None or value < high or (value == high and high_inc)


def check_ranges(config) -> None:
  """The numeric keys against `_RANGES`; the U-Net's group norm; guidance needs classes."""
  for key, kind, low, high, low_inc, high_inc, allow_none in _RANGES:
    value = _get(config, key)
    if value is _MISSING or (value is None and allow_none):
      continue
    if not _in_range(value, kind, low, high, low_inc, high_inc):
      what = _range_text(kind, low, high, low_inc, high_inc)
      raise ValueError(
        f"config.{key} must be {what}{' or None' if allow_none else ''}, got {value!r}"
      )
  model = _get(config, "model")
  if model is not _MISSING:
    for m in model.ch_mult:
      if not isinstance(m, int) or m < 1 or (model.ch * m) % model.num_groups:
        raise ValueError(
          f"config.model.ch_mult={tuple(model.ch_mult)}: every entry must be a positive "
          f"integer with config.model.ch * entry divisible by config.model.num_groups="
          f"{model.num_groups} (group norm); got the entry {m!r}"
        )
  scale = _get(config, "sample.guidance_scale")
  if scale is not _MISSING and scale != 1.0 and not config.conditional:
    raise ValueError(
      f"config.sample.guidance_scale={scale} needs a conditional model (config.conditional="
      "True, trained with config.train.label_dropout > 0); an unconditional model has "
      "nothing to guide, so use 1.0"
    )


# ----------------------------------------------------------------------------- diffusion


def _check_diffusion(config) -> None:
  c = config
  if c.train.label_dropout and not c.conditional:
    raise ValueError("config.train.label_dropout > 0 needs config.conditional=True")
  _check_model(c)
  d = c.diffusion
  try:  # a few small arrays: the schedule's own checks of its name and step count
    get_schedule(d.schedule, d.num_steps, zero_terminal_snr=d.zero_terminal_snr)
  except ValueError as e:
    raise ValueError(f"config.diffusion.schedule: {e}") from None
  _check_objective(c)
  check_sample(c.sample, latent=bool(c.latent.autoencoder_workdir), objective=c.objective)
  _check_eval(c)
  if c.get("distill") is not None:
    check_distill(c)
  if c.get("text") is not None:
    _check_text(c)
  if c.get("superres") is not None and c.superres.factor:
    sr, size = c.superres, c.data.image_size
    if sr.factor < 2 or (size and size % sr.factor):
      raise ValueError(
        f"config.superres.factor must be >= 2 and divide data.image_size={size}, got {sr.factor}"
      )
    if c.conditional:
      raise ValueError("config.superres.factor > 0 conditions on images: set conditional=False")
    for key in ("aug_max", "aug_level"):
      if not 0.0 <= sr[key] < 1.0:
        raise ValueError(f"config.superres.{key} must be in [0, 1), got {sr[key]}")
  steps = tuple(c.train.profile_steps)
  if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 0 <= steps[0] <= steps[1]:
    raise ValueError(
      f"config.train.profile_steps must be two integers (a, b) with 0 <= a <= b, got {steps!r}"
    )
  if c.train.grad_accum_steps > 1 and c.objective != "ddpm":
    raise ValueError(
      f"config.train.grad_accum_steps={c.train.grad_accum_steps} needs "
      f"config.objective='ddpm', got {c.objective!r} (its noise levels are drawn per call)"
    )
  sharding.mesh_shape(jax.device_count(), data=c.mesh.data, fsdp=c.mesh.fsdp)


def _check_text(c) -> None:
  """A text-conditioned model: generated digit captions (`config.text`, t2i_digits.py) or an
  imported SD pipeline fine-tuned on a caption folder (sd_finetune.py)."""
  t = c.text
  if t.captions not in ("digits", "folder"):
    raise ValueError(f"config.text.captions must be 'digits' or 'folder', got {t.captions!r}")
  if t.captions == "folder":
    if not c.get("pretrained") or not c.pretrained.path:
      raise ValueError("config.text.captions='folder' fine-tunes config.pretrained.path: set it")
    if not os.path.isdir(t.folder):
      raise ValueError(f"config.text.folder={t.folder!r} is not a directory")
    if not c.conditional:
      raise ValueError("config.text (captions) needs config.conditional=True, got False")
    return
  if t.width % t.heads:
    raise ValueError(f"config.text.width={t.width} must be divisible by text.heads={t.heads}")
  needs = dict(conditional=(c.conditional, True), objective=(c.objective, "ddpm"))
  needs["model.arch"] = (c.model.arch, "unet")
  for key, (value, want) in needs.items():
    if value != want:
      raise ValueError(f"config.text (captions) needs config.{key}={want!r}, got {value!r}")
  for key, on in (
    ("superres.factor", c.superres.factor),
    ("flow.reflow_pairs", c.flow.reflow_pairs),
    ("distill", c.get("distill") is not None),
  ):
    if on:
      raise ValueError(f"config.text (captions) does not combine with config.{key}")
  need = captions.longest_caption()
  if t.max_length < need:
    raise ValueError(
      f"config.text.max_length={t.max_length} is shorter than the longest caption ({need} "
      "tokens with BOS and EOS)"
    )
  try:
    s = c.sample
    for p in (*s.get("prompts", ()), s.get("negative_prompt", "")):
      captions.tokenize(p, max_length=t.max_length)
  except ValueError as e:
    raise ValueError(f"config.text / config.sample.prompts: {e}") from None
  if s.get("prompts_file") and not os.path.isfile(s.prompts_file):
    raise ValueError(f"config.sample.prompts_file: no file {s.prompts_file!r}")


def _check_model(c) -> None:
  if c.model.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {c.model.dtype!r}")
  if c.model.learn_sigma != (c.diffusion.variance == "learned_range"):
    raise ValueError(
      "config.model.learn_sigma=True goes with config.diffusion.variance="
      f"'learned_range' and vice versa; got learn_sigma={c.model.learn_sigma}"
      f", variance={c.diffusion.variance!r}"
    )
  if c.model.get("conv_impl", "auto") not in CONV_IMPLS:
    raise ValueError(
      f"config.model.conv_impl must be one of {CONV_IMPLS}, got {c.model.conv_impl!r}"
    )
  for key, allowed in (("attention_impl", ATTENTION_IMPLS), ("norm_impl", NORM_IMPLS)):
    if c.model.get(key, allowed[0] if key == "norm_impl" else "xla") not in allowed:
      raise ValueError(f"config.model.{key} must be one of {allowed}, got {c.model[key]!r}")
  if (r := c.model.get("residual_dtype", "float32")) not in DTYPES:
    raise ValueError(f"config.model.residual_dtype must be one of {sorted(DTYPES)}, got {r!r}")
  if r != "float32" and c.model.get("arch", "unet") != "dit":
    raise ValueError(f"config.model.residual_dtype={r!r} applies to model.arch='dit' only")


def check_sample(sample_cfg, *, latent: bool, objective: str = "ddpm") -> None:
  """The sampler / spacing / eta combination, thresholding and guidance keys; latent
  diffusion thresholds nothing (scaled latents have unit std, not a [-1, 1] range)."""
  s = sample_cfg
  sampler = objectives.default_sampler(objective) if s.sampler == "auto" else s.sampler
  try:
    resolve_options(sampler, spacing=s.spacing, eta=s.eta)
  except ValueError as e:
    raise ValueError(f"config.sample: {e}") from None
  if not 0.0 <= s.dynamic_threshold <= 1.0:
    raise ValueError(
      "config.sample.dynamic_threshold must be a percentile in (0, 1] or 0 (off); got "
      f"{s.dynamic_threshold}"
    )
  schedule = s.get("guidance_schedule", "constant")
  if schedule not in SCALE_SCHEDULES:
    raise ValueError(
      f"config.sample.guidance_schedule must be one of {SCALE_SCHEDULES}, got {schedule!r}"
    )
  lo, hi = s.get("guidance_sigma_lo", 0.0), s.get("guidance_sigma_hi", 0.0)
  if hi > 0 and not 0 <= lo <= hi:
    raise ValueError(
      f"config.sample.guidance_sigma_lo / _hi must satisfy 0 <= lo <= hi, got ({lo}, {hi})"
    )
  if hi > 0 and schedule != "constant":
    raise ValueError("config.sample: use guidance_sigma_hi > 0 or guidance_schedule, not both")
  for key in ("clip_x0", "dynamic_threshold"):
    if latent and s[key] > 0:
      raise ValueError(
        f"config.sample.{key} must be 0 for latent diffusion (scaled latents have unit "
        f"std, not a [-1, 1] range); got {s[key]}"
      )


def _check_objective(c) -> None:
  """objective, arch, and the samplers and keys they exclude."""
  if c.objective not in objectives.OBJECTIVES:
    raise ValueError(
      f"config.objective must be one of {objectives.OBJECTIVES}, got {c.objective!r}"
    )
  if c.model.arch not in objectives.ARCHS:
    raise ValueError(f"config.model.arch must be one of {objectives.ARCHS}, got {c.model.arch!r}")
  if c.model.arch in objectives.SIGNAL_ARCHS and c.data.image_size:
    raise ValueError(
      f"config.model.arch={c.model.arch!r} models 1-D signals, which are not resized: set "
      f"config.data.image_size=0, got {c.data.image_size}"
    )
  sampler = sampler_of(c)
  if c.objective != "ddpm" and sampler in objectives.DISCRETE_SAMPLERS:
    raise ValueError(
      f"config.sample.sampler={sampler!r} steps on the discrete DDPM schedule; objective "
      f"{c.objective!r} samples with a sigma-grid sampler (euler, heun, edm, euler_a, "
      "dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, unipc)"
      + (" or flow_euler / flow_heun" if c.objective == "flow" else "")
      + " ('auto': its own)"
    )
  if c.objective != "ddpm" and c.model.learn_sigma:
    raise ValueError(
      f"config.model.learn_sigma=True (the DDPM hybrid loss) needs objective 'ddpm', got "
      f"{c.objective!r}"
    )
  for what, needs, bad in (
    (f"config.sample.sampler={sampler!r}", "flow", sampler in FLOW_SAMPLERS),
    ("config.flow.reflow_pairs is set", "flow", bool(c.flow.reflow_pairs)),
    ("config.edm.uncertainty=True", "edm", bool(c.edm.uncertainty)),
  ):
    if bad and c.objective != needs:
      raise ValueError(f"{what} needs config.objective={needs!r}, got {c.objective!r}")
  for key in ("sigma_data", "p_std", "sigma_min", "sigma_max", "c_noise_scale"):
    if not c.edm[key] > 0:
      raise ValueError(f"config.edm.{key} must be positive, got {c.edm[key]!r}")
  if c.flow.t_sampler not in ("uniform", "logit_normal"):
    raise ValueError(
      f"config.flow.t_sampler must be 'uniform' or 'logit_normal', got {c.flow.t_sampler!r}"
    )
  if not c.flow.p_std > 0 or not c.flow.shift > 0:
    raise ValueError(
      f"config.flow.p_std and .shift must be positive, got {c.flow.p_std}, {c.flow.shift}"
    )


def _check_eval(c) -> None:
  """The sample-quality keys of config.eval (jdiff/runs/fid.py), and that the Inception
  weights are there before a training run that ends by scoring its samples starts."""
  e = c.eval
  if "feature_net" not in e:
    return
  if e.feature_net not in FEATURE_NETS:
    raise ValueError(
      f"config.eval.feature_net must be one of {FEATURE_NETS}, got {e.feature_net!r}"
    )
  if e.inception_conv_impl not in CONV_IMPLS:
    raise ValueError(
      f"config.eval.inception_conv_impl must be one of {CONV_IMPLS}, got {e.inception_conv_impl!r}"
    )
  if e.quality_samples == 1:
    raise ValueError("config.eval.quality_samples must be 0 (off) or >= 2, got 1")
  for key in ("num_samples", "quality_samples"):
    if e[key] and e[key] < e.is_splits:
      raise ValueError(
        f"config.eval.{key}={e[key]} is fewer than config.eval.is_splits={e.is_splits}"
      )
  for key in ("samples_npz", "ref_stats"):
    if e[key] and not e[key].endswith(".npz"):
      raise ValueError(f"config.eval.{key} must be a .npz file, got {e[key]!r}")
  w = e.inception_weights
  if w and not w.endswith((".pth", ".pt", ".npz", ".safetensors")):
    raise ValueError(
      f"config.eval.inception_weights={w!r}: expected a .pth, .npz or .safetensors file"
    )
  if w and not os.path.exists(w):
    raise ValueError(f"config.eval.inception_weights={w!r}: file not found")
  if e.quality_samples and not w and feature_nets.resolve_feature_net(c) == "inception":
    raise ValueError(
      f"config.eval.quality_samples={e.quality_samples} scores the samples at the end of "
      f"training with the FID Inception (feature_net={e.feature_net!r}, data "
      f"{c.data.name!r}), but config.eval.inception_weights is empty: give pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth (or the .npz that `python -m "
      "jdiff.models.inception_convert IN.pth OUT.npz` writes), or set quality_samples=0"
    )


# ----------------------------------------------------------------------------- autoencoder


def _check_autoencoder(config) -> None:
  loss = config.loss
  if loss.recon_loss not in ("l1", "l2"):
    raise ValueError(f"config.loss.recon_loss must be 'l1' or 'l2', got {loss.recon_loss!r}")
  for key in ("perceptual_weight", "adversarial_weight"):
    if loss[key] != 0:
      raise ValueError(
        f"config.loss.{key}={loss[key]!r}: the LPIPS perceptual and PatchGAN adversarial "
        "terms of LDM are not implemented (LPIPS needs pretrained VGG weights, which "
        "cannot be downloaded here); set it to 0"
      )
  dtype = config.autoencoder.overrides.get("dtype")
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(
      f"config.autoencoder.overrides.dtype must be one of {sorted(DTYPES)}, got {dtype!r}"
    )
