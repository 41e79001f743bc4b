"""The `vaekit` command: one subcommand per job; user errors print one line, no traceback.

Building the parser imports no torch, diffusers or torchmetrics: `vaekit --help`, a subcommand's
`--help` and argument errors answer at once; the library loads only once a command runs.
"""

import sys
import warnings

from vaekit import __version__
from vaekit.cli import cache, evaluate, images, model, probe, train, weights
from vaekit.cli.args import Parser
from vaekit.errors import VaekitError, plain_text

COMMAND_GROUPS = (model, weights, train, cache, evaluate, probe, images)


def build_parser():
    """The top-level parser with every subcommand registered."""
    parser = Parser(
        prog="vaekit",
        description="Train, fine-tune, export, bulk-encode and evaluate latent-diffusion VAEs (AutoencoderKL).",
    )
    parser.add_argument("--version", action="version", version=f"vaekit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", help="the job to run")
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def subcommand_parser(parser, argv):
    """The parser of the subcommand named in `argv` (the deepest one, for `weights fetch`), or `parser`."""
    current = parser
    for word in argv:
        actions = [a for a in current._actions if hasattr(a, "choices") and isinstance(a.choices, dict)]
        if actions and word in actions[0].choices:
            current = actions[0].choices[word]
    return current


def leave_process_group():
    """Close a torch.distributed group that a failed multi-process run leaves open.

    Every process of such a run stops with the same error; left to the interpreter's exit, the group's
    destructor may find its peers already gone and abort (SIGABRT) instead of exiting with the error code.
    """
    dist = sys.modules.get("torch.distributed")  # only runs that imported it can have a group
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # best effort: the error the user needs has been printed
            pass


def main(argv=None):
    """Console-script entry point."""
    # A deprecation notice huggingface_hub prints on every diffusers load; it is not the user's concern.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    argv = sys.argv[1:] if argv is None else list(argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 must never stop a print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # reported by the subcommand itself, with its usage and the closest option
        subcommand_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extras)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except VaekitError as e:
        print(f"vaekit {args.command}: error: {plain_text(e)}", file=sys.stderr)
        leave_process_group()
        return 2
    except KeyboardInterrupt:
        print(f"vaekit {args.command}: interrupted", file=sys.stderr)
        return 130
