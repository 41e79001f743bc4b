"""The command line's conventions and shared flags; nothing here imports torch.

- Every option is spelled `--snake_case`, exactly like its config key, and also answers to
  `--snake-case` (added by `Parser.add_argument`), on every command.
- An argument error prints the (sub)command's own usage and suggests the closest option.
- `config_from_args(cls, args)` builds any job config: its `--config` YAML first, then every flag
  given on the command line (flags default to None, so only those given override the YAML).
"""

import argparse
import dataclasses
import difflib
import re
import sys

from vaekit.config import from_dict, load_yaml

MODEL_HELP = "preset:NAME, a diffusers folder, a single-file checkpoint, a training checkpoint or a hub id"


class Parser(argparse.ArgumentParser):
    """argparse with dashed aliases for snake_case options and errors that suggest the closest option."""

    def add_argument(self, *names, **kwargs):
        """As argparse's, plus `--a-b` for every `--a_b` (the underscore spelling stays the one shown first)."""
        aliases = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        return super().add_argument(*names, *[a for a in aliases if a not in names], **kwargs)

    def option_names(self):
        """Every option string this parser accepts."""
        return [s for action in self._actions for s in action.option_strings]

    def suggestion(self, word):
        """' (did you mean --x?)' for the closest known option or subcommand, or ''."""
        if word.startswith("-"):
            candidates = self.option_names()
            word = word.split("=", 1)[0]
        else:
            candidates = [c for action in self._actions if isinstance(action, argparse._SubParsersAction)
                          for c in action.choices]
        close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
        return f" (did you mean {close[0]}?)" if close else ""

    def error(self, message):
        """Print this parser's usage and the error, with a suggestion for an unknown option or command."""
        if match := re.match(r"unrecognized arguments: (\S+)", message):
            message += self.suggestion(match.group(1))
        elif match := re.search(r"invalid choice: '([^']+)'", message):
            message += self.suggestion(match.group(1))
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_command(subparsers, name, summary, description=None):
    """A subcommand parser with a one-line `summary` (the help list) and a description (its own --help)."""
    return subparsers.add_parser(name, help=summary, description=description or summary[0].upper() + summary[1:] + ".")


def add_model_arguments(parser, name="model", positional=True, help_text="the model", required=True,
                        repeatable=False):
    """The model argument, its `-o/--override key=value` and `--weights` (for training checkpoints)."""
    text = f"{help_text}: {MODEL_HELP}"
    if positional:
        parser.add_argument(name, help=text)
    elif repeatable:
        parser.add_argument(f"--{name}", action="append", metavar="MODEL", help=f"{text} (repeatable)")
    else:
        parser.add_argument(f"--{name}", required=required, metavar="MODEL", help=text)
    parser.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                        help="override an AutoencoderKL config field, e.g. -o scaling_factor=0.13025 (repeatable)")
    parser.add_argument("--weights", choices=["ema", "raw"],
                        help="for a training checkpoint: the EMA or the raw weights (default: ema)")


def load_model_from_args(args, name="model", **kwargs):
    """The model named by `add_model_arguments` options, through vaekit.model.load.load_vae."""
    from vaekit.model.load import load_vae  # loads torch and diffusers: only once a command runs

    return load_vae(getattr(args, name), args.override, weights=args.weights or "ema", **kwargs)


def add_config_argument(parser, what):
    """`--config FILE`: a YAML of `what`'s keys, which the flags given override."""
    parser.add_argument("--config", metavar="FILE", help=f"YAML file with {what} keys (named like these flags); "
                                                        f"flags given on the command line override it")


def config_from_args(cls, args, **fixed):
    """A `cls` job config: its `--config` YAML, then every flag given, then `fixed`; checked by vaekit.config."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is not None and value != []:
            data[field.name] = value
    data.update(fixed)
    return from_dict(cls, data)


def flag(parser, name, help_text, **kwargs):
    """A boolean `--name` / `--no-name` flag that is None unless given."""
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, help=help_text, **kwargs)
