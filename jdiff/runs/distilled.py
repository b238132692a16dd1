"""What a distilled workdir is, on disk: `<workdir>/distilled.json`, and how it samples.

`--mode=distill` writes the record before its first step: the method, the teacher and, for a
progressive-distillation round, the student's step count N. Every mode that samples
(`runs.generate.sample_fn`: sample, fid, edit, the training grids) reads it, so a distilled
workdir samples as what it is:

  progressive           DDIM on the student's own grid t(i / N) = i T / N - 1, i = N..0
                        ([PD]; `distill.progressive.student_grid`);
  consistency(_training) [CM] Alg. 1 (`sample.sampler='consistency'`, 'auto' with a
                        config that has a `distill` section); another sampler is an error.

`resolve` gives a config as it samples a workdir. A leaf of runs/: it imports no mode.
"""

from __future__ import annotations

import json
import os

import jax

from jdiff.distill.progressive import student_grid
from jdiff.runs import objectives
from jdiff.training.writers import write_json

RECORD_FILE = "distilled.json"
METHODS = ("progressive", "consistency", "consistency_training")
CONSISTENCY_METHODS = ("consistency", "consistency_training")
CHOICES = {  # the distill section's named options (`jdiff.distill`'s names)
  "solver": ("euler", "heun"),
  "metric": ("pseudo_huber", "l2"),
  "loss_weighting": ("ict", "uniform"),
  "level_sampling": ("uniform", "log_normal"),
  "target": ("online", "ema"),
  "pd_weighting": ("truncated_snr", "snr_plus_one"),
}


def pd_rounds(distill) -> int:
  """The progressive rounds of a distill section: log2(steps / final_steps) (powers of two)."""
  return (distill.steps // distill.final_steps).bit_length() - 1


def read_record(workdir: str) -> dict | None:
  """The workdir's record, or None for a workdir that is not distilled."""
  path = os.path.join(workdir, RECORD_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    try:
      record = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: damaged distillation record ({e}); restore or delete it") from e
  if not isinstance(record, dict) or "method" not in record:
    raise ValueError(f"{path}: damaged distillation record (no 'method'); restore or delete it")
  return record


def write_record(workdir: str, record: dict) -> None:
  """Writes (process 0) the record, replacing an older one."""
  if jax.process_index() == 0:
    write_json(os.path.join(workdir, RECORD_FILE), record)


def auto_sampler(config, record: dict | None = None) -> str | None:
  """The sampler 'auto' means for a consistency model: a distill config of a consistency
  method, or a workdir `record` (`read_record`) of one (None: the objective's own sampler)."""
  d = config.get("distill")
  if record is not None and record["method"] in CONSISTENCY_METHODS:
    return "consistency"
  if d is not None and d.method in CONSISTENCY_METHODS:
    return "consistency"
  return None


def sample_overrides(workdir: str, schedule, sampler: str) -> dict:
  """`make_sample_fn` options that the workdir's record implies for `sampler`.

  Raises:
    ValueError: a consistency model sampled with another sampler.
  """
  record = read_record(workdir)
  if record is None:
    return {}
  if record["method"] in CONSISTENCY_METHODS and sampler != "consistency":
    raise ValueError(
      f"{workdir} holds a consistency model ({RECORD_FILE}: method "
      f"{record['method']!r}); sample it with config.sample.sampler='consistency' (or 'auto' "
      f"with the distill config), not {sampler!r}"
    )
  n = student_steps(record, sampler)
  return {} if n is None else dict(grid=student_grid(schedule.num_steps, n), num_steps=n)


def student_steps(record: dict | None, sampler: str) -> int | None:
  """The DDIM step count of a progressive student (its `record`'s), else None."""
  if record is not None and record["method"] == "progressive" and sampler == "ddim":
    return int(record["num_steps"])
  return None


def sampler_of(config, workdir: str | None = None, *, record: dict | None = None) -> str:
  """`config.sample.sampler`, with 'auto' resolved: 'consistency' for a consistency model
  (the distill config's method, or the record of `workdir`, or `record` when read already),
  else the objective's own sampler."""
  if config.sample.sampler != "auto":
    return config.sample.sampler
  if record is None and workdir:
    record = read_record(workdir)
  return auto_sampler(config, record) or objectives.default_sampler(config.get("objective", "ddpm"))


def resolve(config, workdir: str | None = None):
  """`config` as it samples `workdir`: `sample.sampler` 'auto' resolved, and a progressive
  student's own step count in `sample.num_steps` (a locked copy; `config` if nothing changes)."""
  if "autoencoder" in config:  # a stage-1 config samples nothing
    return config
  record = read_record(workdir) if workdir else None  # read once
  sampler = sampler_of(config, record=record)
  steps = student_steps(record, sampler) or config.sample.num_steps
  if (sampler, steps) == (config.sample.sampler, config.sample.num_steps):
    return config
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.sample.sampler, c.sample.num_steps = sampler, steps
  c.lock()
  return c
