"""The README's workflows run as written, at a tiny scale, so that they cannot rot.

The commands between `<!-- workflows:begin -->` and `<!-- workflows:end -->` are taken from
README.md verbatim, in order. Each gets `--config.KEY=VALUE` overrides appended (a tiny
U-Net, a few steps: absl applies the last value of a key), `runs/` is moved to a temporary
folder, the fixed port of the multi-host example to a free one, and `.venv/bin/python` to
this interpreter. The test then checks what the README says each workflow produces.

The multi-host chain checks what the README says of it: both processes end at the same
parameters, each checkpoints its own data-iterator state, only process 0 logs progress and
writes metrics.

Cost: every command is a subprocess that pays for its imports and compilation; the runs
themselves are kept to a few steps and the training runs' final grids to 8 samples.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, free_port, xla_flags

from jdiff import audio_io

README = os.path.join(REPO, "README.md")
TEACHER = "runs/digits"  # distill_digits.py's default distill.teacher_workdir

# A tiny U-Net and schedule for every diffusion config (pixels 16x16, or 4x4x4 latents).
TINY_DIFFUSION = {
  "model.ch": "8",
  "model.ch_mult": "(1,2)",
  "model.attn_resolutions": "(8,)",
  "model.num_groups": "4",
  "diffusion.num_steps": "50",
  "optim.schedule": "constant",
  "optim.warmup_steps": "2",
  "train.batch_size": "8",
  "train.log_every": "2",
  "train.ckpt_every": "3",
  "sample.batch_size": "8",
  "sample.num_samples": "8",  # the final grid of every training run
  "sample.grid_size": "8",
  "eval.batch_size": "40",
  "eval.bound_examples": "4",
  # The end-of-training FD/IS of digits.py (500 samples, a classifier trained first) is
  # tested at tiny scale by tests/test_fid.py; skipped here to keep the suite inside its time.
  "eval.quality_samples": "0",
}
# audio_notes.py shrunk: a 2-level 1-D U-Net, 4 samples of 2 Heun steps, a 5-step classifier.
TINY_AUDIO = {
  "model.ch": "8",
  "model.ch_mult": "(1,2)",
  "model.attn_resolutions": "(1024,)",
  "model.num_groups": "4",
  "diffusion.num_steps": "50",
  "optim.warmup_steps": "1",
  "train.batch_size": "8",
  "train.log_every": "1",
  "train.ckpt_every": "3",
  "sample.num_steps": "2",
  "sample.num_samples": "4",
  "sample.grid_size": "4",
  "sample.batch_size": "4",
  "eval.quality_samples": "4",
  "eval.num_samples": "4",
  "eval.is_splits": "2",
  "eval.classifier_steps": "5",
}
# --mode=fid of the digits at tiny scale: 16 samples, a 60-step classifier (cached per
# data_dir and step count, shared with tests/test_fid.py's).
TINY_FID = {"eval.num_samples": "16", "eval.is_splits": "2", "eval.pr_samples": "0",
            "eval.classifier_steps": "60"}  # fmt: skip
# distill_digits.py: one progressive round, 8 -> 4 DDIM steps (the README samples steps_0004).
TINY_DISTILL = {"distill.steps": "8", "distill.final_steps": "4"}
TINY_AUTOENCODER = {
  "autoencoder.overrides.ch": "8",
  "autoencoder.overrides.num_groups": "4",
  "optim.schedule": "constant",
  "optim.warmup_steps": "2",
  "train.batch_size": "8",
  "train.log_every": "2",
  "train.ckpt_every": "3",
  "eval.batch_size": "40",
  "eval.num_recon_images": "4",
}


def readme_commands() -> list[str]:
  """The workflow commands of the README, continuation lines joined, in order."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  blocks = re.findall(r"<!-- workflows:begin -->(.*?)<!-- workflows:end -->", text, flags=re.S)
  commands = []
  for code in re.findall(r"```bash\n(.*?)```", "".join(blocks), flags=re.S):
    lines = [c.strip() for c in code.replace("\\\n", " ").splitlines()]
    commands += [c for c in lines if c and not c.startswith("#")]
  return commands


