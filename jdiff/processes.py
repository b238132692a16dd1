"""Continuous-time diffusion processes beside the discrete `Schedule`: VP, VE/EDM, flow.

Design. Every process is an interpolant x_t = alpha(t) x0 + sigma(t) eps over its own time t,
and every one is, up to the scale alpha(t), the variance-exploding process

  x_ve = x_t / alpha(t) = x0 + s eps,     s = sigma(t) / alpha(t)   ([EDM] Sec. 2, Table 1),

so a process only has to say four things: alpha(t) and sigma(t) (`alpha_sigma`), the map t <-> s
(`ve_sigma`, `t_of_ve_sigma`, both closed form), and how its training draws t (`sample_t`).
`make_denoiser` then turns a model of the process, `model_fn(x_t, t * t_scale, cond)` with any
prediction target, into the EDM denoiser D(x_ve, s) -> x0_hat; that is all the sigma-grid
samplers (euler, heun, edm, euler_a, dpmpp_2m / 3m / sde, unipc) call, so they run unchanged on
every process. A `Process` shares the noise protocol of the discrete `Schedule` (kind, t_min /
t_max / t_scale, sigma_min_max, t_to_sigma / sigma_to_t, check_prediction, make_denoiser), so
`continuous.make_denoiser`, `grids.sigma_grid` and the guidance wrappers take either.

  kind        alpha(t)                 sigma(t)             t          training t
  vp_cosine   cos(f(t)) / cos(f(0))    sqrt(1 - alpha^2)    [0, 1]     uniform on [t_min, t_max]
  vp_linear   exp(-B(t) / 2)           sqrt(1 - alpha^2)    [0, 1]     uniform on [t_min, t_max]
  ve          1                        t (t is sigma)       (0, inf)   log-normal (P_mean, P_std)
  flow        1 - t                    t                    [0, 1]     uniform or logit-normal

with f(t) = (t + s) / (1 + s) pi / 2, s = 0.008 ([IDDPM] eq. 17) and B(t) = b_min t +
(b_max - b_min) t^2 / 2 ([ScoreSDE] eq. 33). [t_min, t_max] is the time range whose VE sigmas
are [sigma_min, sigma_max] (0.002 and 80 by default, [EDM] Table 1): the samplers' grids span
it. The model sees t * t_scale (1000 for VP and flow, so a U-Net's timestep embedding sees the
range of a DDPM; 1 for VE, where the time is sigma and EDM's preconditioning
(`jdiff.models.edm.EDMPrecond`) makes c_noise from it).

Prediction targets (`target` / `to_x0`): 'eps', 'x0', 'v' (alpha eps - sigma x0, VP only) and
'velocity' (d x_t / dt = alpha'(t) x0 + sigma'(t) eps; eps - x0 for flow, [RF] eq. 1).

References:
  [EDM] Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based
    Generative Models, 2022 (Table 1; log-normal sigma, Sec. 5).
  [ScoreSDE] Song et al. Score-Based Generative Modeling through SDEs, 2021 (VP-SDE).
  [IDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models, 2021.
  [RF] Liu, Gong, Liu. Flow Straight and Fast: Rectified Flow, 2023. [FM] Lipman et al. Flow
    Matching for Generative Modeling, 2023. [SD3] Esser et al. Scaling Rectified Flow
    Transformers, 2024 (logit-normal t, eq. 19; time shift, eq. 23).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jdiff import diffusion

Array = jax.Array
KINDS = ("vp_cosine", "vp_linear", "ve", "flow")
PREDICTIONS = ("eps", "x0", "v", "velocity")
_COS_S = 0.008


@struct.dataclass
class Process:
  """A continuous-time process (a pytree: its floats are leaves, `kind` and `t_sampler` static).

  Attributes:
    kind: one of KINDS.
    t_min, t_max: the process's time range the samplers' sigma grids span.
    t_scale: the model is called at t * t_scale.
    t_sampler: 'uniform' (on [t_min, t_max]; flow: [0, 1]), 'log_normal' (VE: ln t ~
      N(p_mean, p_std^2)) or 'logit_normal' (flow: logit t ~ N(p_mean, p_std^2)).
    p_mean, p_std: parameters of the log- / logit-normal t sampler.
    beta_min, beta_max: the linear VP's beta(t) range.
  """

  kind: str = struct.field(pytree_node=False)
  t_min: float
  t_max: float
  t_scale: float = 1.0
  t_sampler: str = struct.field(pytree_node=False, default="uniform")
  p_mean: float = 0.0
  p_std: float = 1.0
  beta_min: float = 0.1
  beta_max: float = 20.0

  # The noise protocol it shares with the discrete `jdiff.schedules.Schedule` (kind, t_min /
  # t_max / t_scale are the fields above). Time t is the process's own time.

  def sigma_min_max(self) -> tuple[Array, Array]:
    """The VE sigmas at t_min and t_max, float32 scalars (the samplers' grid range)."""
    return sigma_min_max(self)

  def t_to_sigma(self, t) -> Array:
    """The VE noise level s(t) = sigma(t) / alpha(t) at process times t (`ve_sigma`)."""
    return ve_sigma(self, t)

  def sigma_to_t(self, sigma) -> Array:
    """The process time t(s) at VE noise levels s, the inverse of t_to_sigma (`t_of_ve_sigma`)."""
    return t_of_ve_sigma(self, sigma)

  def check_prediction(self, prediction: str) -> None:
    """Raises ValueError unless the process supports `prediction` (`check_prediction`)."""
    check_prediction(self, prediction)

  def make_denoiser(
    self, model_fn: diffusion.ModelFn, **options
  ) -> Callable[[Array, Array], Array]:
    """The EDM denoiser D(x_ve, s) -> x0_hat of a model of the process: `make_denoiser`, which
    documents the options (cond, prediction, clip_x0, dynamic_percentile)."""
    return make_denoiser(self, model_fn, **options)


# ----------------------------------------------------------------------------- constructors


def _check_range(sigma_min, sigma_max) -> None:
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


def vp_cosine(*, sigma_min: float = 0.002, sigma_max: float = 80.0, t_scale: float = 1000.0):
  """The continuous cosine VP process ([IDDPM] eq. 17 at real t in [0, 1])."""
  _check_range(sigma_min, sigma_max)
  p = Process("vp_cosine", 0.0, 1.0, t_scale)
  return p.replace(
    t_min=float(t_of_ve_sigma(p, sigma_min)), t_max=float(t_of_ve_sigma(p, sigma_max))
  )


def vp_linear(
  *,
  beta_min: float = 0.1,
  beta_max: float = 20.0,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  t_scale: float = 1000.0,
):
  """The continuous linear VP process, the VP-SDE of [ScoreSDE] (beta(t) linear in t)."""
  _check_range(sigma_min, sigma_max)
  if not 0 < beta_min < beta_max:
    raise ValueError(f"need 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
  p = Process("vp_linear", 0.0, 1.0, t_scale, beta_min=beta_min, beta_max=beta_max)
  t_max = float(t_of_ve_sigma(p, sigma_max))
  if not t_max <= 1.0:
    raise ValueError(f"sigma_max={sigma_max} is above this VP's sigma(1) = {ve_sigma(p, 1.0):.4g}")
  return p.replace(t_min=float(t_of_ve_sigma(p, sigma_min)), t_max=t_max)


def ve(
  *, sigma_min: float = 0.002, sigma_max: float = 80.0, p_mean: float = -1.2, p_std: float = 1.2
):
  """The VE / EDM process x = x0 + t eps, time = sigma; training ln sigma ~ N(P_mean, P_std^2).

  Defaults are [EDM] Table 1 (sigma range, P_mean = -1.2, P_std = 1.2).
  """
  _check_range(sigma_min, sigma_max)
  if not p_std > 0:
    raise ValueError(f"p_std must be positive, got {p_std}")
  return Process("ve", sigma_min, sigma_max, 1.0, "log_normal", p_mean, p_std)


def flow(
  *,
  t_sampler: str = "logit_normal",
  p_mean: float = 0.0,
  p_std: float = 1.0,
  sigma_min: float = 0.002,
  sigma_max: float = 80.0,
  t_scale: float = 1000.0,
):
  """The rectified-flow interpolant x_t = (1 - t) x0 + t eps ([RF], [FM]).

  Args:
    t_sampler: 'uniform' on [0, 1] ([RF]) or 'logit_normal' ([SD3] eq. 19, m = p_mean,
      s = p_std; SD3 uses (0, 1)).
    p_mean, p_std: the logit-normal's parameters.
    sigma_min, sigma_max: the VE sigma range the sigma-grid samplers span (t = s / (1 + s)).
    t_scale: the model is called at t * t_scale.
  """
  _check_range(sigma_min, sigma_max)
  if t_sampler not in ("uniform", "logit_normal"):
    raise ValueError(f"flow t_sampler must be 'uniform' or 'logit_normal', got {t_sampler!r}")
  if not p_std > 0:
    raise ValueError(f"p_std must be positive, got {p_std}")
  t_min, t_max = sigma_min / (1.0 + sigma_min), sigma_max / (1.0 + sigma_max)
  return Process("flow", t_min, t_max, t_scale, t_sampler, p_mean, p_std)


# ----------------------------------------------------------------------------- coefficients


def _f32(t) -> Array:
  return jnp.asarray(t, jnp.float32)


def _cos_theta(t: Array) -> Array:
  return (t + _COS_S) / (1.0 + _COS_S) * (math.pi / 2)


def _cos_g(t: Array) -> Array:
  return jnp.cos(_cos_theta(t))


def _cos_one_minus_a2(t: Array) -> Array:
  """1 - alpha^2 = (g0 - g)(g0 + g) / g0^2, with g0 - g = 2 sin((th + th0)/2) sin((th - th0)/2)
  (no cancellation near t = 0)."""
  th, th0 = _cos_theta(t), _cos_theta(jnp.float32(0.0))
  g0 = jnp.cos(th0)
  diff = 2.0 * jnp.sin(0.5 * (th + th0)) * jnp.sin(0.5 * (th - th0))
  return jnp.maximum(diff * (g0 + jnp.cos(th)), 0.0) / g0**2


def _linear_b(p: Process, t: Array) -> Array:
  return p.beta_min * t + 0.5 * (p.beta_max - p.beta_min) * t**2


def alpha_sigma(p: Process, t) -> tuple[Array, Array]:
  """(alpha(t), sigma(t)), float32 of t's shape."""
  t = _f32(t)
  if p.kind == "vp_cosine":
    a = jnp.clip(_cos_g(t) / _cos_g(jnp.float32(0.0)), 0.0, 1.0)
    return a, jnp.sqrt(jnp.minimum(_cos_one_minus_a2(t), 1.0))
  if p.kind == "vp_linear":
    b = _linear_b(p, t)
    return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))
  if p.kind == "ve":
    return jnp.ones_like(t), t
  return 1.0 - t, t


