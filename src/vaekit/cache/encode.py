"""Bulk encoding of an image source into a unit-granular, resumable latent cache (`vaekit encode`).

Every process of `accelerate launch` / `torchrun` owns the units u with u % world == rank (see
vaekit.cache.units), skips those already done with the same signature, and encodes the rest:
images are read, decoded and sized in DataLoader workers, encoded on the device, and written by a
background thread, so the three overlap. Ranks meet twice at the start (a few bytes: the card is in
place, every rank sees the same units) and never after: a rank that finishes early writes its
record and exits, and the last rank to finish finalises the cache. So no rank waits, inside a
collective with a timeout, for another's share of the work.
"""

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaekit import __version__
from vaekit.cache.format import (FORMAT, FORMAT_VERSION, UNIT_LOCK, UNIT_PART, UNIT_STAGING, cache_key, clean_unit,
                                 current_parts, invalidate_catalog, list_units, lock_path, new_token, open_card,
                                 read_unit_meta, size_policy, unit_errors, write_catalog)
from vaekit.cache.keys import rename_repeated_keys
from vaekit.cache.units import IndexedPlan, Preparer, ShardPlan, UnitStream, show_reading
from vaekit.cache.writer import UnitWriter
from vaekit.codec.inference import BulkEncoder, tile_option
from vaekit.data.shards import is_shard_file, looks_like_shards
from vaekit.data.sources import open_source
from vaekit.device import DTYPES, process_state, resolve_compute_dtype
from vaekit.errors import VaekitError
from vaekit.io import atomic_path, ensure_folder, remove_temporaries, write_json
from vaekit.locks import Heartbeat, describe_owner, release, try_lock
from vaekit.model.architecture import downsample_factor, latent_channels, vae_config
from vaekit.model.load import load_vae


def load_encoder_vae(config):
    """Load the VAE named in `config`; presets are seeded so every process and every run builds the same one."""
    if not config.vae:
        raise VaekitError("No VAE given; pass --vae MODEL (preset:NAME, a diffusers folder or a checkpoint).")
    # A preset is randomly initialised; a resumed run must find the same fingerprint.
    return load_vae(config.vae, config.override, weights=config.weights, seed=0)


def is_streamed(config):
    """Whether `config.data` is read as streamed WebDataset shards (one unit per shard)."""
    if config.source == "webdataset":
        return True
    if config.source != "auto":
        return False
    path = Path(config.data)
    if path.is_file():
        return is_shard_file(path)
    if path.is_dir():
        entries = [e for e in path.iterdir() if not e.name.startswith(".")]
        return any(is_shard_file(e) for e in entries) and not (path / "state.json").is_file()
    return looks_like_shards(config.data)


def open_data(config):
    """The source of `config`, as units: (plan, Source or None)."""
    if is_streamed(config):
        if config.limit is not None:
            raise VaekitError("--limit counts images of an indexed source; with WebDataset shards, pass fewer shards "
                              "(a shorter brace range) instead.")
        return ShardPlan(config.data, config.image_column, config.max_image_bytes, config.read_timeout)
    source = open_source(config.data, config.source, config.split, config.image_column, config.key_column)
    if config.limit is not None and config.limit < len(source):
        source = source.subset(range(config.limit))
    return IndexedPlan(source, config.unit_size, config.max_image_bytes)


def agree(state, status):
    """Every process's `status` (a small dict), on every process."""
    if state.num_processes == 1:
        return [status]
    from accelerate.utils import gather_object  # accelerate is slow to import; only several processes need it

    return gather_object([status])


def raise_disagreement(statuses):
    """One error on every process when any process failed to start, naming the first that did."""
    for rank, status in enumerate(statuses):
        if status.get("error"):
            raise VaekitError(status["error"] if rank == 0 else f"Process {rank}: {status['error']}")


# ----------------------------------------------------------------------------------------------
# The pipeline


