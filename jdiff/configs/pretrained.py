"""Sample, evaluate or fine-tune an imported pretrained U-Net (diffusers or ADM weights).

  python -m experiments.main --config=jdiff/configs/pretrained.py \
      --config.pretrained.path=google/ddpm-cifar10-32 --workdir=runs/ddpm_cifar10 --mode=sample

`pretrained.path` is a local diffusers directory (config.json + diffusion_pytorch_model
.safetensors, optionally scheduler_config.json), a hub name (needs huggingface_hub and
the network), or for `format=adm` an ADM .pt file with its flags
(`--config.pretrained.flags="--image_size 64 --num_channels 192 ..."`, or flags.json next
to it). The architecture, schedule and parameterisation come from the weights' own
configuration (jdiff/runs/pretrained.py); config.data must give the model's image shape.
`--mode=sample` / `--mode=eval` need no checkpoint; `--mode=train` fine-tunes from the
imported weights (and resumes from the workdir once it has a checkpoint).
"""

import ml_collections

from jdiff.configs import default


def get_config():
  c = default.get_config()
  c.data.name = "cifar10"  # the data the imported model was trained on (train / eval)
  c.data.image_size = 32
  c.data.random_flip = True
  p = ml_collections.ConfigDict()
  p.path = ""  # directory, hub name (owner/name) or ADM .pt file
  p.format = "diffusers"  # diffusers | adm
  p.flags = ""  # ADM: "--image_size 64 --num_channels 192 ..." (over flags.json)
  p.adm_variant = "guided"  # ADM defaults for omitted flags: guided | improved
  # Take x0 clipping / thresholding (and a DDIM spacing) from the scheduler config / ADM,
  # and ADM's timestep_respacing as sample.sampler / num_steps / eta / spacing (logged).
  p.scheduler_sampling = True
  with c.unlocked():
    c.pretrained = p
  # Fine-tuning: a small learning rate, EMA from the imported weights.
  c.optim.lr = 2e-5
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.ema_decay = 0.9999
  c.ema_warmup = False
  c.train.num_steps = 1000
  c.train.batch_size = 64
  c.sample.sampler = "ddim"
  c.sample.num_steps = 50
  c.eval.bound_examples = 0
  return c