def alpha_sigma_dot(p: Process, t) -> tuple[Array, Array]:
  """(d alpha / dt, d sigma / dt), float32 of t's shape (for the 'velocity' target)."""
  return jax.vmap(jax.jacfwd(lambda s: jnp.stack(alpha_sigma(p, s))))(jnp.ravel(_f32(t))).T.reshape(
    (2,) + jnp.shape(t)
  )


def ve_sigma(p: Process, t) -> Array:
  """s(t) = sigma(t) / alpha(t), the VE noise level the samplers use; float32, t's shape."""
  t = _f32(t)
  if p.kind == "vp_linear":  # sqrt(e^B - 1), without the cancellation of 1 - alpha^2
    return jnp.sqrt(jnp.expm1(_linear_b(p, t)))
  if p.kind == "vp_cosine":
    g0 = _cos_g(jnp.float32(0.0))
    return g0 * jnp.sqrt(_cos_one_minus_a2(t)) / _cos_g(t)
  a, s = alpha_sigma(p, t)
  return s / a


def t_of_ve_sigma(p: Process, s) -> Array:
  """The inverse of `ve_sigma`: the process time t(s), float32 of s's shape."""
  s = _f32(s)
  if p.kind == "ve":
    return s
  if p.kind == "flow":
    return s / (1.0 + s)
  if p.kind == "vp_cosine":
    # cos(th) = g0 / sqrt(1 + s^2)  <=>  tan(th) = sqrt(sin(th0)^2 + s^2) / g0 (well conditioned
    # near s = 0, where arccos is not).
    th0 = _cos_theta(jnp.float32(0.0))
    th = jnp.arctan2(jnp.sqrt(jnp.sin(th0) ** 2 + s**2), jnp.cos(th0))
    return th * (2.0 / math.pi) * (1.0 + _COS_S) - _COS_S
  # vp_linear: solve b_min t + (b_max - b_min) t^2 / 2 = log(1 + s^2) for t >= 0.
  c, a2, b1 = jnp.log1p(s**2), 0.5 * (p.beta_max - p.beta_min), p.beta_min
  return 2.0 * c / (b1 + jnp.sqrt(b1**2 + 4.0 * a2 * c))