def stream_latents(encoder, chunks, config, counters, progress=None):
    """Encode the chunks of a UnitStream; yield writer messages ("latents" / "errors" / "end", unit, ...).

    Only same-shape images of one unit share a batch: each (unit, bucket) fills its own batch, flushed
    when full and when the unit's last chunk has arrived. `mean`/`logvar` are on the encoder's device in
    the storage dtype; with flips their rows are the images, then the mirrored images.
    """
    store_dtype = DTYPES[config.dtype]
    size = config.batch_size
    pending = {}  # (unit, bucket) -> (pixels (N, 3, H, W), metas) short of a full batch
    received, expected, failures = {}, {}, {}

    def run(unit, pixels, metas):
        mean, logvar = encoder(pixels, flip=config.flip)
        counters["encoded"] += len(metas)
        logvar = logvar.to(store_dtype) if config.store == "mean_logvar" else None
        return ("latents", unit, metas, mean.to(store_dtype), logvar)

    for chunk in chunks:
        unit = chunk["unit"]
        if chunk["errors"]:
            counters["errors"] += len(chunk["errors"])
            yield ("errors", unit, chunk["errors"])
        for name, (pixels, metas) in chunk["groups"].items():
            if (unit, name) in pending:  # join the bucket's leftovers; a whole chunk (the usual case) stays pinned
                held, held_metas = pending.pop((unit, name))
                pixels, metas = torch.cat([held, pixels]), held_metas + metas  # (N, 3, H, W)
            full = len(metas) // size * size
            for start in range(0, full, size):
                yield run(unit, pixels[start:start + size], metas[start:start + size])
            if full < len(metas):
                pending[(unit, name)] = (pixels[full:], metas[full:])
        received[unit] = received.get(unit, 0) + 1
        if chunk["last"]:
            expected[unit], failures[unit] = chunk["chunks"], chunk["failure"]
        if received[unit] == expected.get(unit):
            for slot in [s for s in pending if s[0] == unit]:
                yield run(unit, *pending.pop(slot))
            yield ("end", unit, failures.pop(unit))
        if progress is not None:
            progress.update(sum(len(m) for _, m in chunk["groups"].values()) + len(chunk["errors"]))


def claim_units(out, plan, units, config, heartbeat):
    """Take the lock of each unit to encode; returns (held units, [messages of units another process holds])."""
    held, busy = [], []
    for unit in units:
        path = lock_path(out, unit)
        if try_lock(path, config.lock_timeout):
            heartbeat.add(path)
            clean_unit(out, unit, current_parts(out, unit))  # what a killed run left of this unit
            held.append(unit)
        else:
            busy.append(f"{plan.label(unit)} is being encoded by {describe_owner(path)}")
    return held, busy


def units_to_encode(out, plan, mine):
    """(units of `mine` that are missing or changed, done units that a killed run left files of, count unchanged).

    One listing of units/ and one of locks/ find every unit's index, parts, staging folder and lock (a
    process killed after publishing a unit, before releasing its lock, leaves the lock behind).
    """
    done, found = list_units(out), {}
    for folder, pattern in (("units", UNIT_PART), ("units", UNIT_STAGING), ("locks", UNIT_LOCK)):
        folder = Path(out) / folder
        for name in (os.listdir(folder) if folder.is_dir() else ()):
            if match := pattern.match(name):
                found.setdefault(int(match.group(1)), set()).add(name)
    todo, dirty, unchanged = [], [], 0
    for unit in mine:
        if unit in done:
            try:
                meta = read_unit_meta(done[unit])
                if meta.get("signature") == plan.signature(unit) and not meta.get("retry"):
                    unchanged += 1
                    if found.get(unit, set()) != set(meta["parts"]):
                        dirty.append(unit)
                    continue
            except VaekitError:  # an unreadable index: redo the unit
                pass
        todo.append(unit)
    return todo, dirty, unchanged


def tidy_units(out, units, config):
    """Remove leftovers of killed runs (staging folders, unnamed parts, stale locks) from done units."""
    for unit in units:
        path = lock_path(out, unit)
        if try_lock(path, config.lock_timeout):
            try:
                clean_unit(out, unit, current_parts(out, unit))
            finally:
                release(path)


def start_cache(state, out, key, card, plan, overwrite):
    """Open (or create) the cache on every process; all agree or all raise. Returns this run's token."""
    status = {"error": None, "units": plan.count, "token": new_token()}
    if state.is_main_process:
        try:
            open_card(out, key, card, overwrite, clear=True)
            remove_units_beyond(out, plan.count)
        except VaekitError as e:
            status["error"] = str(e)
    statuses = agree(state, status)  # the card is in place (or the main process failed) before the others look
    raise_disagreement(statuses)
    if not state.is_main_process:
        try:
            open_card(out, key, card, overwrite=False, clear=False)
        except VaekitError as e:
            status["error"] = f"{e} (this process loaded a different VAE or options than process 0?)"
    if status["units"] != statuses[0]["units"]:
        status["error"] = (f"this process sees {status['units']} units in --data, process 0 sees "
                           f"{statuses[0]['units']}: every node must see the same data (same path, same files).")
    raise_disagreement(agree(state, status))
    return statuses[0]["token"]


