"""Classifier-free guidance as a `model_fn` wrapper.

`cfg_model_fn(model_fn, guidance_scale=w, null_cond=...)` returns a `model_fn(x, t, cond)`
that evaluates the conditional and unconditional predictions in ONE batched call of the
wrapped model (inputs [x, x], [t, t], [cond, null]) and returns

  guided = uncond + w (cond - uncond)                                ([CFG] eq. 6)

so w = 1 is the conditional model and w = 0 the unconditional one. With
`guidance_rescale = phi > 0`, the guided prediction is rescaled to the per-example standard
deviation of the conditional one and mixed back ([Lin24] eq. 15-16):

  rescaled = guided * std(cond) / std(guided),   out = phi rescaled + (1 - phi) guided.

[Lin24] apply the rescale to v- (or x0-) predictions; it is applied to whatever the wrapped
model predicts. For jdiff's class-conditional U-Net the unconditional label is its reserved
`null_label` (= num_classes), seen in training through label dropout.

A model with extra output channels beyond its prediction sets `learn_sigma=True`: a
learned-variance model (`UNet(learn_sigma=True)`, [iDDPM] Sec. 3.1) outputs 2C channels, eps
in the first C and the variance interpolation v in the last C; EDM2's uncertainty
(`EDMPrecond(uncertainty=True)`, [EDM2] Sec. 5) outputs C + 1, the denoised image and a
log-variance. Only the first C channels (C = x's channels) are guided; the rest are the
conditional branch's, unguided, as in [GLIDE] (the `glide_text2im` sampling `model_fn`
guides `eps` and keeps the conditional `rest`). Extrapolating v as well can push it out of
[-1, 1], the variance out of [beta~, beta] (`jdiff.diffusion` interpolates the log-variances
with (v + 1) / 2).

References:
  [iDDPM] Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models, 2021.
  [GLIDE] Nichol et al. GLIDE: Towards Photorealistic Image Generation and Editing with
    Text-Guided Diffusion Models, 2022 (released code: `glide_text2im`).
  [EDM2] Karras et al. Analyzing and Improving the Training Dynamics of Diffusion Models,
    2024, Sec. 5 (uncertainty).
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance, 2022, eq. 6 (there w' = 1 + w).
  [Lin24] Lin, Liu, Li, Yang. Common Diffusion Noise Schedules and Sample Steps are Flawed,
    2024, Sec. 3.4, eqs. 15-16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.diffusion import ModelFn

Array = jax.Array


def _std(a: Array) -> Array:
  """Per-example std over all non-batch dimensions, [B, 1, ..., 1] float32."""
  a = a.astype(jnp.float32)
  return jnp.std(a, axis=tuple(range(1, a.ndim)), keepdims=True)


def rescale_guidance(guided: Array, cond_pred: Array, guidance_rescale: float) -> Array:
  """[Lin24] eq. 16: phi * guided * std(cond) / std(guided) + (1 - phi) * guided.

  Args:
    guided: [B, ...] the CFG prediction.
    cond_pred: [B, ...] the conditional prediction.
    guidance_rescale: phi in [0, 1].

  Returns:
    [B, ...] in guided's dtype.
  """
  g = guided.astype(jnp.float32)
  rescaled = g * _std(cond_pred) / jnp.maximum(_std(g), 1e-12)
  out = guidance_rescale * rescaled + (1.0 - guidance_rescale) * g
  return out.astype(guided.dtype)


def cfg_model_fn(
  model_fn: ModelFn,
  *,
  guidance_scale,
  null_cond,
  guidance_rescale: float = 0.0,
  learn_sigma: bool = False,
) -> ModelFn:
  """Wraps `model_fn(x, t, cond)` with classifier-free guidance in one batched call.

  Args:
    model_fn: the conditional model `model_fn(x [B, ...], t [B], cond [B, ...])`; it must
      accept the doubled batch 2B.
    guidance_scale: w (Python float or a scalar array, may be traced); 1 = conditional.
    null_cond: the unconditional conditioning, broadcast to cond's shape: e.g. the U-Net's
      `null_label` (an int), or a null embedding of shape cond.shape[1:].
    guidance_rescale: phi in [0, 1] of [Lin24] eq. 16 (0 disables the rescale).
    learn_sigma: the model outputs [B, ..., C + k] on the last axis, C = x.shape[-1] (2C:
      eps and a variance interpolation; C + 1: EDM2's uncertainty): guide (and rescale) the
      first C channels only and take the other k from the conditional prediction.

  Returns:
    `guided_fn(x [B, ...], t [B] or scalar, cond [B, ...]) -> [B, ...]`, the model's
    output shape.

  Raises:
    ValueError: for guidance_rescale outside [0, 1], or when called with cond=None, or
      with learn_sigma and no more output channels than x has.
  """
  if not 0.0 <= float(guidance_rescale) <= 1.0:
    raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
  if null_cond is None:
    raise ValueError("null_cond is None; pass the unconditional label / embedding")

  def guided_fn(x: Array, t: Array, cond: Array | None) -> Array:
    if cond is None:
      raise ValueError(
        "cfg_model_fn needs cond (got None); the wrapper supplies null_cond "
        "for the unconditional half itself"
      )
    b = x.shape[0]
    cond = jnp.asarray(cond)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    null = jnp.broadcast_to(jnp.asarray(null_cond, cond.dtype), cond.shape)
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([cond, null]))
    c, u = out[:b], out[b:]
    rest = None
    if learn_sigma:
      ch = x.shape[-1]
      if out.shape[-1] <= ch:
        raise ValueError(
          f"learn_sigma=True needs more output channels than the input's {ch} (the "
          f"prediction, then a variance or uncertainty), got output shape {out.shape[1:]}"
        )
      c, rest, u = c[..., :ch], c[..., ch:], u[..., :ch]
    w = jnp.asarray(guidance_scale, jnp.float32)
    guided = u.astype(jnp.float32) + w * (c.astype(jnp.float32) - u.astype(jnp.float32))
    guided = guided.astype(out.dtype)
    if guidance_rescale > 0:
      guided = rescale_guidance(guided, c, guidance_rescale)
    return guided if rest is None else jnp.concatenate([guided, rest], axis=-1)

  return guided_fn