def sigma_min_max(p: Process) -> tuple[Array, Array]:
  """The VE sigmas at t_min and t_max, float32 scalars (the samplers' grid range)."""
  return ve_sigma(p, p.t_min), ve_sigma(p, p.t_max)


def sample_t(p: Process, rng: Array, shape) -> Array:
  """Training times t, float32 `shape`, from the process's `t_sampler`."""
  if p.t_sampler == "log_normal":
    return jnp.exp(p.p_mean + p.p_std * jax.random.normal(rng, shape))
  if p.t_sampler == "logit_normal":
    return jax.nn.sigmoid(p.p_mean + p.p_std * jax.random.normal(rng, shape))
  lo, hi = (0.0, 1.0) if p.kind == "flow" else (p.t_min, p.t_max)
  return jax.random.uniform(rng, shape, jnp.float32, lo, hi)


# ----------------------------------------------------------------------------- targets


def check_prediction(p: Process, prediction: str) -> None:
  if prediction not in PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
  if prediction == "v" and p.kind not in ("vp_cosine", "vp_linear"):
    raise ValueError(f"prediction 'v' needs a VP process (alpha^2 + sigma^2 = 1), got {p.kind!r}")


def _b(a: Array, x: Array) -> Array:
  a = _f32(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def target(p: Process, x0: Array, t: Array, noise: Array, *, prediction: str) -> Array:
  """The regression target of `prediction` at times t [B] for x_t = alpha x0 + sigma noise."""
  check_prediction(p, prediction)
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    a, s = alpha_sigma(p, t)
    return _b(a, x0) * noise - _b(s, x0) * x0
  if p.kind == "flow":
    return noise - x0
  da, ds = alpha_sigma_dot(p, t)
  return _b(da, x0) * x0 + _b(ds, x0) * noise


def to_x0(p: Process, x_t: Array, t: Array, pred: Array, *, prediction: str) -> Array:
  """x0_hat from a prediction at times t [B] (float32), the inverse of `target`."""
  check_prediction(p, prediction)
  x_t, pred = x_t.astype(jnp.float32), pred.astype(jnp.float32)
  a, s = alpha_sigma(p, t)
  if prediction in ("eps", "x0", "v"):
    return diffusion.convert_prediction(_b(a, x_t), _b(s, x_t), x_t, pred, prediction=prediction)[0]
  if p.kind == "flow":  # x_t = (1 - t) x0 + t eps and u = eps - x0  =>  x0 = x_t - t u
    return x_t - _b(t, x_t) * pred
  # u = a' x0 + s' eps and x_t = a x0 + s eps  =>  x0 = (s x_t... ) solved by Cramer's rule
  da, ds = alpha_sigma_dot(p, t)
  return (_b(ds, x_t) * x_t - _b(s, x_t) * pred) / _b(ds * a - s * da, x_t)


# ----------------------------------------------------------------------------- denoiser, loss


def make_denoiser(
  p: Process,
  model_fn: diffusion.ModelFn,
  *,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
  dynamic_percentile: float | None = None,
) -> Callable[[Array, Array], Array]:
  """The EDM denoiser D(x_ve [B, ...], s scalar or [B]) -> x0_hat of a model of the process.

  D calls `model_fn(alpha(t) x_ve, t * t_scale, cond)` once at t = t(s) (float32 [B]) and converts
  its prediction to x0 (`to_x0`); thresholding as `continuous.make_denoiser`.
  """
  check_prediction(p, prediction)
  diffusion.check_threshold(clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)

  def denoise(x: Array, s: Array) -> Array:
    s = jnp.broadcast_to(_f32(s), (x.shape[0],))
    t = t_of_ve_sigma(p, s)
    a = alpha_sigma(p, t)[0]
    x_t = (x.astype(jnp.float32) * _b(a, x)).astype(x.dtype)
    x0 = to_x0(p, x_t, t, model_fn(x_t, t * p.t_scale, cond), prediction=prediction)
    x0 = diffusion.threshold_x0(x0, clip_x0=clip_x0, dynamic_percentile=dynamic_percentile)
    return x0.astype(x.dtype)

  return denoise


WEIGHTINGS = ("simple", "edm")


def loss_weight(p: Process, t: Array, *, weighting: str, sigma_data: float = 0.5) -> Array:
  """Per-example weight [B]: 'simple' (1) or 'edm', lambda(s) = (s^2 + sd^2) / (s sd)^2
  ([EDM] Table 1) at the VE sigma s(t), for an x0 (D) target."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
  if weighting == "simple":
    return jnp.ones(jnp.shape(t), jnp.float32)
  s = ve_sigma(p, t)
  return (s**2 + sigma_data**2) / (s * sigma_data) ** 2


def process_loss(
  p: Process,
  model_fn: diffusion.ModelFn,
  x0: Array,
  rng: Array,
  *,
  cond: Array | None = None,
  t: Array | None = None,
  noise: Array | None = None,
  prediction: str = "eps",
  weighting: str = "simple",
  sigma_data: float = 0.5,
  uncertainty: bool = False,
) -> Array:
  """Per-example denoising loss of a process, float32 [B].

  w(t) ||pred - target||^2 (mean over non-batch dims), t from `sample_t` unless given. With
  `uncertainty` the model returns one extra channel (last axis) holding a log-variance u(t)
  (broadcast over the image; `jdiff.models.edm.EDMPrecond`), and the loss is EDM2's
  w / e^u ||pred - target||^2 + u ([EDM2] eq. 21), whose minimiser over u is the log of the
  weighted loss at that noise level: a learned, per-sigma normalisation.

  Args:
    p: the process.
    model_fn: `model_fn(x_t, t * t_scale, cond) -> [B, ...]` (+1 channel with uncertainty).
    x0: [B, ...] data.
    rng: PRNG key (t and the noise).
    cond: conditioning passed to the model.
    t: optional process times [B].
    noise: optional noise [B, ...] (reflow: the noise each x0 was generated from).
    prediction: one of PREDICTIONS.
    weighting: 'simple' or 'edm' (see `loss_weight`).
    sigma_data: EDM's sigma_data for 'edm'.
    uncertainty: EDM2's learned uncertainty weighting.
  """
  check_prediction(p, prediction)
  t_rng, n_rng = jax.random.split(rng)
  if t is None:
    t = sample_t(p, t_rng, (x0.shape[0],))
  if noise is None:
    noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
  a, s = alpha_sigma(p, t)
  x_t = (_b(a, x0) * x0 + _b(s, x0) * noise).astype(x0.dtype)
  out = model_fn(x_t, t * p.t_scale, cond).astype(jnp.float32)
  want = x0.shape[:-1] + (x0.shape[-1] + int(uncertainty),)
  if out.shape != want:
    raise ValueError(f"model_fn returned shape {out.shape}, expected {want}")
  w = loss_weight(p, t, weighting=weighting, sigma_data=sigma_data)
  if uncertainty:
    out, logvar = out[..., :-1], jnp.mean(out[..., -1:], axis=tuple(range(1, out.ndim)))
  mse = jnp.mean(
    (out - target(p, x0, t, noise, prediction=prediction)) ** 2, axis=tuple(range(1, out.ndim))
  )
  return w * mse / jnp.exp(logvar) + logvar if uncertainty else w * mse
