"""Few-step students of the README's digits model (`--mode=distill`, jdiff/runs/distill.py).

  python -m experiments.main --config=jdiff/configs/distill_digits.py --mode=distill \
      --workdir=runs/digits_pd [--config.distill.method=consistency]

The teacher is the main job's workdir runs/digits (distill.teacher_workdir); the student keeps
its network and schedule (the model and diffusion sections are the digits config's).
`--config=jdiff/configs/distill_digits.py:tiny` takes the tiny config as its base instead (the
tests' teacher), with tiny's training sizes.
"""

import importlib

import ml_collections


def get_config(base: str = "digits"):
  c = importlib.import_module(f"jdiff.configs.{base}").get_config()
  c.unlock()
  c.distill = d = ml_collections.ConfigDict()
  d.method = "progressive"  # progressive | consistency | consistency_training
  d.teacher_workdir = "runs/digits"
  # Progressive distillation [PD]: the teacher's DDIM steps, halved every round (a run into
  # <workdir>/steps_<N>; the rounds share train.num_steps equally) down to final_steps.
  d.steps = 16
  d.final_steps = 1
  d.round_steps = 0  # set per round by --mode=distill (0: the top-level run)
  d.pd_weighting = "truncated_snr"  # truncated_snr | snr_plus_one ([PD] Sec. 4)
  # Consistency distillation / training [CM], [iCT]: levels sigma(t=0) .. sigma_max.
  d.num_levels = 18  # consistency: the Karras levels of the teacher's ODE steps
  d.solver = "heun"  # consistency: the teacher's ODE step, euler | heun
  d.s0 = 10  # consistency_training: [iCT]'s curriculum N(k) from s0 + 1 to s1 + 1 levels
  d.s1 = 160
  d.sigma_max = 80.0
  d.sigma_data = 0.5
  d.metric = "pseudo_huber"  # pseudo_huber ([iCT]) | l2
  d.loss_weighting = "ict"  # ict (1 / (sigma_{i+1} - sigma_i)) | uniform ([CM])
  d.level_sampling = "uniform"  # uniform ([CM]) | log_normal ([iCT])
  d.target = "online"  # online: theta^- = sg(theta) ([iCT]) | ema: the run's EMA ([CM])
  # The student predicts v ([PD] Sec. 4: an eps student cannot take large steps, its x0_hat =
  # (z - sigma eps) / alpha blows up as alpha -> 0); it starts from the eps teacher's weights.
  # The teacher is run as it samples, its x0_hat clipped to sample.clip_x0.
  c.diffusion.prediction = "v"
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.ema_decay = 0.99
  c.sample.sampler = "auto"  # PD students: DDIM on their own grid; consistency: [CM] Alg. 1
  c.sample.num_steps = 2  # the consistency sampler's steps (PD students: their own N)
  c.eval.quality_samples = 0
  if base == "digits":
    c.train.num_steps = 2000  # the whole distillation (PD: 500 per round)
    c.train.ckpt_every = 250
  else:  # tiny: 8 teacher steps halved to 2, on its 50-step schedule
    d.steps, d.final_steps, d.s1 = 8, 2, 40
  c.lock()
  return c
