"""jdiff's entry point from a checkout: `python -m experiments.main --config=... --workdir=...`.

The flags, the modes and the error handling live in `jdiff.cli` (also installed as the
console script `jdiff` and as `python -m jdiff`); see its docstring.
"""

from jdiff import cli

if __name__ == "__main__":
  cli.run()
