"""`python -m jdiff --config=... --workdir=... [--mode=...]`: see `jdiff.cli`."""

from jdiff import cli

if __name__ == "__main__":
  cli.run()
