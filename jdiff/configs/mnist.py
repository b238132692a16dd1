"""MNIST at 28x28 (resized to 32x32) from the tfds catalog."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "mnist"
  c.data.image_size = 32
  c.model.ch = 64
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (8,)
  c.model.num_groups = 32
  c.model.dropout = 0.1
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 1000
  c.optim.schedule = "constant"
  c.ema_decay = 0.9999
  c.train.num_steps = 100_000
  c.train.batch_size = 128
  c.train.ckpt_every = 5000
  c.train.sample_every = 5000
  c.train.log_every = 500
  return c
