"""The `vaekit` command: one subcommand per job; user errors print one line, no traceback."""

import argparse
import importlib
import sys
import warnings

from vaekit.errors import VaekitError

# Each module defines `add_commands(subparsers)`, registering parsers whose defaults hold `func(args)`.
COMMAND_MODULES = (
    "vaekit.commands",
    "vaekit.weights",
    "vaekit.train",
    "vaekit.encode",
    "vaekit.latents",
    "vaekit.evaluate",
    "vaekit.diagnose",
    "vaekit.reconstruct",
)


def build_parser():
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="vaekit",
        description="Train, fine-tune, export, bulk-encode and evaluate latent-diffusion VAEs (AutoencoderKL).",
    )
    from vaekit import __version__

    parser.add_argument("--version", action="version", version=f"vaekit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv=None):
    """Console-script entry point."""
    # A deprecation notice huggingface_hub prints on every diffusers load; it is not the user's concern.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except VaekitError as e:
        print(f"vaekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
