"""Progressive distillation: a student learns two deterministic DDIM steps of its teacher in one.

Time. [PD] works in continuous time u in [0, 1] with a student grid u_i = i / N and the teacher's
midpoints (i - 1/2) / N. jdiff's schedules are discrete (integer t = 0..T-1), so u is mapped to
the schedule's own timesteps by

  t(u) = u T - 1,   t(0) = -1 (the clean data),   t(1) = T - 1 (the schedule's last step),

and alpha_bar at a fractional t is `jdiff.continuous`'s log-sigma interpolation (the view every
sigma-grid sampler already calls the model through). Why continuous and not integer: halving N
from 256 to 1 needs the midpoints of every round, and T = 1000 is not divisible by 2N for N >= 8,
so an integer grid would either round (the two teacher steps would no longer split the student's
step in half) or forbid the default schedule. Where T is divisible by 2N every t(u) is an integer
and the interpolation returns the schedule's own alpha_bar (to float32 rounding), so this is the
discrete recipe exactly; otherwise the model is called at fractional t, as by the Karras samplers.

The distilled student samples with plain DDIM on its own grid: `ddim_sample(schedule, student,
x_T, rng, grid=student_grid(T, N))`.

References:
  [PD] Salimans, Ho. Progressive Distillation for Fast Sampling of Diffusion Models, ICLR 2022,
    Algorithm 2 (the target x~), Sec. 4 (x- / v-parameterisation, truncated-SNR weighting).
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models, 2021, eq. 12 (eta = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import continuous, diffusion
from jdiff.schedules import Schedule

Array = jax.Array
WEIGHTINGS = ("truncated_snr", "snr_plus_one")


def check_num_steps(num_steps) -> int:
  """Returns N as an int; raises unless N is a power of two >= 1 (PD halves it every round)."""
  n = int(num_steps) if isinstance(num_steps, (int, np.integer)) else -1
  if n < 1 or n & (n - 1):
    raise ValueError(
      f"progressive distillation needs a student step count N that is a power of two, "
      f"got N={num_steps!r}"
    )
  return n


def time_of(schedule: Schedule, u: Array) -> Array:
  """t(u) = u T - 1: the schedule's (fractional) timestep at PD time u in [0, 1]; float32."""
  return jnp.asarray(u, jnp.float32) * schedule.num_steps - 1.0


def student_grid(num_train_steps: int, num_steps: int) -> Array:
  """The N-step student's DDIM grid t(i / N), i = N..0: float32 [N + 1] from T - 1 down to -1.

  Args:
    num_train_steps: T of the teacher's schedule.
    num_steps: N, a power of two.

  Returns:
    Decreasing float32 [N + 1] timesteps ending with -1 (the clean data), for `ddim_sample`'s
    `grid`.
  """
  n = check_num_steps(num_steps)
  u = np.arange(n, -1, -1, dtype=np.float64) / n
  return jnp.asarray(u * num_train_steps - 1.0, jnp.float32)


def _coefs(schedule: Schedule, t: Array, x: Array) -> tuple[Array, Array]:
  """(alpha, sigma) = (sqrt(ab), sqrt(1 - ab)) at fractional t [B], shaped [B, 1, ...]."""
  return continuous.vp_coefs(continuous.t_to_sigma(schedule, t), x)


def _ddim(schedule, model_fn, z, t, t_next, cond, prediction, clip_x0):
  """One deterministic DDIM step z_t -> z_{t_next} at fractional t [B] ([DDIM] eq. 12); with
  `clip_x0`, x0_hat is clipped to [-c, c] and eps_hat recomputed from it (the sampler's way)."""
  sig = continuous.t_to_sigma(schedule, t)
  x0, eps = continuous.to_x0_eps_sigma(sig, z, model_fn(z, t, cond), prediction=prediction)
  if clip_x0 is not None:
    x0 = diffusion.threshold_x0(x0, clip_x0=clip_x0)
    a, s = continuous.vp_coefs(sig, z)
    eps = (z - a * x0) / s
  a_next, s_next = _coefs(schedule, t_next, z)
  return a_next * x0 + s_next * eps


