"""Bulk encoding of an image source into a sharded, resumable latent cache (`vaekit encode`).

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

Every process of `accelerate launch` / `torchrun` takes the images at positions rank, rank + world, ...
of the deterministically ordered source and writes its own shards and manifest; the reader merges all.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import typing
from pathlib import Path

import numpy as np
import torch

from vaekit.config import DTYPES
from vaekit.errors import VaekitError
from vaekit.latents import current_entries, parse_manifest, read_manifests

FORMAT = "vaekit-latents"
FORMAT_VERSION = 1
STORE_MODES = ("mean_logvar", "mode")
SHARD_PATTERN = re.compile(r"^shard-(\d+)-(\d+)\.safetensors$")
NON_FINITE = "non-finite latent"


@dataclasses.dataclass
class EncodeConfig:
    """What `vaekit encode` reads, how it sizes images, and how it stores latents."""

    data: str = ""  # image folder, Hugging Face data set, WebDataset shards or builtin:photos
    out: str = ""  # cache folder
    vae: str = ""  # model argument (preset:NAME, folder, file, hub id); recorded in the card
    override: list[str] = dataclasses.field(default_factory=list)  # AutoencoderKL config overrides, key=value
    weights: typing.Literal["ema", "raw"] = "ema"  # which weights of a training checkpoint
    source: typing.Literal["auto", "folder", "hf", "webdataset", "builtin"] = "auto"
    split: str | None = None  # Hugging Face split
    image_column: str | None = None  # Hugging Face column or WebDataset field holding the image
    key_column: str | None = None  # Hugging Face column with unique ids
    limit: int | None = None  # encode only the first N images of the source
    resolution: int = 256  # square side; with buckets, the bucket area is resolution^2
    buckets: bool = False  # aspect-ratio buckets instead of square centre crops
    min_aspect: float = 0.5  # narrowest bucket (W/H)
    max_aspect: float = 2.0  # widest bucket (W/H)
    bucket_step: int = 64  # bucket sides are multiples of this
    small_images: typing.Literal["upscale", "skip", "pad"] = "upscale"  # images smaller than their crop
    min_size: int = 0  # images with a shorter side are skipped and listed
    max_pixels: int | None = 128 * 1024 * 1024  # decompression-bomb limit; None: Pillow's only
    background: list[int] = dataclasses.field(default_factory=lambda: [255, 255, 255])  # behind transparency
    flip: bool = False  # also store the latents of the mirrored image
    store: typing.Literal["mean_logvar", "mode"] = "mean_logvar"  # posterior, or its mode only
    dtype: typing.Literal["bf16", "fp16", "fp32"] = "fp16"  # storage dtype
    compute_dtype: typing.Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where native, else fp32
    tile: str = "off"  # off, auto or a tile size in pixels (see vaekit.tiling)
    batch_size: int = 16
    num_workers: int = 2  # DataLoader processes decoding and resizing
    shard_size: int = 4096  # samples per shard (a batch is never split across shards)
    channels_last: bool = True  # faster convolutions on GPUs and on oneDNN CPUs
    compile: bool = False  # torch.compile the encoder
    overwrite: bool = False  # replace an existing cache whose key differs instead of refusing

    def __post_init__(self):
        if self.resolution < 8 or self.batch_size < 1 or self.shard_size < 1 or self.num_workers < 0:
            raise ValueError("resolution must be >= 8, batch_size and shard_size >= 1, num_workers >= 0")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values 0-255, got {self.background}")


# ----------------------------------------------------------------------------------------------
# The cache key


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
    from vaekit.data import make_buckets

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
    from vaekit.model import fingerprint, scale_shift, vae_config

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
    import fcntl

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
    from vaekit.io import write_json

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


# ----------------------------------------------------------------------------------------------
# Manifests and crash recovery


def shard_count(path):
    """Samples in a shard according to its header, or None if it is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {}).get("count", -1))
    except Exception:  # a missing file or any safetensors header error means "not a usable shard"
        return None


