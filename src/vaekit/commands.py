"""Model subcommands: info, export, convert."""


def add_commands(subparsers):
    """Register info, export and convert."""
