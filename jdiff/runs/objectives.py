"""The config's `objective` (ddpm | edm | flow) and `model.arch` (unet | dit) for the runs.

  objective  schedule (step, samplers)      model_fn predicts     loss
  ddpm       discrete `Schedule` (diffusion)  diffusion.prediction  losses.denoising_loss
  edm        `processes.ve` (config.edm)      x0 (EDMPrecond's D)   lambda(sigma) ||D - x0||^2
  flow       `processes.flow` (config.flow)   velocity eps - x0     ||u - u_hat||^2

Everything downstream (train step, eval loss, samplers) dispatches on the schedule's type, so
the runs only need the three builders below. Reflow training reads an .npz of [x0 | x1] pairs
(`PairSource`) written by `jdiff.runs.reflow.write_pairs`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jdiff import processes
from jdiff.samplers.registry import FLOW_SAMPLERS

OBJECTIVES = ("ddpm", "edm", "flow")
SIGNAL_ARCHS = ("unet1d", "diffwave")  # 1-D signals [L, C] (jdiff.runs.audio)
ARCHS = ("unet", "dit", *SIGNAL_ARCHS)
DISCRETE_SAMPLERS = ("ddpm", "ddim", "pc")
AUTO_SAMPLERS = {"ddpm": "ddim", "edm": "heun", "flow": "flow_euler"}


def default_sampler(objective: str) -> str:
  """The sampler `sample.sampler='auto'` means: DDIM on the discrete schedule (ddpm, any
  prediction), EDM's deterministic Heun (Alg. 1) for edm, Euler in t for flow."""
  return AUTO_SAMPLERS[objective]


def make_process(config) -> processes.Process:
  """The continuous process of an edm / flow config."""
  c = config
  if c.objective == "edm":
    e = c.edm
    return processes.ve(
      sigma_min=e.sigma_min, sigma_max=e.sigma_max, p_mean=e.p_mean, p_std=e.p_std
    )
  if c.objective == "flow":
    return processes.flow(t_sampler=c.flow.t_sampler, p_mean=c.flow.p_mean, p_std=c.flow.p_std)
  raise ValueError(f"objective {c.objective!r} has no continuous process")


def prediction_of(config) -> str:
  """What the model_fn predicts under the config's objective."""
  return {"ddpm": config.diffusion.prediction, "edm": "x0", "flow": "velocity"}[config.objective]


def loss_overrides(config) -> dict:
  """`make_loss_fn` options that replace config.diffusion's for edm / flow."""
  if config.objective == "ddpm":
    return {}
  edm = config.objective == "edm"
  return dict(
    prediction=prediction_of(config),
    weighting="edm" if edm else "simple",
    sigma_data=config.edm.sigma_data,
    uncertainty=bool(edm and config.edm.uncertainty),
  )


def sample_overrides(config) -> dict:
  """`make_sample_fn` options of the objective (the flow samplers' time shift)."""
  if config.sample.sampler in FLOW_SAMPLERS:
    return dict(shift=config.flow.shift)
  return {}


def build_network(config, base_kwargs: dict, *, dtype):
  """The network of `model.arch` (DiT from config.dit), EDM-preconditioned for objective edm.

  Args:
    config: the run config.
    base_kwargs: the U-Net's constructor arguments (num_classes, out_channels set).
    dtype: the compute dtype.
  """
  from jdiff.models.dit import DiT, make_dit  # pylint: disable=g-import-not-at-top
  from jdiff.models.edm import EDMPrecond  # pylint: disable=g-import-not-at-top
  from jdiff.models.layers import DTYPES  # pylint: disable=g-import-not-at-top
  from jdiff.models.unet import UNet  # pylint: disable=g-import-not-at-top

  common = dict(
    num_classes=base_kwargs["num_classes"],
    out_channels=base_kwargs["out_channels"],
    learn_sigma=base_kwargs["learn_sigma"],
    dtype=dtype,
    attention_impl=config.model.get("attention_impl", "xla"),
  )
  if config.model.arch == "dit":
    d = config.dit
    common["residual_dtype"] = DTYPES[config.model.get("residual_dtype", "float32")]
    if d.preset:
      net = make_dit(d.preset, mlp_ratio=d.mlp_ratio, **common)
    else:
      net = DiT(
        patch_size=d.patch_size, hidden=d.hidden, depth=d.depth, num_heads=d.num_heads,
        mlp_ratio=d.mlp_ratio, **common,
      )  # fmt: skip
  elif config.model.arch in SIGNAL_ARCHS:
    from jdiff.runs.audio import build_signal_net  # pylint: disable=g-import-not-at-top

    net = build_signal_net(config, base_kwargs, dtype=dtype)
  else:
    net = UNet(dtype=dtype, **base_kwargs)
  if config.objective == "edm":
    e = config.edm
    return EDMPrecond(
      net, sigma_data=e.sigma_data, c_noise_scale=e.c_noise_scale, uncertainty=e.uncertainty
    )
  return net


@dataclasses.dataclass(frozen=True)
class PairSource:
  """Random-access source of reflow pairs: record i is {'image': float32 [H, W, 2C]} ([x0 | x1])."""

  pairs: np.ndarray
  labels: np.ndarray | None
  description: str

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index) -> dict:
    out = {"image": self.pairs[int(index)]}
    if self.labels is not None:
      out["label"] = self.labels[int(index)]
    return out

  def __repr__(self) -> str:
    return self.description


def pair_source(path: str) -> PairSource:
  """The reflow pairs of an .npz written by `jdiff.runs.reflow.write_pairs`."""
  with np.load(path) as z:
    pairs = np.asarray(z["pairs"], np.float32)
    labels = np.asarray(z["labels"], np.int32) if "labels" in z else None
  if pairs.ndim != 4 or pairs.shape[-1] % 2:
    raise ValueError(f"{path}: pairs must be [N, H, W, 2C], got {pairs.shape}")
  return PairSource(pairs, labels, f"reflow_pairs({path}, n={len(pairs)})")
