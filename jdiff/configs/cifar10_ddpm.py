"""The DDPM paper's CIFAR-10 recipe (Ho et al. 2020, Sec. 4 and Appendix B)."""

from jdiff.configs import default
from jdiff.models import unet


def get_config():
  c = default.get_config()
  c.data.update(name="cifar10", image_size=32, random_flip=True)
  # The paper's U-Net (35.7M parameters), as `jdiff.models.make_unet("ddpm_cifar10")`.
  c.model.update(unet.PRESETS["ddpm_cifar10"], use_scale_shift_norm=False)
  c.diffusion.update(schedule="linear", num_steps=1000)
  c.optim.update(lr=2e-4, warmup_steps=5000, schedule="constant", grad_clip=1.0, b2=0.999)
  c.update(ema_decay=0.9999, ema_warmup=False)
  c.train.update(
    num_steps=800_000, batch_size=128, log_every=100, ckpt_every=10_000, sample_every=10_000
  )
  c.sample.update(sampler="ddpm", num_steps=1000)
  c.eval.batch_size = 256
  return c
