"""The latent-cache format, both sides: what `vaekit encode` writes and what readers parse.

A cache is one folder:

    card.json                  the cache key: VAE fingerprint, scaling/shift, size policy, store, dtype, flip
    shards/shard-RRR-SSSSS.safetensors
                               a few thousand samples of rank RRR, one tensor per kind and bucket:
                               `mean/{W}x{H}` and `logvar/{W}x{H}`, each (N, C, h, w); written atomically
    manifest-RRR.jsonl         one line per sample: key, path, sha256, sizes, crop box, flip, bucket,
                               latent shape, shard, offset, run; appended only once the shard is in place
    errors.jsonl               the images the last run could not encode, with the reason
    summary.json               what the last run did

Crash safety: a shard is renamed into place whole, then its manifest lines are appended and fsynced.
A run that starts (or resumes) first repairs what a kill can leave: torn manifest lines, shards that
no manifest names, manifest lines whose shard is missing or incomplete. Incremental runs skip a key
whose newest entry has the same sha256 of the source bytes; a changed file is encoded again and its
new entry (higher `run`) wins in the reader, the old one stays in its shard unreferenced.
"""

import contextlib
import fcntl
import json
import queue
import re
import shutil
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from vaekit.data.crops import make_buckets
from vaekit.errors import VaekitError
from vaekit.io import append_lines, save_safetensors, write_json, write_text
from vaekit.model.architecture import fingerprint, vae_config
from vaekit.model.normalization import scale_shift


FORMAT = "vaekit-latents"


FORMAT_VERSION = 1


SHARD_PATTERN = re.compile(r"^shard-(\d+)-(\d+)\.safetensors$")


NON_FINITE = "non-finite latent"


# ----------------------------------------------------------------------------------------------
# The cache key and the card


def size_policy(config, factor):
    """How images become model inputs, as a JSON-safe dict (part of the cache key)."""
    common = {"small_images": config.small_images, "min_size": config.min_size}
    if not config.buckets:
        if config.resolution % factor:
            raise VaekitError(
                f"--resolution {config.resolution} is not a multiple of the VAE's downsampling factor {factor}; "
                f"use {config.resolution // factor * factor or factor}."
            )
        return {"mode": "resolution", "resolution": config.resolution, **common}

    if config.bucket_step % factor:
        raise VaekitError(f"--bucket_step {config.bucket_step} must be a multiple of the downsampling factor {factor}.")
    area = config.resolution * config.resolution
    if area < config.bucket_step**2:
        raise VaekitError(f"--resolution {config.resolution} is smaller than --bucket_step {config.bucket_step}; "
                          "lower --bucket_step or raise --resolution.")
    buckets = make_buckets(area, config.min_aspect, config.max_aspect, config.bucket_step)
    return {"mode": "buckets", "target_area": area, "min_aspect": config.min_aspect, "max_aspect": config.max_aspect,
            "step": config.bucket_step, "buckets": [list(b) for b in buckets], **common}


def cache_key(config, vae, policy):
    """Everything that changes the stored latents: a cache with another key is never reused."""
    scale, shift = scale_shift(vae)
    vae_cfg = vae_config(vae)
    key = {
        "vae_fingerprint": fingerprint(vae),
        "scaling_factor": scale,
        "shift_factor": shift,
        "latents_mean": vae_cfg.get("latents_mean"),
        "latents_std": vae_cfg.get("latents_std"),
        "size_policy": policy,
        "background": [int(c) for c in config.background],
        "store": config.store,
        "dtype": config.dtype,
        "flip": config.flip,
        "tile": str(config.tile),
    }
    return json.loads(json.dumps(key))  # tuples become lists, as they come back from card.json


