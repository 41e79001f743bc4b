"""Tile and memory-budget option values, parsed without torch (configs and the command line use them)."""

import re

from vaekit.errors import VaekitError


def parse_tile(value):
    """'auto', 'off' or an int from a CLI or API value."""
    if isinstance(value, str):
        if value in ("auto", "off"):
            return value
        if value.isdigit():
            return int(value)
        raise VaekitError(f"tile must be 'auto', 'off' or a size in pixels, got '{value}'.")
    if value is None:
        return "off"
    return value


TILE_MODES = ("exact", "fast")


def parse_tile_mode(value):
    """'exact' or 'fast' from a CLI or API value (None: exact)."""
    if value is None:
        return "exact"
    if value not in TILE_MODES:
        raise VaekitError(f"tile_mode must be 'exact' or 'fast', got {value!r}.")
    return value


def parse_bytes(value):
    """Bytes from an int or a string like '512M', '4G', '2.5GB'."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not match:
        raise VaekitError(f"Memory budget '{value}' is not a size: use bytes or a number with K, M, G or T.")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))
