"""Class-conditional synthetic notes (jdiff_notes: 12 pitch classes, 8 kHz, 2,048 samples) with
the 1-D U-Net, label dropout and classifier-free guidance; scored by FD of the spectrogram
classifier and by pitch accuracy (jdiff.metrics.audio) at the end of training.

`--config.model.arch=diffwave` trains the DiffWave backbone of `c.diffwave` instead.
"""

import ml_collections

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "jdiff_notes"  # embedded, synthesised offline (jdiff.data.notes)
  c.data.image_size = 0  # signals are not resized
  c.conditional = True
  c.train.label_dropout = 0.1
  c.model.arch = "unet1d"
  c.model.ch = 16  # the 2,048-long first levels dominate the cost: keep them narrow
  c.model.ch_mult = (1, 2, 2, 4, 4, 4)  # lengths 2048 .. 64
  c.model.attn_resolutions = (64,)
  c.model.num_groups = 8
  c.model.conv_impl = "xla"
  # EDM (preconditioning, log-normal sigma, Heun on the Karras grid) with the notes' scale:
  # after 1,200 steps its pitch accuracy is 0.85 (240 samples), DDPM-eps's 0.18 after 600.
  c.objective = "edm"
  c.edm.sigma_data = 0.25  # the notes' RMS level (peaks 0.5-0.8 under the envelopes)
  c.sample.sampler = "heun"
  c.sample.spacing = "karras"
  c.optim.lr = 1e-3
  c.train.num_steps = 1200
  c.train.batch_size = 32
  c.train.ckpt_every = 600
  c.sample.num_steps = 18  # Heun: 35 network calls
  c.sample.guidance_scale = 2.0
  c.sample.num_samples = 24
  c.sample.grid_size = 24
  c.sample.batch_size = 48
  c.eval.bound_examples = 0
  c.eval.quality_samples = 240  # FD and pitch accuracy at the end of training
  c.eval.num_samples = 240
  c.eval.pr_samples = 0
  c.eval.classifier_steps = 300
  with c.unlocked():
    c.diffwave = ml_collections.ConfigDict(  # jdiff.models.diffwave.DiffWave
      dict(residual_channels=32, layers=12, dilation_cycle=6, embed_dim=128)
    )
  return c