def describe_mismatch(old, new):
    """A sentence naming what differs between two cache keys."""
    def policy_text(policy):
        if not isinstance(policy, dict):
            return str(policy)
        if policy.get("mode") == "resolution":
            text = f"resolution {policy['resolution']}"
        else:
            text = (f"buckets of area {policy.get('target_area')} aspect {policy.get('min_aspect')}-"
                    f"{policy.get('max_aspect')} step {policy.get('step')}")
        return f"{text}, small_images {policy.get('small_images')}, min_size {policy.get('min_size')}"

    parts = []
    for field in old.keys() | new.keys():
        a, b = old.get(field), new.get(field)
        if a == b:
            continue
        if field == "vae_fingerprint":
            parts.append(f"a different VAE (weights or config; fingerprint {str(a)[:12]} in the cache, "
                         f"{str(b)[:12]} now)")
        elif field == "size_policy":
            parts.append(f"a different size policy (cache: {policy_text(a)}; now: {policy_text(b)})")
        else:
            parts.append(f"{field} {a} in the cache, {b} now")
    return "; ".join(sorted(parts))


@contextlib.contextmanager
def lock_cache(out):
    """Hold an exclusive lock on the cache folder, so two runs never write into it at once."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaekitError(f"Another vaekit encode is writing to {out}; wait for it to finish.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clear_cache(out):
    """Remove the files of a cache (and only those) from `out`."""
    shutil.rmtree(out / "shards", ignore_errors=True)
    for pattern in ("card.json", "manifest-*.jsonl", "errors*.jsonl", "summary.json"):
        for path in out.glob(pattern):
            path.unlink()


def open_cache(out, key, info, overwrite=False):
    """Create the cache's card, or check the existing one; a different key refuses unless `overwrite`."""
    card_path = out / "card.json"
    if card_path.is_file():
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VaekitError(f"{card_path} is unreadable ({e}); pass --overwrite to start a new cache.") from None
        if card.get("format") != FORMAT:
            raise VaekitError(f"{card_path} is no vaekit latent cache card; choose another --out.")
        if card.get("version") != FORMAT_VERSION and not overwrite:
            raise VaekitError(f"{out} was written in cache format {card.get('version')}, this vaekit writes "
                              f"{FORMAT_VERSION}; pass --overwrite to re-encode it, or choose another --out.")
        if card.get("key") == key:
            return card
        if not overwrite:
            raise VaekitError(
                f"{out} holds latents of another cache: {describe_mismatch(card.get('key', {}), key)}. Its latents "
                f"cannot be reused. Pass --overwrite to replace them, or choose another --out."
            )
        clear_cache(out)
    elif out.is_dir() and any(p.name != ".lock" for p in out.iterdir()):
        raise VaekitError(f"{out} exists and is not a latent cache (no card.json); choose an empty or new folder.")
    card = {"format": FORMAT, "version": FORMAT_VERSION, "key": key, **info}
    write_json(card_path, card)
    return card


def read_card(cache_dir):
    """The cache's card.json as a dict; a clear error when `cache_dir` is no cache."""
    path = Path(cache_dir) / "card.json"
    if not path.is_file():
        raise VaekitError(f"{cache_dir} is not a latent cache (no card.json). Create one with `vaekit encode`.")
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VaekitError(f"{path} is unreadable ({e}); re-create the cache with `vaekit encode --overwrite`.") \
            from None
    return card


# ----------------------------------------------------------------------------------------------
# Manifests and crash recovery


def parse_manifest(path):
    """(entries, torn line count) of one manifest file; a line without its newline was cut by a kill."""
    entries, torn = [], 0
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                torn += 1
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return entries, torn


def read_manifests(cache_dir):
    """Every manifest entry of a cache, all ranks and runs, in file order (torn lines skipped)."""
    entries = []
    for path in sorted(Path(cache_dir).glob("manifest-*.jsonl")):
        entries.extend(parse_manifest(path)[0])
    return entries


def current_entries(entries):
    """The newest entry per (key, flip), sorted by key then flip: an image encoded again supersedes the old one."""
    newest = {}
    for entry in entries:
        slot = (entry["key"], bool(entry["flip"]))
        if slot not in newest or int(entry.get("run", 0)) >= int(newest[slot].get("run", 0)):
            newest[slot] = entry
    return [newest[slot] for slot in sorted(newest)]