def tiny(args: list[str], data_dir: str) -> list[str]:
  """Appends the tiny overrides for the command's config; scales step and sample counts."""
  given = dict(a[len("--config.") :].split("=", 1) for a in args if a.startswith("--config."))
  config = next(a for a in args if a.startswith("--config="))
  if "audio_" in config:
    over = dict(TINY_AUDIO)
  else:
    if "ae_" in config:
      over = dict(TINY_AUTOENCODER)
    else:
      over = dict(TINY_DIFFUSION, **(TINY_DISTILL if "distill_" in config else {}))
      over.update(TINY_FID if "--mode=fid" in args else {})
    over["data.image_size"] = "16"  # the stage-1 size too: latents 4x4x4
  over["data.data_dir"] = data_dir
  over["train.num_steps"] = str(max(3, int(given.get("train.num_steps", 1500)) // 500))
  if any(a.endswith("t2i_digits.py") for a in args):  # heads of 8 channels in the tiny U-Net
    over["model.attention_head_dim"] = "8"
  for key in ("sample.num_samples", "sample.grid_size"):
    if key in given:
      over[key] = str(min(int(given[key]), 8))
  return args + [f"--config.{k}={v}" for k, v in over.items()]


def chains(commands: list[str]) -> list[list[str]]:
  """The commands grouped by the run directory they work on (a latent run joins its
  autoencoder's chain; `wait` joins the background commands before it), in README order
  within each group. Groups share nothing, so they can run concurrently."""
  groups: dict[str, list[str]] = {}
  last = None
  for command in commands:
    if command != "wait":
      dirs = re.findall(r"(?:--workdir|autoencoder_workdir)=(\S+)", command)
      if "distill_digits.py" in command:  # after its teacher, the main job's run
        dirs.append(TEACHER)
      # a run joins the chain of a run it reads or lies inside (a distillation round)
      owner = lambda d: next((g for g in groups if d == g or d.startswith(g + "/")), None)  # noqa: E731
      last = next((owner(d) for d in reversed(dirs) if owner(d)), dirs[0])
    groups.setdefault(last, []).append(command)
  return list(groups.values())


def run_chain(commands: list[str], root: str, data_dir: str, port: str) -> dict[str, str]:
  """Runs README commands in order (background `&` ones concurrently until `wait`);
  returns stderr by line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
  logs, background = {}, []
  for command in commands:
    if command == "wait":
      for cmd, proc in background:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{err[-4000:]}"
        logs[cmd] = err
      background = []
      continue
    bg = command.endswith("&")
    args = shlex.split(command.rstrip("&"))
    assert args[0] == ".venv/bin/python", (
      f"README workflow commands use .venv/bin/python: {command}"
    )
    if any(a.endswith("distill_digits.py") for a in args):  # its default teacher, moved too
      args.append(f"--config.distill.teacher_workdir={TEACHER}")
    args = [sys.executable] + [a.replace("runs/", f"{root}/runs/") for a in args[1:]]
    args = [a.replace("127.0.0.1:12355", f"127.0.0.1:{port}") for a in tiny(args, data_dir)]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    if bg:
      background.append((command, proc))
      continue
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{command}\n{err[-4000:]}"
    logs[command] = err
  assert not background, "a background command without a following `wait`"
  return logs


def run_workflows(root: str, data_dir: str) -> dict[str, str]:
  """Runs every README command, the independent chains two at a time; stderr by line."""
  port = str(free_port())
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = [
      pool.submit(run_chain, chain, root, data_dir, port) for chain in chains(readme_commands())
    ]
    return {k: v for f in futures for k, v in f.result().items()}


def metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.e2e
def test_readme_workflows(tmp_path, digits_dir):
  commands = readme_commands()
  assert len(commands) == 21, commands  # 10 workflows; a changed README updates this test
  assert [len(c) for c in chains(commands)] == [8, 2, 5, 3, 3], chains(commands)
  logs = run_workflows(str(tmp_path), digits_dir)
  runs = tmp_path / "runs"

  # Pixel diffusion, resumed from step 3 to 6; sampling and evaluation at step 3.
  digits = runs / "digits"
  assert (digits / "samples" / "grid_0000003.png").exists()
  assert (digits / "samples" / "grid_0000006.png").exists()
  assert sorted(os.listdir(digits / "checkpoints")) == ["3", "6"]
  npz = np.load(digits / "samples" / "samples_dpmpp_2m_sde15_step3.npz")
  assert npz["images"].shape == (8, 16, 16, 1) and np.all(np.abs(npz["images"]) <= 1.0)
  rows = metrics(str(digits))
  assert any(r["step"] == 3 and "eval/loss" in r and "eval/bpd_bound" in r for r in rows)
  resumed = next(err for cmd, err in logs.items() if "train.num_steps=3000" in cmd)
  assert "resumed from" in resumed and "at step 3" in resumed
  sampled = next(err for cmd, err in logs.items() if "--mode=sample" in cmd and "digits.py" in cmd)
  assert "samples: 8/8 (100%)" in sampled  # progress lines

  # Class-conditional, guided samples.
  cond = runs / "digits_cond" / "samples"
  (cond_npz,) = [
    f for f in os.listdir(cond) if f.startswith("samples_ddim50") and f.endswith(".npz")
  ]
  assert np.load(cond / cond_npz)["images"].shape == (8, 16, 16, 1)

  # The two latent stages: reconstructions, the scale factor, eval, decoded latent samples.
  ae = runs / "ae_digits"
  assert (ae / "recon" / "recon_0000003.png").exists() and (ae / "latent_scale.json").exists()
  row = metrics(str(ae))[-1]  # eval_autoencoder: every held-out digit, a finite PSNR
  assert row["step"] == 3 and row["eval/examples"] == 200.0 and np.isfinite(row["eval/psnr"])
  assert (runs / "ldm_digits" / "samples" / "grid_0000003.png").exists()

  # Text to image on the same latents: the prompts cycle over the samples, in order.
  t2i = runs / "t2i_digits" / "samples"
  assert (t2i / "grid_0000003.png").exists()
  (t2i_npz,) = [f for f in os.listdir(t2i) if f.startswith("samples_") and f.endswith(".npz")]
  f = np.load(t2i / t2i_npz)
  assert f["images"].shape == (8, 16, 16, 1) and np.all(np.isfinite(f["images"]))
  assert list(f["prompts"][:4]) == ["the digit 3", "a handwritten seven", "nine", "the digit 3"]

  # Multi-host: two processes, one checkpoint with both processes' data-iterator states, the
  # same parameters in both; process 0 alone logs progress and writes metrics.
  two = runs / "digits_2p"
  assert sorted(os.listdir(two / "checkpoints")) == ["3"]
  assert [r["step"] for r in metrics(str(two)) if "train/loss" in r] == [2, 3]
  data = sorted(f for f in os.listdir(two / "checkpoints" / "3" / "data") if f.endswith(".json"))
  assert data == ["process_0-of-2.json", "process_1-of-2.json"]
  errs = [next(e for c, e in logs.items() if f"--process_id={i}" in c) for i in range(2)]
  assert all(f"process {i}/2, 1 local devices" in errs[i] for i in range(2))
  assert "step 3/3" in errs[0] and "img/s" in errs[0] and "step 3/3" not in errs[1]
  sums = [re.search(r"process \d: params checksum (\S+) at step 3", e).group(1) for e in errs]
  assert sums[0] == sums[1]

  # Distillation after the main job (the teacher at step 6): the progressive round 8 -> 4 is
  # an ordinary workdir with its record, sampled with DDIM on its own 4-step grid; the
  # consistency student is scored by --mode=fid in one step.
  pd = runs / "digits_pd" / "steps_0004"
  record = json.loads((pd / "distilled.json").read_text())
  assert record["method"] == "progressive" and record["num_steps"] == 4
  assert (pd / "samples" / "grid_0000003.png").exists()
  (pd_npz,) = [f for f in os.listdir(pd / "samples") if f.endswith(".npz")]
  assert pd_npz == "samples_ddim4_step3.npz"  # its own 4 steps, not the config's 2
  assert np.load(pd / "samples" / pd_npz)["images"].shape == (8, 16, 16, 1)
  cd = [r for r in metrics(str(runs / "digits_cd")) if "quality/fd" in r]
  assert cd and np.isfinite(cd[-1]["quality/fd"]) and cd[-1]["quality/num_samples"] == 16

  # Audio: training ends with the FD and pitch-accuracy report; --mode=sample writes the .npz
  # and one 16-bit WAV per sample holding the same samples; --mode=fid scores them again.
  notes = runs / "notes"
  quality = [r for r in metrics(str(notes)) if "quality/fd" in r]
  assert len(quality) == 2 and all(np.isfinite(r["quality/fd"]) for r in quality)
  assert all(0 <= r["quality/pitch_accuracy"] <= 1 for r in quality)
  assert quality[0]["quality/heldout_pitch_accuracy"] == 1.0
  (notes_npz,) = [f for f in os.listdir(notes / "samples") if f.endswith(".npz")]
  samples = np.load(notes / "samples" / notes_npz)["images"]
  assert samples.shape == (4, 2048, 1) and np.isfinite(samples).all()
  assert np.abs(samples).max() <= 1.0 + 1e-5  # Heun's last step lands on the clipped x0
  stem = str(notes / "samples" / notes_npz[: -len(".npz")])
  for i, row in enumerate(samples):
    wav, rate = audio_io.read_wav(f"{stem}_{i:03d}.wav")
    assert rate == 8000
    pcm = np.clip(np.round(row.astype(np.float64) * 32768), -32768, 32767)  # +1 -> 32767
    np.testing.assert_array_equal(wav, pcm / 32768)
