"""The command line: `main` and one module per command group. The only package that knows argparse."""

from vaekit.cli.main import main

__all__ = ["main"]