def shard_count(path):
    """Samples in a shard according to its header, or None if it is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("count", -1))
    except Exception:  # a missing file or any safetensors header error means "not a usable shard"
        return None


def recover_cache(out):
    """Repair what a killed run leaves behind; returns (next run number, dict of what was removed)."""
    removed = {"temporary files": 0, "torn manifest lines": 0, "incomplete shards": 0, "orphan shards": 0}
    shards_dir = out / "shards"
    for tmp in [*out.glob(".*.tmp"), *shards_dir.glob(".*.tmp")]:  # atomic writes cut short
        tmp.unlink()
        removed["temporary files"] += 1
    referenced, last_run = set(), 0
    for manifest in sorted(out.glob("manifest-*.jsonl")):
        entries, torn = parse_manifest(manifest)
        removed["torn manifest lines"] += torn
        by_shard = {}
        for entry in entries:
            by_shard.setdefault(entry["shard"], []).append(entry)
        bad = {shard for shard, group in by_shard.items() if shard_count(out / shard) != len(group)}
        for shard in bad:  # lines lost to a kill mid-append: re-encode the whole shard's images
            (out / shard).unlink(missing_ok=True)
            removed["incomplete shards"] += 1
        keep = [e for e in entries if e["shard"] not in bad]
        if torn or bad:
            write_text(manifest, "".join(json.dumps(e) + "\n" for e in keep))
        referenced.update(e["shard"] for e in keep)
        last_run = max([last_run, *(int(e.get("run", 0)) for e in keep)])
    for shard in shards_dir.glob("shard-*.safetensors"):  # renamed into place, killed before the manifest append
        if f"shards/{shard.name}" not in referenced:
            shard.unlink()
            removed["orphan shards"] += 1
    for path in out.glob("errors-*.jsonl"):  # per-rank lists of an earlier run; this run makes its own
        path.unlink()
    return last_run + 1, removed


def done_samples(out, flip):
    """{key: sha256} of images whose newest entries hold every variant this cache stores."""
    variants = {}
    for entry in current_entries(read_manifests(out)):
        variants.setdefault(entry["key"], {})[bool(entry["flip"])] = entry["sha256"]
    wanted = (False, True) if flip else (False,)
    done = {}
    for key, shas in variants.items():
        if all(v in shas for v in wanted) and len({shas[v] for v in wanted}) == 1:
            done[key] = shas[False]
    return done


def next_shard_seq(out, rank):
    """The first free sequence number for rank `rank`'s shards."""
    seqs = [int(m.group(2)) for p in (out / "shards").glob("shard-*.safetensors")
            if (m := SHARD_PATTERN.match(p.name)) and int(m.group(1)) == rank]
    return max(seqs, default=-1) + 1


# ----------------------------------------------------------------------------------------------
# Shards: the writer and the reader


