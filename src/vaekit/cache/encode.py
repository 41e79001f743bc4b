"""Bulk encoding of an image source into a sharded, resumable latent cache (`vaekit encode`).

Every process of `accelerate launch` / `torchrun` takes the images at positions rank, rank + world, ...
of the deterministically ordered source and writes its own shards and manifest (vaekit.cache.format);
images are decoded and resized in DataLoader workers, encoded on the device, and written by a
background thread, so the three overlap.
"""

import contextlib
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vaekit import __version__
from vaekit.cache.format import (ShardWriter, cache_key, current_entries, done_samples, lock_cache,
                                 open_cache, parse_manifest, read_manifests, recover_cache, shard_count, size_policy)
from vaekit.codec.inference import BulkEncoder, tile_option
from vaekit.data.crops import nearest_bucket, prepare_image
from vaekit.data.decode import ImageError, decode_image
from vaekit.data.sources import open_source
from vaekit.device import DTYPES, process_state, resolve_compute_dtype
from vaekit.errors import VaekitError
from vaekit.io import write_json, write_text
from vaekit.model.architecture import downsample_factor, latent_channels, vae_config
from vaekit.model.load import load_vae


def load_encoder_vae(config):
    """Load the VAE named in `config`; presets are seeded so every process and every run builds the same one."""
    if not config.vae:
        raise VaekitError("No VAE given; pass --vae MODEL (preset:NAME, a diffusers folder or a checkpoint).")
    # A preset is randomly initialised; a resumed run must find the same fingerprint.
    return load_vae(config.vae, config.override, weights=config.weights, seed=0)


def open_data(config):
    """The image source of `config`, cut to `limit`."""
    source = open_source(config.data, config.source, config.split, config.image_column, config.key_column)
    if config.limit is not None and config.limit < len(source):
        source = source.subset(range(config.limit))
    return source


def share_from_main(state, value):
    """`value` as computed on the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list  # accelerate is slow to import; only several processes need it

    box = [value]
    broadcast_object_list(box)
    return box[0]


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


def make_loader(dataset, batch_size, num_workers, pin_memory):
    """DataLoader over `dataset` in chunks of `batch_size` consecutive indices, grouped by shape in the workers."""
    chunks = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=chunks, collate_fn=collate_prepared, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
    )


# ----------------------------------------------------------------------------------------------
# The pipeline


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


def encode_dataset(config, vae=None, progress=True):
    """Encode `config.data` into the cache `config.out`; returns a summary dict (main process) or None.

    `vae` (moved to the device, dtype and memory format of the run) replaces loading `config.vae`.
    """
    if not config.out or not config.data:
        raise VaekitError("Pass --data SRC (the images) and --out DIR (the cache folder).")
    started = time.perf_counter()
    state = process_state()
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
    tile_option(vae, config.tile)
    # Built before the cache is touched and after the fingerprint (which hashes dtypes; the cast is here).
    encoder = BulkEncoder(vae, device, resolve_compute_dtype(config.compute_dtype, device), config.channels_last,
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
    from accelerate.utils import gather_object  # only several processes need it

    totals = {}
    for part in gather_object([counters]):
        for name, value in part.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def finalize_cache(out, source, run, counters, seconds, world):
    """Check every manifest entry against its shard, merge the per-rank error lists, write summary.json."""
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
    errors.extend({"key": s["key"], "path": s["path"], "reason": s["reason"], "detail": None} for s in source.skipped)
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
