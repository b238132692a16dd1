"""Config-driven runs: the one place where a config and a workdir become a run.

  validate.py        every config rule, checked once (by `Setup`) before any work.
  setup.py           `Setup`, shared by every mode: dataset metadata (opened only by the
                     modes that read data) with the multi-host preparation barrier, mesh,
                     model or autoencoder, optimiser, random keys, checkpointer.
  builders.py        the U-Net / DiT (objective-wrapped) and the autoencoder of a config.
  generate.py        the leaf every mode samples through: sample function, per-batch
                     noise and labels, one `generate`.
  train.py           the training skeleton every training mode shares (`TrainMode`, `MeanLogger`).
  diffusion.py       `train_and_evaluate`, `sample`, `evaluate` (diffusion configs).
  distill.py         `distill`: few-step students of a trained model (--mode=distill).
  distilled.py       a distilled workdir's record and the sampler it implies (a leaf).
  autoencoder.py     `train_autoencoder`, `evaluate_autoencoder` (stage-1 configs).
  stage1.py          the stage-1 workdir on disk and `load_codec`.
  sample_options.py  the `config.sample` section as `make_sample_fn` options.

Why here and not in `experiments/`: these functions are library code that several
entry points share (experiments/main.py, the benchmarks, the tests, a notebook), and they
need to be importable from an installed `jdiff` whatever the working directory;
`experiments/` holds scripts and config files, which stay thin. Why not in
`jdiff/training/`: that package is a config-free toolkit (states, steps, optimiser,
sharding, checkpoints, loop, writers) usable with any config system or none; everything
that reads an `ml_collections` config lives here, so the toolkit never depends on it.
"""