def recover_cache(out):
    """Repair what a killed run leaves behind; returns (next run number, dict of what was removed)."""
    from vaekit.io import write_text

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
# Data: decode and resize in DataLoader workers


class PreparedImages(torch.utils.data.Dataset):
    """Items of a Source decoded, resized and cropped by the size policy, as uint8 tensors.

    Each item is {"key", "path", "sha256", "pixels": (3, H, W) uint8, "bucket", "crop"}, or
    {"key", "path", "error", "detail"} for an unusable image, or {"key", "skip": True} when the
    cache already holds these exact bytes. uint8 crosses the process boundary and the PCIe bus at a
    quarter of float32's size; the model step converts it exactly as `vaekit.data.to_tensor` does.
    """

    def __init__(self, source, policy, background=(255, 255, 255), max_pixels=None, done=None):
        self.source = source
        self.policy = policy
        self.background = tuple(int(c) for c in background)
        self.max_pixels = max_pixels
        self.done = done or {}
        self.buckets = [tuple(b) for b in policy["buckets"]] if policy["mode"] == "buckets" else None

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        from vaekit.data import ImageError, decode_image

        record = self.source[index]
        base = {"key": record.key, "path": record.path}
        try:
            data = record.read_bytes()
        except ImageError as e:
            return {**base, "error": e.reason, "detail": e.detail}
        except FileNotFoundError:
            return {**base, "error": "file not found", "detail": None}
        except OSError as e:
            return {**base, "error": "unreadable file", "detail": f"{type(e).__name__}: {e}"}
        digest = hashlib.sha256(data).hexdigest()
        if self.done.get(record.key) == digest:
            return {"key": record.key, "skip": True}
        try:
            img = decode_image(data, background=self.background, max_pixels=self.max_pixels)
            pixels, crop, bucket = prepare_pixels(img, self.policy, self.buckets, self.background)
        except ImageError as e:
            return {**base, "error": e.reason, "detail": e.detail}
        return {**base, "sha256": digest, "pixels": pixels, "bucket": bucket, "crop": crop.to_dict()}


def prepare_pixels(img, policy, buckets=None, background=(255, 255, 255)):
    """A decoded RGB image as the encoder sees it -> ((3, H, W) uint8 tensor, Crop, [W, H] bucket)."""
    from vaekit.data import nearest_bucket, prepare_image

    if policy["mode"] == "buckets":
        buckets = buckets or [tuple(b) for b in policy["buckets"]]
        size = nearest_bucket(*img.size, buckets)
    else:
        size = (policy["resolution"], policy["resolution"])
    img, crop = prepare_image(img, size, "center", small_images=policy["small_images"], min_size=policy["min_size"],
                              background=background)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return pixels, crop, list(size)


def collate_prepared(items):
    """Group a chunk of prepared items by bucket -> {"groups": {"WxH": (pixels, metas)}, "errors", "skipped"}."""
    groups, errors, skipped = {}, [], 0
    for item in items:
        if item.get("skip"):
            skipped += 1
        elif "error" in item:
            errors.append({"key": item["key"], "path": item["path"], "reason": item["error"], "detail": item["detail"]})
        else:
            pixels, metas = groups.setdefault(f"{item['bucket'][0]}x{item['bucket'][1]}", ([], []))
            pixels.append(item.pop("pixels"))
            metas.append(item)
    stacked = {name: (torch.stack(pixels), metas) for name, (pixels, metas) in groups.items()}  # (N, 3, H, W)
    return {"groups": stacked, "errors": errors, "skipped": skipped}


# ----------------------------------------------------------------------------------------------
# Model step


def encode_pixels(vae, x, tile="off"):
    """Posterior (mean, logvar) of pixels x (B, 3, H, W) in [-1, 1], float32: the one place the encoder is called.

    vaekit.tiling.encode is vae.encode(x).latent_dist's mean and logvar (clamped to [-30, 20] as
    diffusers does), optionally tiled, with an fp32 retry of half-precision batches that overflow.
    """
    from vaekit import tiling

    return tiling.encode(vae, x, tile=tile)


