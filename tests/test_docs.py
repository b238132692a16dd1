"""The primitives guide (docs/primitives.md) runs as written: its Python blocks, in order.

Each block asserts its own closed form (the exact Gaussian denoiser's loss, the sampled law,
the guidance formula, the exact NLL), so this test fails when the page and the code disagree.
"""

from __future__ import annotations

import os
import re

DOC = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "primitives.md"
)


def python_blocks(path: str) -> list[str]:
  with open(path) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_primitives_guide_runs():
  blocks = python_blocks(DOC)
  assert len(blocks) == 5, f"expected the guide's 5 sections, found {len(blocks)} blocks"
  namespace: dict = {"__name__": "docs_primitives"}
  for i, block in enumerate(blocks):
    code = compile(block, f"{DOC}:block{i + 1}", "exec")
    exec(code, namespace)  # noqa: S102 - the page's own example