def pd_target(
  schedule: Schedule,
  teacher_fn: diffusion.ModelFn,
  z_t: Array,
  t: Array,
  *,
  num_steps: int,
  cond: Array | None = None,
  prediction: str = "eps",
  clip_x0: float | None = None,
) -> tuple[Array, Array]:
  """The [PD] Alg. 2 target: the x~ that makes one student DDIM step land on two teacher steps.

  With u = (t + 1) / T, the teacher takes DDIM steps u -> u - 1/(2N) -> u - 1/N = u'', and

    x~ = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t).

  Args:
    schedule: the teacher's `Schedule`.
    teacher_fn: `teacher_fn(z, t [B] float32, cond)`, a prediction of kind `prediction`.
    z_t: [B, ...] noisy input at t.
    t: [B] (fractional) timesteps on the student grid, t(i / N) for i in 1..N.
    num_steps: N, the student's step count (a power of two).
    cond: conditioning passed to the teacher.
    prediction: the teacher's prediction kind: 'eps', 'x0' or 'v'.
    clip_x0: clip the teacher's x0_hat to [-c, c] in both steps (None: off), as its DDIM
      sampler does with `sample.clip_x0`: an eps teacher's x0_hat = (z - sigma eps) / alpha
      is far out of range near t = T, where alpha -> 0.

  Returns:
    (x~ [B, ...] float32, z_{t''} [B, ...] float32: the teacher's two-step result).
  """
  n = check_num_steps(num_steps)
  if 2 * n > schedule.num_steps:
    # The teacher's first midpoint t(1 / 2N) must be a real timestep (>= 0), not the clean data.
    raise ValueError(f"a student of N={n} steps needs a teacher schedule of T >= 2N steps, "
                     f"got T={schedule.num_steps}")  # fmt: skip
  diffusion.check_prediction(prediction)
  z = z_t.astype(jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  half = 0.5 * schedule.num_steps / n
  t_mid, t_next = t - half, t - 2.0 * half
  z_mid = _ddim(schedule, teacher_fn, z, t, t_mid, cond, prediction, clip_x0)
  z_next = _ddim(schedule, teacher_fn, z_mid, t_mid, t_next, cond, prediction, clip_x0)
  a, s = _coefs(schedule, t, z)
  a_next, s_next = _coefs(schedule, t_next, z)
  ratio = s_next / s
  return (z_next - ratio * z) / (a_next - ratio * a), z_next


def pd_loss(
  schedule: Schedule,
  student_fn: diffusion.ModelFn,
  teacher_fn: diffusion.ModelFn,
  x0: Array,
  rng: Array,
  *,
  num_steps: int,
  cond: Array | None = None,
  student_prediction: str = "v",
  teacher_prediction: str = "eps",
  weighting: str = "truncated_snr",
  clip_x0: float | None = None,
) -> Array:
  """Per-example progressive-distillation loss ([PD] Alg. 2), float32 [B].

  Draws i ~ U{1..N} and eps ~ N(0, I) per example, z_t = alpha_t x0 + sigma_t eps at t = t(i / N),
  and regresses the student's x-prediction x^ on the (stop-gradient) target x~ of `pd_target`:

    'truncated_snr': max(SNR_t, 1) ||x~ - x^||^2   ([PD] Sec. 4, "truncated SNR" weighting),
    'snr_plus_one':  (1 + SNR_t) ||x~ - x^||^2 = ||v~ - v^||^2  (the v-loss, "SNR+1"),

  with SNR_t = alpha_t^2 / sigma_t^2 and the squared norm averaged over the non-batch dims. The
  student may predict eps, x0 or v ([PD] uses v or x); its output is converted to x^ at t.

  Args:
    schedule: the teacher's `Schedule`.
    student_fn, teacher_fn: `fn(z, t [B] float32, cond)`.
    x0: [B, ...] data.
    rng: PRNG key (step index and noise).
    num_steps: N, the student's step count (a power of two); the teacher's is 2N.
    cond: conditioning passed to both models.
    student_prediction, teacher_prediction: 'eps', 'x0' or 'v'.
    weighting: one of WEIGHTINGS.
    clip_x0: the teacher's x0_hat clipping (`pd_target`).

  Returns:
    float32 [B].
  """
  n = check_num_steps(num_steps)
  diffusion.check_prediction(student_prediction)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown PD weighting {weighting!r}; choose one of {WEIGHTINGS}")
  i_rng, n_rng = jax.random.split(rng)
  i = jax.random.randint(i_rng, (x0.shape[0],), 1, n + 1)
  t = time_of(schedule, i / n)
  x = x0.astype(jnp.float32)
  a, s = _coefs(schedule, t, x)
  z_t = a * x + s * jax.random.normal(n_rng, x.shape, jnp.float32)
  target, _ = pd_target(
    schedule, teacher_fn, z_t, t, num_steps=n, cond=cond, prediction=teacher_prediction,
    clip_x0=clip_x0,
  )  # fmt: skip
  target = jax.lax.stop_gradient(target)
  sig = continuous.t_to_sigma(schedule, t)
  pred = student_fn(z_t.astype(x0.dtype), t, cond)
  x_hat = continuous.to_x0_eps_sigma(sig, z_t, pred, prediction=student_prediction)[0]
  snr = 1.0 / sig**2  # alpha^2 / sigma^2 of the VP view = 1 / sigma_ve^2
  w = jnp.maximum(snr, 1.0) if weighting == "truncated_snr" else 1.0 + snr
  return w * jnp.mean((target - x_hat) ** 2, axis=tuple(range(1, x.ndim)))