class ShardWriter:
    """Fills shards on a background thread; a shard is entered in the manifest only after it is whole on disk.

    Also checks every latent for NaN/inf (after the cast to the storage dtype, so fp16 overflow counts)
    and lists such images, with decode errors, in this rank's errors file.
    """

    def __init__(self, out, rank, run, shard_size, store):
        self.out, self.rank, self.run, self.shard_size, self.store = out, rank, run, shard_size, store
        self.seq = next_shard_seq(out, rank)
        self.manifest_path = out / f"manifest-{rank:03d}.jsonl"
        self.errors_path = out / f"errors-{rank:03d}.jsonl"
        self.queue = queue.Queue(maxsize=8)  # bounds memory (and GPU memory) held by batches in flight
        self.thread = threading.Thread(target=self._loop, name="vaekit-shard-writer", daemon=True)
        self.error = None
        self.pending = {}  # group -> {"mean": [...], "logvar": [...], "entries": [...]}
        self.pending_count = 0
        self.shards = 0
        self.non_finite = 0

    def start(self):
        """Start the writer thread (after DataLoader workers have forked: forking a threaded process is unsafe)."""
        (self.out / "shards").mkdir(parents=True, exist_ok=True)
        self.errors_path.write_text("")
        self.thread.start()
        return self

    def put(self, item):
        """Queue ("latents", metas, mean, logvar) or ("errors", entries); raises if the writer failed."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self):
        """Write the last partial shard and stop; re-raises a writer failure."""
        if self.thread.is_alive():
            self.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self):
        try:
            while (item := self.queue.get()) is not None:
                if item[0] == "errors":
                    self._append(self.errors_path, item[1])
                else:
                    self._add(*item[1:])
                    if self.pending_count >= self.shard_size:
                        self._write_shard()
            if self.pending_count:
                self._write_shard()
        except BaseException as e:  # handed to the main thread by put/close
            self.error = e
            while True:  # drain so a producer blocked on a full queue wakes up and sees the error
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _add(self, metas, mean, logvar):
        mean = mean.cpu()  # (N, C, h, w); waits for the device here, not in the main thread
        logvar = logvar.cpu() if logvar is not None else None
        finite = torch.isfinite(mean).flatten(1).all(1)
        if logvar is not None:
            finite &= torch.isfinite(logvar).flatten(1).all(1)
        bad_keys = {metas[i]["key"] for i in range(len(metas)) if not finite[i]}
        if bad_keys:  # drop every variant of such an image, so it is encoded again (whole) or not at all
            self.non_finite += len(bad_keys)
            bad = [m for m in metas if m["key"] in bad_keys and not m["flip"]]
            self._append(self.errors_path, [{"key": m["key"], "path": m["path"], "reason": NON_FINITE,
                                             "detail": None} for m in bad])
        for i, meta in enumerate(metas):
            if meta["key"] in bad_keys:
                continue
            group = self.pending.setdefault(f"{meta['bucket'][0]}x{meta['bucket'][1]}",
                                            {"mean": [], "logvar": [], "entries": []})
            group["mean"].append(mean[i])
            if logvar is not None:
                group["logvar"].append(logvar[i])
            group["entries"].append(meta)
            self.pending_count += 1

    def _write_shard(self):
        name = f"shard-{self.rank:03d}-{self.seq:05d}.safetensors"
        tensors, lines = {}, []
        for group, data in self.pending.items():
            tensors[f"mean/{group}"] = torch.stack(data["mean"])  # (N, C, h, w)
            if data["logvar"]:
                tensors[f"logvar/{group}"] = torch.stack(data["logvar"])
            for offset, meta in enumerate(data["entries"]):
                crop = meta["crop"]
                lines.append({
                    "key": meta["key"], "path": meta["path"], "sha256": meta["sha256"],
                    "original_size": crop["original_size"], "resized_size": crop["resized_size"],
                    "crop_box": crop["box"], "flip": meta["flip"], "bucket": meta["bucket"],
                    "latent_shape": list(tensors[f"mean/{group}"].shape[1:]),
                    "shard": f"shards/{name}", "group": group, "offset": offset, "run": self.run,
                })
        metadata = {"format": FORMAT, "count": str(len(lines)), "run": str(self.run), "store": self.store}
        save_safetensors(tensors, self.out / "shards" / name, metadata=metadata)  # tmp file, fsync, rename
        self._append(self.manifest_path, lines)  # only now is the shard part of the cache
        self.seq += 1
        self.shards += 1
        self.pending, self.pending_count = {}, 0

    @staticmethod
    def _append(path, entries):
        """Append entries as JSON lines in one write and fsync: a kill leaves at most one torn last line."""
        append_lines(path, [json.dumps(e) for e in entries])


class ShardReader:
    """Memory-mapped safetensors shards, opened on first use in each process (open handles are not pickled)."""

    def __init__(self, root):
        self.root = Path(root)
        self.handles = {}

    def __getstate__(self):
        return {"root": self.root, "handles": {}}

    def handle(self, shard):
        """The open safe_open handle of a shard (relative path)."""
        if shard not in self.handles:
            path = self.root / shard
            try:
                self.handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # missing file or corrupt header
                raise VaekitError(f"Cannot read shard {path} ({e}); re-run `vaekit encode` to repair the cache.") \
                    from None
        return self.handles[shard]

    def row(self, entry, kind="mean"):
        """One sample's stored tensor (C, h, w) in the storage dtype."""
        offset = int(entry["offset"])
        return self.handle(entry["shard"]).get_slice(f"{kind}/{entry['group']}")[offset:offset + 1][0]

    def rows(self, shard, group, offsets, kind="mean"):
        """Several samples of one group of one shard, (N, C, h, w)."""
        return self.handle(shard).get_tensor(f"{kind}/{group}")[list(offsets)]