def check_tile(tile, vae):
    """Validate --tile now, before it becomes part of a cache key."""
    from vaekit import tiling

    tile = tiling.parse_tile(tile)
    if isinstance(tile, int):
        tiling.check_tiling(vae, tile)


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where oneDNN runs bf16 convolutions
    about twice as fast as fp32; elsewhere bf16 is emulated and slower."""
    import torch.cpu

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_compute_dtype(name, device):
    """The dtype the encoder runs in. auto: bf16 where the hardware has it (fp16 on CUDA without it), else fp32.

    Bulk caching is throughput-bound and the cache is stored in fp16 or bf16 anyway; a batch that
    overflows is redone in fp32 (vaekit.tiling). `--compute_dtype fp32` gives bit-reproducible fp32.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


class Encoder:
    """The VAE's encoder ready for bulk inference: device, dtype, memory format, optional compile."""

    def __init__(self, vae, device, compute_dtype, channels_last=True, compile=False, tile="off"):
        from vaekit.model import cast_vae

        self.vae = cast_vae(vae, device=device, dtype=compute_dtype)
        self.device, self.dtype, self.tile, self.channels_last = device, compute_dtype, tile, channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            # Block by block, in place (state-dict keys stay AutoencoderKL's): vaekit.tiling calls the
            # encoder's parts directly, which would bypass a compiled Encoder.forward.
            encoder = self.vae.encoder
            for module in [encoder.conv_in, *encoder.down_blocks, encoder.mid_block, encoder.conv_out]:
                module.compile()

    @torch.inference_mode()
    def __call__(self, pixels, flip=False):
        """uint8 pixels (B, 3, H, W) -> float (mean, logvar), each (B', C, h, w); B' = 2B with flips appended."""
        x = pixels.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)  # as vaekit.data.to_tensor
        if flip:
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): mirrored copies after the originals
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return encode_pixels(self.vae, x, self.tile)


# ----------------------------------------------------------------------------------------------
# The pipeline


def make_loader(dataset, batch_size, num_workers, pin_memory):
    """DataLoader over `dataset` in chunks of `batch_size` consecutive indices, grouped by shape in the workers."""
    chunks = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=chunks, collate_fn=collate_prepared, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )


def stream_latents(encoder, chunks, config, counters, progress=None):
    """Encode the chunks of a `make_loader` iterator; yield ("latents", metas, mean, logvar) and ("errors", entries).

    Only same-shape images share a batch: each bucket fills its own batch, flushed when full and at
    the end. `mean`/`logvar` are on the encoder's device in the storage dtype; metas has one entry per
    row (flipped rows after the originals, `flip` set).
    """
    store_dtype = DTYPES[config.dtype]
    size = config.batch_size
    pending = {}  # bucket -> (pixels (N, 3, H, W), metas) short of a full batch

    def run(pixels, metas):
        mean, logvar = encoder(pixels, flip=config.flip)
        rows = [{**m, "flip": False} for m in metas]
        if config.flip:
            rows += [{**m, "flip": True} for m in metas]
        counters["encoded"] += len(metas)
        logvar = logvar.to(store_dtype) if config.store == "mean_logvar" else None
        return ("latents", rows, mean.to(store_dtype), logvar)

    for chunk in chunks:
        if chunk["errors"]:
            counters["errors"] += len(chunk["errors"])
            yield ("errors", chunk["errors"])
        counters["skipped"] += chunk["skipped"]
        for name, (pixels, metas) in chunk["groups"].items():
            if name in pending:  # join the bucket's leftovers; a whole chunk (the usual case) stays pinned
                held, held_metas = pending.pop(name)
                pixels, metas = torch.cat([held, pixels]), held_metas + metas  # (N, 3, H, W)
            full = len(metas) // size * size
            for start in range(0, full, size):
                yield run(pixels[start:start + size], metas[start:start + size])
            if full < len(metas):
                pending[name] = (pixels[full:], metas[full:])
        if progress is not None:
            progress.update(sum(len(m) for _, m in chunk["groups"].values()) + len(chunk["errors"]) + chunk["skipped"])
    for pixels, metas in pending.values():
        yield run(pixels, metas)


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
        from vaekit.io import save_safetensors

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
        """Append JSON lines in one write and fsync: a kill leaves at most one torn last line."""
        if not entries:
            return
        with open(path, "a") as f:
            f.write("".join(json.dumps(e) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# The run


def load_encoder_vae(config):
    """Load the VAE named in `config`; presets are seeded so every process and every run builds the same one."""
    from vaekit.commands import parse_model_overrides
    from vaekit.model import load_vae

    if not config.vae:
        raise VaekitError("No VAE given; pass --vae MODEL (preset:NAME, a diffusers folder or a checkpoint).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a preset is randomly initialised; a resumed run must find the same fingerprint
        return load_vae(config.vae, parse_model_overrides(config.override), weights=config.weights)


def open_data(config):
    """The image source of `config`, cut to `limit`."""
    from vaekit.data import open_source

    source = open_source(config.data, config.source, config.split, config.image_column, config.key_column)
    if config.limit is not None and config.limit < len(source):
        source = source.subset(range(config.limit))
    return source


def distributed_state():
    """Accelerate's process state: rank, world size and device under accelerate launch / torchrun, or one process."""
    from accelerate import PartialState

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # Launched on a machine without CUDA, Accelerate must be told to use gloo on the CPU.
    return PartialState(cpu=launched > 1 and not torch.cuda.is_available())


def share_from_main(state, value):
    """`value` as computed on the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box)
    return box[0]


def encode_dataset(config, vae=None, progress=True):
    """Encode `config.data` into the cache `config.out`; returns a summary dict (main process) or None.

    `vae` (moved to the device, dtype and memory format of the run) replaces loading `config.vae`.
    """
    from tqdm.auto import tqdm

    from vaekit import __version__
    from vaekit.model import downsample_factor, latent_channels, vae_config

    if not config.out or not config.data:
        raise VaekitError("Pass --data SRC (the images) and --out DIR (the cache folder).")
    started = time.perf_counter()
    state = distributed_state()
    rank, world, device, is_main = state.process_index, state.num_processes, state.device, state.is_main_process
    if vae is None:
        vae = load_encoder_vae(config)
    policy = size_policy(config, downsample_factor(vae))
    key = cache_key(config, vae, policy)  # before the dtype cast below: the fingerprint hashes dtypes
    info = {"vae": {"source": config.vae, "override": list(config.override), "weights": config.weights,
                    "config": vae_config(vae), "downsample_factor": downsample_factor(vae),
                    "latent_channels": latent_channels(vae)},
            "vaekit_version": __version__}
    source = open_data(config)
    out = Path(config.out)
    check_tile(config.tile, vae)
    # Built before the cache is touched and after the fingerprint (which hashes dtypes; the cast is here).
    encoder = Encoder(vae, device, resolve_compute_dtype(config.compute_dtype, device), config.channels_last,
                      config.compile, config.tile)

    with contextlib.ExitStack() as stack:
        setup, failure = None, None
        if is_main:
            try:
                stack.enter_context(lock_cache(out))
                open_cache(out, key, info, config.overwrite)
                run, removed = recover_cache(out)
                setup = {"run": run, "removed": removed, "fingerprint": key["vae_fingerprint"]}
            except Exception as e:  # told to every process below, so none waits forever for the main one
                setup, failure = {"error": str(e)}, e
        setup = share_from_main(state, setup)
        if failure is not None:
            raise failure
        if "error" in setup:
            raise VaekitError(f"The main process failed to open the cache: {setup['error']}")
        if setup["fingerprint"] != key["vae_fingerprint"]:
            raise VaekitError(f"Process {rank} loaded a different VAE than process 0; load it from a file or folder.")
        if is_main and any(setup["removed"].values()):
            found = ", ".join(f"{n} {what}" for what, n in setup["removed"].items() if n)
            print(f"recovered the cache after an interrupted run: removed {found}")

        done = done_samples(out, config.flip)
        part = source.subset(range(rank, len(source), world))
        dataset = PreparedImages(part, policy, config.background, config.max_pixels, done)
        counters = {"encoded": 0, "skipped": 0, "errors": 0}
        writer = ShardWriter(out, rank, setup["run"], config.shard_size, config.store)
        pin = device.type == "cuda"
        chunks = iter(make_loader(dataset, config.batch_size, config.num_workers, pin))  # forks the workers
        writer.start()  # threads only after the fork
        bar = tqdm(total=len(part), unit="img", desc="encode", disable=not (progress and is_main), smoothing=0.1)
        try:
            for item in stream_latents(encoder, chunks, config, counters, bar):
                writer.put(item)
        finally:
            bar.close()
            writer.close()
        counters["errors"] += writer.non_finite
        counters["encoded"] -= writer.non_finite
        totals = gather_counters(state, counters)
        state.wait_for_everyone()
        if not is_main:
            return None
        summary = finalize_cache(out, source, setup["run"], totals, time.perf_counter() - started, world)
    return summary


def gather_counters(state, counters):
    """Sum per-process counters."""
    if state.num_processes == 1:
        return dict(counters)
    from accelerate.utils import gather_object

    totals = {}
    for part in gather_object([counters]):
        for name, value in part.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def finalize_cache(out, source, run, counters, seconds, world):
    """Check every manifest entry against its shard, merge the per-rank error lists, write summary.json."""
    from vaekit.io import write_json, write_text

    entries = read_manifests(out)
    counts = {}
    for entry in entries:
        counts[entry["shard"]] = counts.get(entry["shard"], 0) + 1
    for shard, count in counts.items():
        if shard_count(out / shard) != count:
            raise VaekitError(f"{out / shard} does not hold the {count} samples its manifest lists; re-run to repair.")
    errors = []
    for path in sorted(out.glob("errors-*.jsonl")):
        errors.extend(parse_manifest(path)[0])
        path.unlink()
    errors.sort(key=lambda e: e["key"])
    write_text(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    current = current_entries(entries)
    keys = {e["key"] for e in current}
    source_keys = set(source.keys())
    summary = {
        "run": run,
        "processes": world,
        "images_in_source": len(source),
        "encoded": counters["encoded"],
        "skipped_unchanged": counters["skipped"],
        "errors": len(errors),
        "seconds": round(seconds, 2),
        "images_per_second": round(counters["encoded"] / seconds, 2) if seconds > 0 else None,
        "cache_images": len(keys),
        "cache_samples": len(current),
        "superseded_samples": len(entries) - len(current),
        "cache_images_not_in_source": len(keys - source_keys),
        "shards": len(counts),
    }
    write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# Command line


def add_pipeline_arguments(parser):
    """Data, size-policy and speed options shared by `vaekit encode` and `vaekit stats --data`.

    Defaults are None so that only flags actually given override a --config YAML; the real
    defaults are EncodeConfig's, quoted in the help.
    """
    import argparse

    d = EncodeConfig()
    flag = argparse.BooleanOptionalAction
    add = parser.add_argument
    add("--config", help="YAML file with EncodeConfig keys (named like these flags); flags override it")
    add("--source", choices=["auto", "folder", "hf", "webdataset", "builtin"], help="kind of --data (default: detect)")
    add("--split", help="Hugging Face split (default: train, or the only one)")
    add("--image_column", help="Hugging Face column or WebDataset field with the image")
    add("--key_column", help="Hugging Face column with unique ids (default: split/index)")
    add("--limit", type=int, help="only the first N images of the source")
    add("--resolution", type=int,
        help=f"square side in pixels; with --buckets the bucket area is resolution^2 (default {d.resolution})")
    add("--buckets", action=flag, help="aspect-ratio buckets: each image goes to the bucket nearest its aspect ratio")
    add("--min_aspect", type=float, help=f"narrowest bucket, W/H (default {d.min_aspect})")
    add("--max_aspect", type=float, help=f"widest bucket, W/H (default {d.max_aspect})")
    add("--bucket_step", type=int, help=f"bucket sides are multiples of this (default {d.bucket_step})")
    add("--small_images", choices=["upscale", "skip", "pad"],
        help="images smaller than their crop: resize up, skip and list, or pad (default upscale)")
    add("--min_size", type=int, help="skip and list images whose shorter side is below this (default 0)")
    add("--max_pixels", type=int, help=f"decompression-bomb limit in pixels (default {d.max_pixels})")
    add("--background", type=int, nargs=3, metavar=("R", "G", "B"), help="colour behind transparency (default white)")
    add("--flip", action=flag, help="also store the latents of the mirrored image")
    add("--compute_dtype", choices=["auto", "fp32", "bf16", "fp16"],
        help="encoder precision (default auto: bf16 on GPUs and on CPUs with native bf16, AVX512-BF16 or AMX; "
             "fp16 on GPUs without bf16; fp32 otherwise)")
    add("--tile", help="tiled encoding for large images: off (default), auto or a tile size in pixels")
    add("--batch_size", type=int, help=f"images per model step (default {d.batch_size})")
    add("--num_workers", type=int, help=f"DataLoader processes decoding and resizing (default {d.num_workers})")
    add("--channels_last", action=flag, help="channels-last convolutions (default on)")
    add("--compile", action=flag, help="torch.compile the encoder (pays off on large data sets)")
    parser.set_defaults(weights=None)  # from add_model_arguments: let a YAML value stand unless given


def config_from_args(args):
    """An EncodeConfig from an optional --config YAML, then the flags that were given, checked by vaekit.config."""
    from vaekit.config import from_dict, load_yaml

    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for field in dataclasses.fields(EncodeConfig):
        value = getattr(args, field.name, None)
        if value is not None and value != []:
            data[field.name] = value
    return from_dict(EncodeConfig, data)


def run_encode(args):
    """`vaekit encode`: encode a data set into a latent cache."""
    config = config_from_args(args)
    summary = encode_dataset(config, progress=not args.quiet)
    if summary is None:
        return 0
    out = Path(config.out)
    print(f"encoded {summary['encoded']} images in {summary['seconds']} s "
          f"({summary['images_per_second']} images/s, {summary['processes']} process(es)); "
          f"{summary['skipped_unchanged']} already in the cache, {summary['errors']} skipped with errors"
          + (f" (listed in {out / 'errors.jsonl'})" if summary["errors"] else ""))
    print(f"cache {out}: {summary['cache_images']} images, {summary['cache_samples']} latents in "
          f"{summary['shards']} shards")
    return 0


def add_commands(subparsers):
    """Register `vaekit encode` (`vaekit stats` lives in vaekit.latents)."""
    from vaekit.commands import add_model_arguments

    p = subparsers.add_parser(
        "encode", help="encode an image data set into a sharded, resumable latent cache",
        description="Encode images to VAE latents for diffusion training (see docs/encoding.md). Re-running the "
                    "same command resumes and encodes only new or changed images; a cache made with another VAE, "
                    "size policy or dtype is refused (or replaced with --overwrite). Runs under accelerate launch "
                    "and torchrun.",
    )
    add_model_arguments(p, name="vae", positional=False, required=False, help_text="the VAE")
    p.add_argument("--data", help="image folder, Hugging Face data set, WebDataset shards or builtin:photos")
    p.add_argument("--out", help="cache folder")
    add_pipeline_arguments(p)
    d = EncodeConfig()
    p.add_argument("--store", choices=list(STORE_MODES),
                   help="mean_logvar (default) keeps the posterior so a trainer can sample; mode keeps the mean")
    p.add_argument("--dtype", choices=list(DTYPES), help=f"storage dtype (default {d.dtype})")
    p.add_argument("--shard_size", type=int, help=f"samples per shard (default {d.shard_size})")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a cache whose key differs instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_encode)