def remove_units_beyond(out, count):
    """Drop units numbered `count` and above: the source shrank or was cut differently, so they are stale."""
    for unit, path in list_units(out).items():
        if unit >= count:
            invalidate_catalog(out)
            path.unlink()
            clean_unit(out, unit, keep=())


def prepare_encode(config, vae, device):
    """(vae, size policy, cache key, unit plan, card, BulkEncoder) of a run, before the cache is touched."""
    if vae is None:
        vae = load_encoder_vae(config)
    policy = size_policy(config, downsample_factor(vae))
    key = cache_key(config, vae, policy)  # before the dtype cast below: the fingerprint hashes dtypes
    plan = open_data(config)
    card = {"format": FORMAT, "version": FORMAT_VERSION, "key": key,
            "units": {"kind": plan.kind, "unit_size": getattr(plan, "unit_size", None), "source": plan.description},
            "vae": {"source": config.vae, "override": list(config.override), "weights": config.weights,
                    "config": vae_config(vae), "downsample_factor": downsample_factor(vae),
                    "latent_channels": latent_channels(vae)},
            "vaekit_version": __version__}
    tile_option(vae, config.tile)
    # Built after the fingerprint, which hashes dtypes: the encoder casts.
    encoder = BulkEncoder(vae, device, resolve_compute_dtype(config.compute_dtype, device), config.channels_last,
                          config.compile, config.tile)
    return vae, policy, key, plan, card, encoder


def encode_dataset(config, vae=None, progress=True):
    """Encode `config.data` into the cache `config.out`; returns the summary dict on the process that
    finalised the cache (the last to finish), None on the others.

    `vae` (moved to the device, dtype and memory format of the run) replaces loading `config.vae`.
    """
    if not config.out or not config.data:
        raise VaekitError("Pass --data SRC (the images) and --out DIR (the cache folder).")
    started = time.perf_counter()
    state = process_state()
    rank, world = state.process_index, state.num_processes
    try:  # what each process needs: the VAE, the data, the unit plan (a node may lack any of them)
        vae, policy, key, plan, card, encoder = prepare_encode(config, vae, state.device)
    except Exception as e:
        if world == 1:
            raise
        # Told to every process before any waits on this one, so a missing file is an error, not a hang.
        reason = str(e) if isinstance(e, VaekitError) else f"{type(e).__name__}: {e}"
        raise_disagreement(agree(state, {"error": reason}))
    else:
        if world > 1:
            raise_disagreement(agree(state, {"error": None}))
    out = Path(config.out)
    token = start_cache(state, out, key, card, plan, config.overwrite)

    todo, dirty, unchanged = units_to_encode(out, plan, range(rank, plan.count, world))
    ensure_folder(out / "locks")
    tidy_units(out, dirty, config)
    heartbeat = Heartbeat(every=max(1.0, config.lock_timeout / 10))
    held, busy = claim_units(out, plan, todo, config, heartbeat)
    counters = {"encoded": 0, "errors": 0, "units_unchanged": unchanged}
    writer = UnitWriter(out, token, config.shard_size, config.store, heartbeat)
    try:
        if held:
            encode_units(encoder, plan, held, policy, config, state.device, writer, counters,
                         progress and state.is_main_process)
    finally:
        heartbeat.close()
        for unit in held:  # released by the writer as each unit ends; these are the units a failure cut short
            release(lock_path(out, unit))
    counters.update(writer.counts)
    counters["errors"] += writer.counts["non_finite"]
    counters["encoded"] -= writer.counts["non_finite"]
    record = {"rank": rank, "world": world, "counters": counters, "failed": writer.failed, "busy": busy,
              "seconds": time.perf_counter() - started}
    summary = finish_run(out, plan, token, record)
    if busy or writer.failed:
        problems = [*busy, *(f"{f['label']}: {f['reason']} ({f['detail']})" for f in writer.failed)]
        raise VaekitError(f"{len(problems)} unit(s) of this process were not encoded: {problems[0]}"
                          + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
                          + ". Everything else is in the cache; run the same command again to finish them.")
    return summary


