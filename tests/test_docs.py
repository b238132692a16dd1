"""The documentation states what is, and its examples run.

* docs/primitives.md runs as written: its Python blocks, in order. Each block asserts its own
  closed form (the exact Gaussian denoiser's loss, the sampled law, the guidance formula, the
  exact NLL), so this test fails when the page and the code disagree.
* README.md names every shipped config, and its command lines set only config keys that
  exist and that their mode reads (a `--mode=fid` run counts `eval.num_samples`).
* README.md and BENCHMARKS.md state what is: no issue numbers, no "the lead", no history
  (that goes to CHANGELOG.md).
"""

from __future__ import annotations

import os
import re
import shlex

import pytest
from conftest import REPO

from jdiff.configs import default

DOC = os.path.join(REPO, "docs", "primitives.md")
README = os.path.join(REPO, "README.md")
BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
CONFIGS = os.path.join(REPO, "jdiff", "configs")


def read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def python_blocks(path: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", read(path), flags=re.S)


def test_primitives_guide_runs():
  blocks = python_blocks(DOC)
  assert len(blocks) == 5, f"expected the guide's 5 sections, found {len(blocks)} blocks"
  namespace: dict = {"__name__": "docs_primitives"}
  for i, block in enumerate(blocks):
    code = compile(block, f"{DOC}:block{i + 1}", "exec")
    exec(code, namespace)  # noqa: S102 - the page's own example


# Words that narrate history or name the people and tickets behind a change.
HISTORY = [
  r"\bissues? \d+",
  r"\(issue\b",
  r"\bthe lead\b",
  r"\bonce the \w+ (mode )?lands\b",
  r"\bbefore the last change\b",
  r"\bnot (re-?)?measured since\b",
]


def history_lines(text: str) -> list[str]:
  """The lines of `text` that match a HISTORY pattern."""
  return [line for line in text.splitlines() if any(re.search(p, line, re.I) for p in HISTORY)]


def test_history_lines_finds_the_narrative():
  text = "FD 7.29.\nThe run reported in issue 18 took 15 min.\nThe lead reran it.\nIS 7.93."
  assert history_lines(text) == ["The run reported in issue 18 took 15 min.", "The lead reran it."]
  assert history_lines("Issues are tracked elsewhere; 18 issues of digits") == []


@pytest.mark.parametrize("path", [README, BENCHMARKS], ids=os.path.basename)
def test_docs_state_what_is(path):
  found = history_lines(read(path))
  assert not found, f"{os.path.basename(path)} narrates history (CHANGELOG.md's job): {found}"


def test_readme_lists_every_config():
  text = read(README)
  assert "<!-- configs:begin -->" in text, "README.md: the config table's markers are missing"
  block = text.split("<!-- configs:begin -->")[1].split("<!-- configs:end -->")[0]
  listed = set(re.findall(r"^\| `(\w+\.py)` \|", block, flags=re.M))
  shipped = {f for f in os.listdir(CONFIGS) if f.endswith(".py") and f != "__init__.py"}
  assert listed == shipped, (
    f"missing: {sorted(shipped - listed)}, unknown: {sorted(listed - shipped)}"
  )


def readme_command_lines() -> list[list[str]]:
  """Every `experiments.main` / `jdiff` command line in README.md (code blocks, indented
  examples and inline code), continuation lines joined, as arguments; templates with
  `<name>` or `a|b` placeholders are left out."""
  text = read(README).replace("\\\n", " ")
  pattern = r"(?:\S*python3?\s+-m\s+(?:experiments\.main|jdiff)|\bjdiff)\s+--[^\n`]*"
  commands = []
  for match in re.findall(pattern, text):
    line = re.sub(r"\s+#.*", "", match).split("&&")[0].strip().rstrip('&"').strip()
    args = shlex.split(line)
    if not any("<" in a or "|" in a for a in args) and any(a.startswith("--config=") for a in args):
      commands.append(args)
  return commands


def config_of(args: list[str]):
  """The config a command names (`--config=jdiff/configs/NAME.py` or `--config=NAME`)."""
  import importlib  # pylint: disable=g-import-not-at-top

  name = next(a.split("=", 1)[1] for a in args if a.startswith("--config="))
  name = os.path.splitext(os.path.basename(name))[0]
  return importlib.import_module(f"jdiff.configs.{name}").get_config()


def test_readme_commands_set_existing_keys():
  commands = readme_command_lines()
  assert len(commands) >= 20, len(commands)  # every example, not a parsing accident
  for args in commands:
    config = config_of(args)
    for arg in args:
      if arg.startswith("--config."):
        key = arg[len("--config.") :].split("=", 1)[0]
        node = config
        for part in key.split("."):
          assert part in node, f"README: {' '.join(args)}\n  sets {key}, not a config key"
          node = node[part]


def test_fid_commands_count_with_eval_num_samples():
  """`--mode=fid` scores config.eval.num_samples (jdiff/runs/fid.py); sample.num_samples,
  which `--mode=sample` reads, would be ignored silently."""
  fid = [a for a in readme_command_lines() if "--mode=fid" in a]
  assert fid, "the README shows --mode=fid"
  for args in fid:
    keys = [a.split("=", 1)[0] for a in args]
    assert "--config.sample.num_samples" not in keys, " ".join(args)
  assert default.get_config().eval.num_samples == 5000  # what an unset count scores


def test_readme_points_at_existing_benchmark_sections():
  """`BENCHMARKS.md, "Name"` in the README names the start of a BENCHMARKS.md heading."""
  headings = re.findall(r"^#+ (.+)$", read(BENCHMARKS), flags=re.M)
  cited = re.findall(r'BENCHMARKS\.md,\s+"([^"]+)"', read(README))
  assert cited, "the README cites BENCHMARKS.md sections"
  missing = [c for c in cited if not any(h.startswith(c) for h in headings)]
  assert not missing, f"README cites BENCHMARKS.md sections that do not exist: {missing}"
