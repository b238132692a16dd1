"""Collective operations in a compiled program's HLO text, inside and outside its loops.

Used by the tests and benchmarks that check what the partitioner inserted: how many
all-reduces run per step (inside a `lax.scan`'s while body or after it), whether any
all-to-all reshuffles activations, and in which dtype the parameters are all-gathered.
"""

from __future__ import annotations

import collections
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = TYPE op(` or `%name = TYPE op-start(`; TYPE may be a tuple `(f32[..], bf16[..])`.
_INSTR = re.compile(
  r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>"
  + "|".join(COLLECTIVES)
  + r")(?:-start)?\("
)
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(
  r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([^\s,)}]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_DTYPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|f8\w*)\[")


def _computations(text: str) -> dict[str, list[str]]:
  comps, name = {}, None
  for line in text.splitlines():
    m = _HEADER.match(line)
    if m:
      name = m.group("name")
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  return comps


def _callees(lines: list[str]) -> set[str]:
  out = set()
  for line in lines:
    out.update(_CALLEE.findall(line))
    for group in _BRANCHES.findall(line):
      out.update(n.strip().lstrip("%") for n in group.split(","))
  return out


def collectives(text: str) -> dict[str, collections.Counter]:
  """Counts the collectives of a compiled HLO module (`jitted.lower(...).compile().as_text()`).

  Returns:
    {'loop': Counter, 'outside': Counter, 'dtypes': Counter}: 'loop' counts the collectives in
    while-loop bodies (and everything they call), 'outside' the rest, by op name
    ('all-reduce', ...); an async pair (`-start`/`-done`) counts once, a combined (tuple)
    collective once. 'dtypes' counts the element types of the operands' results by
    (op, dtype), e.g. ('all-gather', 'bf16'), one per tuple element.
  """
  comps = _computations(text)
  bodies = set()
  for lines in comps.values():
    for line in lines:
      if " while(" in line:
        m = re.search(r"body=%([^\s,)}]+)", line)
        if m:
          bodies.add(m.group(1))
  in_loop, todo = set(), list(bodies)
  while todo:
    name = todo.pop()
    if name in in_loop or name not in comps:
      continue
    in_loop.add(name)
    todo.extend(_callees(comps[name]))
  out = {"loop": collections.Counter(), "outside": collections.Counter()}
  dtypes = collections.Counter()
  for name, lines in comps.items():
    where = "loop" if name in in_loop else "outside"
    for line in lines:
      m = _INSTR.match(line)
      if m:
        out[where][m.group("op")] += 1
        for dt in _DTYPE.findall(m.group("type")):
          dtypes[(m.group("op"), dt)] += 1
  out["dtypes"] = dtypes
  return out