def encode_units(encoder, plan, units, policy, config, device, writer, counters, show_progress):
    """Run the DataLoader -> encoder -> writer pipeline over `units`."""
    preparer = Preparer(policy, config.background, config.max_pixels)
    stream = UnitStream(plan, units, preparer, config.batch_size)
    jobs = len(units) if plan.kind == "shards" else sum(len(plan.chunks(u, config.batch_size)) for u in units)
    workers = min(config.num_workers, jobs)
    # Shards in any order: a worker stuck on a slow shard must not hold back the others' units (each
    # shard's chunks still come in order, from its one worker, so batches are the same in any order).
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
                                         in_order=plan.kind != "shards")
    total = sum(len(plan.positions(u)) for u in units) if plan.kind == "indexed" else None
    signatures = {unit: plan.signature(unit) for unit in units}
    chunks = iter(loader)  # forks the workers
    writer.start()  # threads only after the fork
    bar = tqdm(total=total, unit="img", desc="encode", disable=not show_progress, smoothing=0.1)
    reading = show_reading(stream, bar)
    try:
        for item in stream_latents(encoder, chunks, config, counters, bar):
            if item[0] == "end":
                item = ("end", item[1], {"signature": signatures[item[1]], "label": plan.label(item[1]),
                                         "failure": item[2]})
            writer.put(item)
    finally:
        reading.set()
        bar.close()
        writer.close()


# ----------------------------------------------------------------------------------------------
# The end of a run: each rank's record; the last rank finalises


def finish_run(out, plan, token, record):
    """Write this rank's record; if it is the last of the run, finalise the cache and return the summary."""
    runs = ensure_folder(Path(out) / "runs" / token)
    write_json(runs / f"rank-{record['rank']:05d}.json", record)
    records = sorted(runs.glob("rank-*.json"))
    if len(records) < record["world"]:
        return None
    try:  # exactly one of the ranks that see every record finalises
        (runs / "finalizing").open("x").close()
    except FileExistsError:
        return None
    return finalize_cache(out, plan, token, [json.loads(p.read_text()) for p in records])


def finalize_cache(out, plan, token, records):
    """The catalog, the merged error list and summary.json of a finished run; returns the summary."""
    rename_repeated_keys(out, plan)  # before the catalog and errors.jsonl, which list the renames
    units = []
    for unit, path in list_units(out).items():
        meta = read_unit_meta(path)
        units.append((unit, int(meta["rows"]), meta["token"]))
    write_catalog(out, units)
    errors = 0
    with atomic_path(Path(out) / "errors.jsonl") as tmp, open(tmp, "w", encoding="utf-8",
                                                              errors="backslashreplace") as f:
        lines = [*unit_errors(out), *(f for r in records for f in r["failed"]),
                 *({"key": s["key"], "path": s["path"], "reason": s["reason"], "detail": None} for s in plan.skipped)]
        for entry in lines:
            f.write(json.dumps(entry) + "\n")
            errors += 1
    totals = {}
    for record in records:
        for name, value in record["counters"].items():
            totals[name] = totals.get(name, 0) + value
    seconds = max(r["seconds"] for r in records)
    done = {unit for unit, _, _ in units}
    summary = {
        "token": token,
        "processes": len(records),
        "source": plan.description,
        "units_in_source": plan.count,
        "units_encoded": totals.get("units_encoded", 0),
        "units_unchanged": totals.get("units_unchanged", 0),
        "units_failed": totals.get("units_failed", 0),
        "units_busy": sum(len(r["busy"]) for r in records),
        "units_missing": plan.count - len(done & set(range(plan.count))),
        "images_in_source": len(plan.source) if plan.kind == "indexed" else None,
        "encoded": totals.get("encoded", 0),
        "errors": errors,
        "seconds": round(seconds, 2),
        "images_per_second": round(totals.get("encoded", 0) / seconds, 2) if seconds > 0 else None,
        "cache_images": sum(rows for _, rows, _ in units),
        "cache_units": len(units),
        "parts": totals.get("parts", 0),
    }
    write_json(Path(out) / "summary.json", summary)
    remove_temporaries(out)  # cards of processes killed while creating one: every process is past that now
    for old in (Path(out) / "runs").iterdir():  # earlier runs' records; this run's stay as its trace
        if old.name != token:
            for path in old.iterdir():
                path.unlink(missing_ok=True)
            old.rmdir()
    return summary
