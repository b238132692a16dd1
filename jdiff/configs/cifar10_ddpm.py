"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020, Sec. 4 and Appendix B)."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.random_flip = True
  c.model.ch = 128
  c.model.ch_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_groups = 32
  c.model.dropout = 0.1
  c.model.use_scale_shift_norm = False
  c.diffusion.schedule = "linear"
  c.diffusion.num_steps = 1000
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.schedule = "constant"
  c.optim.grad_clip = 1.0
  c.optim.b2 = 0.999
  c.ema_decay = 0.9999
  c.ema_warmup = False
  c.train.num_steps = 800_000
  c.train.batch_size = 128
  c.train.log_every = 100
  c.train.ckpt_every = 10_000
  c.train.sample_every = 10_000
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 1000
  c.eval.batch_size = 256
  return c
