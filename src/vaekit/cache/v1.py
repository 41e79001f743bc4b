"""Reading caches of format 1, for `vaekit cache migrate` (and as the baseline of scripts/bench_scale.py).

Format 1 kept one folder per cache:

    card.json                                   the cache key (as in format 2) and "version": 1
    shards/shard-RRR-SSSSS.safetensors          `mean/{W}x{H}` and `logvar/{W}x{H}` tensors, (N, C, h, w)
    manifest-RRR.jsonl                          one JSON line per sample: key, path, sha256, sizes, crop box,
                                                flip, bucket, latent shape, shard, group, offset, run

An image encoded again got a new line with a higher `run`; the newest line per (key, flip) is current.
Every reader parsed every line, which is what format 2 replaces (see vaekit.cache.format).
"""

import json
from pathlib import Path

from safetensors import safe_open

from vaekit.errors import VaekitError


VERSION = 1


def parse_manifest(path):
    """The entries of one manifest file; a line without its newline was cut by a kill and is skipped."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if not line.endswith("\n"):
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return entries


def read_manifests(cache_dir):
    """Every manifest entry of a format-1 cache, all ranks and runs, in file order."""
    entries = []
    for path in sorted(Path(cache_dir).glob("manifest-*.jsonl")):
        entries.extend(parse_manifest(path))
    return entries


def current_entries(entries):
    """The newest entry per (key, flip), sorted by key then flip."""
    newest = {}
    for entry in entries:
        slot = (entry["key"], bool(entry["flip"]))
        if slot not in newest or int(entry.get("run", 0)) >= int(newest[slot].get("run", 0)):
            newest[slot] = entry
    return [newest[slot] for slot in sorted(newest)]


class ShardReader:
    """Memory-mapped format-1 shards, opened on first use."""

    def __init__(self, root):
        self.root = Path(root)
        self.handles = {}

    def handle(self, shard):
        """The open safe_open handle of a shard (path relative to the cache)."""
        if shard not in self.handles:
            path = self.root / shard
            try:
                self.handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # missing file or corrupt header
                raise VaekitError(f"Cannot read shard {path} of the format-1 cache ({e}).") from None
        return self.handles[shard]

    def row(self, entry, kind="mean"):
        """One sample's stored tensor (C, h, w)."""
        offset = int(entry["offset"])
        return self.handle(entry["shard"]).get_slice(f"{kind}/{entry['group']}")[offset:offset + 1][0]
