"""The default config: the embedded 8x8-digits dataset (resized to 16x16) on a CPU.

Every other config overrides a few fields of this one.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.conditional = False  # class-conditional U-Net (needs a labelled dataset)

  c.data = ml_collections.ConfigDict()
  c.data.name = "jdiff_digits"  # embedded: scikit-learn's digits, built offline as a tfds dataset
  c.data.data_dir = ""  # tfds data_dir; "" = TFDS' default (~/tensorflow_datasets)
  c.data.image_size = 16  # square resize; 0 keeps the stored size
  c.data.random_flip = False
  c.data.train_split = "train"
  c.data.eval_split = "test"

  # Constructor arguments of jdiff.models.UNet (num_classes and out_channels come from data).
  c.model = ml_collections.ConfigDict()
  c.model.ch = 32
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 1
  c.model.head_channels = ml_collections.FieldReference(None, field_type=int)
  c.model.dropout = 0.0
  c.model.num_groups = 8
  c.model.use_scale_shift_norm = False
  c.model.resblock_updown = False
  c.model.learn_sigma = False
  c.model.dtype = "float32"
  c.model.remat = False
  # auto (Winograd for float32 on CPU, native elsewhere) | xla | winograd
  c.model.conv_impl = "auto"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "cosine"
  c.diffusion.num_steps = 1000
  c.diffusion.zero_terminal_snr = False
  c.diffusion.prediction = "eps"  # eps | x0 | v
  c.diffusion.weighting = "simple"  # simple | snr | min_snr
  c.diffusion.min_snr_gamma = 5.0
  c.diffusion.variance = "fixed_small"  # fixed_small | fixed_large | learned_range
  c.diffusion.vlb_weight = 0.001  # hybrid loss weight when learn_sigma

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = "adam"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.grad_clip = 1.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0

  c.ema_decay = 0.999
  c.ema_warmup = True

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1500
  c.train.batch_size = 64  # global, over all devices and processes
  c.train.log_every = 100
  c.train.ckpt_every = 500
  c.train.sample_every = 0  # 0: only at the end
  c.train.keep_checkpoints = 3
  c.train.label_dropout = 0.0  # classifier-free guidance training (conditional only)

  c.sample = ml_collections.ConfigDict()
  # Any name of jdiff.training.sampling.SAMPLERS: ddpm | ddim | pc | euler | heun | euler_a |
  # edm | dpmpp_2m | dpmpp_2m_sde | dpmpp_3m | unipc.
  c.sample.sampler = "ddim"
  c.sample.num_steps = 50  # ignored by ddpm (all T steps)
  # None: the sampler's own (ddim 0, pc / euler_a / dpmpp_2m_sde 1, dpmpp_3m 0); the other
  # samplers are deterministic and reject an eta.
  c.sample.eta = ml_collections.FieldReference(None, field_type=float)
  # "auto": the sampler's own grid: trailing (ddim, pc, euler_a, dpmpp_2m_sde), log_snr
  # (euler, heun, edm, dpmpp_2m, dpmpp_3m, unipc); ddpm takes every timestep. Others:
  # linspace for ddim / pc; log_snr | karras | uniform | trailing for the sigma-grid samplers
  # (heun, edm: log_snr | karras). A name the sampler does not accept is an error (see
  # jdiff/training/sampling.py for why leading / quadratic are not offered).
  c.sample.spacing = "auto"
  c.sample.clip_x0 = 1.0  # clip x0_hat to [-c, c] in every sampler; <= 0 disables
  # Imagen's dynamic thresholding: percentile p in (0, 1] of |x0_hat|, floored at clip_x0
  # (or 1); 0 disables. Pixel diffusion only (both must be 0 for latent diffusion).
  c.sample.dynamic_threshold = 0.0
  c.sample.guidance_scale = 1.0
  # A sigma grid fitted to the model (experiments/optimize_grid.py writes
  # <workdir>/grids/<sampler>_nfe<N>.json); it must match sampler and num_steps. "" = off.
  c.sample.grid_file = ""
  c.sample.guidance_rescale = 0.0
  c.sample.num_samples = 64
  c.sample.grid_size = 64
  c.sample.batch_size = 64
  c.sample.use_ema = True
  # Guidance variants (class-conditional models): guidance only where guidance_sigma_lo <=
  # sigma(t) <= guidance_sigma_hi (Kynkaanniemi et al. 2024; hi = 0: everywhere), or a scale
  # schedule in t: constant | linear | cosine (jdiff/models/guidance_schedules.py).
  c.sample.guidance_sigma_lo = 0.0
  c.sample.guidance_sigma_hi = 0.0
  c.sample.guidance_schedule = "constant"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 100
  c.eval.bound_examples = 16  # full T-step bound on this many eval examples (0: skip)
  c.eval.use_ema = True

  # Latent diffusion: the data are the latents of a frozen stage-1 autoencoder (see
  # experiments/configs/ae_digits.py); empty = pixel-space diffusion.
  c.latent = ml_collections.ConfigDict()
  c.latent.autoencoder_workdir = ""
  c.latent.scale_factor = 0.0  # 0: use the 1/std computed from the data by stage 1

  # Super-resolution (SR3 / cascades; jdiff/conditioning.py): factor > 0 trains the U-Net on
  # images conditioned on their factor-x average-pooled copy, upsampled and noise-augmented
  # with a level drawn in [0, aug_max]; sampling uses the level aug_level.
  c.superres = ml_collections.ConfigDict()
  c.superres.factor = 0
  c.superres.aug_max = 0.2
  c.superres.aug_level = 0.05

  # --mode=edit (jdiff/runs/edit.py): img2img (SDEdit) | inpaint | superres, from an .npz
  # (key 'images', uint8 or [-1, 1]) or a folder of PNGs; results go beside the input.
  c.edit = ml_collections.ConfigDict()
  c.edit.task = "img2img"
  c.edit.input = ""
  c.edit.mask = ""  # inpaint: .png / .npz / .npy; 1 (white) = generate, 0 (black) = keep
  c.edit.strength = 0.6  # img2img: run the last ceil(strength * num_steps) steps
  c.edit.jump_length = 1  # inpaint: RePaint's jump length and count (1, 1: replacement)
  c.edit.jump_n = 1
  c.edit.base_config = ""  # superres without input: sample a base model first (cascade)
  c.edit.base_workdir = ""
  c.edit.num = 16  # cascade: how many base samples

  c.lock()
  return c
