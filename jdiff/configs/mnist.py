"""MNIST at 28x28 (resized to 32x32) from the tfds catalog."""

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.update(name="mnist", image_size=32)
  c.model.update(
    ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), num_groups=32, dropout=0.1
  )
  c.optim.update(lr=2e-4, warmup_steps=1000, schedule="constant")
  c.ema_decay = 0.9999
  c.train.update(
    num_steps=100_000, batch_size=128, ckpt_every=5000, sample_every=5000, log_every=500
  )
  return c
