"""Bulk encoding of an image source into a unit-granular, resumable latent cache (`vaekit encode`).

Every process of `accelerate launch` / `torchrun` owns the units u with u % world == rank (see
vaekit.cache.units), skips those already done with the same signature, and encodes the rest:
images are read, decoded and sized in DataLoader workers, encoded on the device, and written by a
background thread, so the three overlap. Ranks meet twice at the start (a few bytes: the card is in
place, every rank sees the same units) and never after: a rank that finishes early writes its
record and exits, and the last rank to finish finalises the cache. So no rank waits, inside a
collective with a timeout, for another's share of the work.

Runs may overlap (a second launch, a paused node that comes back). Each unit is locked by the process
encoding it; before a unit's first batch is encoded the process checks again that the lock is still
its own and that nobody finished the unit meanwhile, and the writer checks the lock again before it
publishes (see vaekit.cache.writer). A done unit is re-checked cheaply on every run (its index with
its digest, each part's size and header, row counts: vaekit.cache.reader.check_unit) and encoded
again when it fails, so re-running the command repairs what those checks find.
"""

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaekit import __version__
from vaekit.cache.format import (FORMAT, FORMAT_MINOR, FORMAT_VERSION, UNIT_LOCK, cache_key, card_hash, clean_unit,
                                 invalidate_catalog, lock_path, new_token, open_card, read_catalog,
                                 scan_units, size_policy, unit_schema, write_card)
from vaekit.cache.reader import CacheDamage, CardInfo, catalog_rows, check_unit, read_meta, refresh_catalog
from vaekit.cache.keys import rename_repeated_keys
from vaekit.cache.units import IndexedPlan, Preparer, ShardPlan, UnitStream, show_reading
from vaekit.cache.writer import UnitWriter
from vaekit.codec.inference import BulkEncoder, tile_option
from vaekit.data.shards import is_shard_file, looks_like_shards
from vaekit.data.sources import open_source
from vaekit.device import DTYPES, process_state, resolve_compute_dtype
from vaekit.errors import VaekitError
from vaekit.faults import fault_point
from vaekit.io import atomic_path, ensure_folder, remove_temporaries, write_json
from vaekit.locks import Heartbeat, describe_owner, live_tokens, release, renew, try_lock
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
    """The source of `config`, cut into units (an IndexedPlan or a ShardPlan).

    With --limit the plan holds the first N images; its last unit may be a shorter version of a unit
    the cache already holds whole, so the plan keeps the unlimited one (`unlimited`) to recognise it.
    """
    if is_streamed(config):
        if config.limit is not None:
            raise VaekitError("--limit counts images of an indexed source; with WebDataset shards, pass fewer shards "
                              "(a shorter brace range) instead.")
        return ShardPlan(config.data, config.image_column, config.max_image_bytes, config.read_timeout)
    source = open_source(config.data, config.source, config.split, config.image_column, config.key_column)
    if config.limit is not None and config.limit < len(source):
        plan = IndexedPlan(source.subset(range(config.limit)), config.unit_size, config.max_image_bytes)
        plan.unlimited = IndexedPlan(source, config.unit_size, config.max_image_bytes)
        return plan
    return IndexedPlan(source, config.unit_size, config.max_image_bytes)


def done_signatures(plan, unit):
    """The signatures a done unit may have and stay done: its own, and under --limit the whole unit's."""
    signatures = {plan.signature(unit)}
    unlimited = getattr(plan, "unlimited", None)
    if unlimited is not None and unit == plan.count - 1:
        signatures.add(unlimited.signature(unit))
    return signatures


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


def claim_units(out, plan, units, config, heartbeat, token):
    """Take the lock of each unit to encode; returns ({held unit: lock record}, [messages of units another holds]).

    What killed writers left of a unit is removed then; the parts of a writer whose stale lock was
    taken over are kept while that process still runs on this host (it may be paused, not dead).
    """
    held, busy, listing = {}, [], scan_units(out)
    for unit in units:
        path = lock_path(out, unit)
        record = try_lock(path, config.lock_timeout, token)
        if record:
            heartbeat.add(path, record)
            clean_unit(out, unit, (), live_tokens(record), config.lock_timeout, listing)
            held[unit] = record
        else:
            busy.append(f"{plan.label(unit)} is being encoded by {describe_owner(path)}")
    return held, busy


def units_to_encode(out, plan, mine, card):
    """(units of `mine` to encode, done units that a killed run left files of, count unchanged, repaired, seen).

    One listing of units/ and one of locks/ find every unit's index, parts, staging folders and lock (a
    process killed after publishing a unit, before releasing its lock, leaves the lock behind). A done
    unit whose signature matches is checked cheaply (`check_unit`: its index and digest, each part's
    size and header, row counts; no part is hashed) and encoded again when it fails: `repaired` lists
    those, with the reason. `seen` maps each unit to encode to the token of the index it has now (None
    without one), so a unit that another process finishes meanwhile can be told apart (`UnitGate`).
    """
    listing = scan_units(out)
    locks = Path(out) / "locks"
    locked = {int(m.group(1)) for name in (os.listdir(locks) if locks.is_dir() else ()) if (m := UNIT_LOCK.match(name))}
    todo, dirty, unchanged, repaired, seen = [], [], 0, [], {}
    for unit in mine:
        path = listing.indices.get(unit)
        seen[unit] = None
        if path is not None:
            try:
                meta, _, _ = read_meta(out, unit, path, card)
                seen[unit] = meta.get("token")
                if meta.get("signature") in done_signatures(plan, unit) and not meta.get("retry"):
                    check_unit(out, unit, path, card)
                    unchanged += 1
                    if (listing.parts.get(unit, set()) != set(meta["parts"]) or unit in listing.staging
                            or unit in locked):
                        dirty.append(unit)
                    continue
            except CacheDamage as e:  # a unit that fails its checks: encode it again
                repaired.append({"unit": unit, "label": plan.label(unit), "reason": e.what})
            except VaekitError:  # an unreadable index: redo the unit
                pass
        todo.append(unit)
    return todo, dirty, unchanged, repaired, seen


def tidy_units(out, units, config, token=""):
    """Remove leftovers of killed runs (staging folders, unnamed parts, stale locks) from done units."""
    listing = scan_units(out) if units else None
    for unit in units:
        path = lock_path(out, unit)
        record = try_lock(path, config.lock_timeout, token)
        if record:
            try:
                clean_unit(out, unit, (), live_tokens(record), config.lock_timeout, listing)
            finally:
                release(path, record)


def start_cache(state, out, key, card, plan, config, prune=True):
    """Open (or create) the cache on every process; all agree or all raise. Returns (this run's token, card).

    With `prune` (a run over the whole source) units beyond a source that shrank are removed.
    """
    status = {"error": None, "units": plan.count, "token": new_token()}
    placed = None
    if state.is_main_process:
        try:
            placed = open_card(out, key, card, config.overwrite, clear=True)
            check_layout(out, placed, card, plan, config.overwrite)
            if prune and getattr(plan, "unlimited", None) is None and plan.kind == "indexed":
                remove_units_beyond(out, plan.count)
        except VaekitError as e:
            status["error"] = str(e)
    statuses = agree(state, status)  # the card is in place (or the main process failed) before the others look
    raise_disagreement(statuses)
    if not state.is_main_process:
        try:
            placed = open_card(out, key, card, overwrite=False, clear=False)
        except VaekitError as e:
            status["error"] = f"{e} (this process loaded a different VAE or options than process 0?)"
    if status["units"] != statuses[0]["units"]:
        status["error"] = (f"this process sees {status['units']} units in --data, process 0 sees "
                           f"{statuses[0]['units']}: every node must see the same data (same path, same files).")
    raise_disagreement(agree(state, status))
    return statuses[0]["token"], placed


def check_layout(out, existing, card, plan, overwrite):
    """Refuse a run whose units would be cut differently from the cache's (mixing them would hold images twice).

    An indexed source's layout is its --unit_size. A shard list may grow (new shards are new units) or
    be given shorter (the shards' --limit: the units beyond stay); a shard at another position than
    the cache's unit holding it is refused. A longer compatible list is recorded in the card.
    """
    if overwrite or existing is None:
        return
    old, new = existing.get("units") or {}, card["units"]
    if old.get("kind") != new["kind"]:
        raise VaekitError(f"{out} holds units of {old.get('kind')} input ({old.get('source')}); this run reads "
                          f"{new['kind']} input ({new['source']}). Pass --overwrite to encode the cache again, or "
                          "choose another --out.")
    if new["kind"] == "indexed":
        if old.get("unit_size") != new["unit_size"]:
            raise VaekitError(f"{out} was encoded in units of {old.get('unit_size')} images (--unit_size "
                              f"{old.get('unit_size')}); this run asks for {new['unit_size']}. Units cut differently "
                              f"would hold images twice: pass --unit_size {old.get('unit_size')}, or --overwrite to "
                              "encode the cache again, or choose another --out.")
        return
    if old.get("shard_list") == new["shard_list"]:
        return
    for unit, label in done_labels(out).items():
        if unit < plan.count and label and label != plan.label(unit):
            raise VaekitError(f"{out} holds {label} as unit {unit}, where this run lists {plan.label(unit)}: the "
                              "shard list changed order. Pass the cache's list (adding shards at its end is fine), "
                              "or --overwrite to encode the cache again, or choose another --out.")
    if plan.count >= int(old.get("shards") or 0):
        write_card(out, {**existing, "units": {**old, **new}})


def done_labels(out):
    """{unit: label} of the units on disk: from the catalog when it matches the listing, else each index's schema."""
    listing = scan_units(out)
    catalog = read_catalog(out)
    try:
        card = CardInfo(json.loads((Path(out) / "card.json").read_text()), out)
    except (OSError, ValueError, VaekitError):
        card = None
    rows = catalog_rows(catalog, listing, card) if card is not None else None
    if rows is not None and all("label" in row for row in rows.values()):
        return {unit: row["label"] for unit, row in rows.items()}
    labels = {}
    for unit, path in listing.indices.items():
        try:
            labels[unit] = unit_schema(path)[0].get("label")
        except VaekitError:  # a damaged index is redone by its owner; its label cannot be trusted
            pass
    return labels


def remove_units_beyond(out, count):
    """Drop units numbered `count` and above: the source shrank, so they are stale (never under --limit)."""
    for unit, path in scan_units(out).indices.items():
        if unit >= count:
            invalidate_catalog(out)
            path.unlink(missing_ok=True)
            clean_unit(out, unit, keep=())


def prepare_encode(config, vae, device):
    """(vae, size policy, cache key, unit plan, card, BulkEncoder) of a run, before the cache is touched."""
    if vae is None:
        vae = load_encoder_vae(config)
    policy = size_policy(config, downsample_factor(vae))
    key = cache_key(config, vae, policy)  # before the dtype cast below: the fingerprint hashes dtypes
    plan = open_data(config)
    card = {"format": FORMAT, "version": FORMAT_VERSION, "minor": FORMAT_MINOR, "key": key,
            "units": unit_layout(plan),
            "vae": {"source": config.vae, "override": list(config.override), "weights": config.weights,
                    "config": vae_config(vae), "downsample_factor": downsample_factor(vae),
                    "latent_channels": latent_channels(vae)},
            "encode": encode_options(config),
            "vaekit_version": __version__}
    tile_option(vae, config.tile)
    # Built after the fingerprint, which hashes dtypes: the encoder casts.
    encoder = BulkEncoder(vae, device, resolve_compute_dtype(config.compute_dtype, device), config.channels_last,
                          config.compile, config.tile)
    return vae, policy, key, plan, card, encoder


def unit_layout(plan):
    """How the cache's units are cut: part of its identity (card["units"]), checked by `check_layout`."""
    layout = {"kind": plan.kind, "unit_size": getattr(plan, "unit_size", None), "source": plan.description}
    if plan.kind == "shards":
        import xxhash  # light; only shard lists are hashed

        layout["shards"] = plan.count
        layout["shard_list"] = xxhash.xxh3_128("\0".join(plan.urls).encode("utf-8", "surrogateescape")).hexdigest()
    return layout


def encode_options(config):
    """The options of the run that created the cache, so `vaekit cache verify --repair` can encode units again."""
    options = dataclasses.asdict(config)
    data = Path(config.data)
    if data.exists():  # a path relative to where the encode ran must still find the data from elsewhere
        options["data"] = str(data.resolve())
    options.pop("out", None)
    options.pop("overwrite", None)
    return options


def encode_dataset(config, vae=None, progress=True, units=None):
    """Encode `config.data` into the cache `config.out`; returns the summary dict on the process that
    finalised the cache (the last to finish), None on the others.

    `vae` (moved to the device, dtype and memory format of the run) replaces loading `config.vae`.
    `units` restricts the run to those unit numbers (`vaekit cache verify --repair`).
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
    token, placed = start_cache(state, out, key, card, plan, config, prune=units is None)
    info = CardInfo(placed, out)

    mine = [u for u in range(rank, plan.count, world) if units is None or u in units]
    todo, dirty, unchanged, repaired, seen = units_to_encode(out, plan, mine, info)
    ensure_folder(out / "locks")
    tidy_units(out, dirty, config, token)
    heartbeat = Heartbeat(every=max(1.0, config.lock_timeout / 10))
    leases, busy = claim_units(out, plan, todo, config, heartbeat, token)
    counters = {"encoded": 0, "errors": 0, "units_unchanged": unchanged, "units_repaired": len(repaired)}
    writer = UnitWriter(out, token, config.shard_size, config.store, heartbeat, leases, card_hash(placed),
                        config.lock_timeout)
    gate = UnitGate(out, plan, leases, writer, seen)
    try:
        if leases:
            encode_units(encoder, plan, list(leases), policy, config, state.device, writer, counters,
                         progress and state.is_main_process, gate)
    finally:
        heartbeat.close()
        for unit, record in leases.items():  # released by the writer as each unit ends; these a failure cut short
            release(lock_path(out, unit), record)
    counters.update(writer.counts)
    counters["errors"] += writer.counts["non_finite"]
    counters["encoded"] -= writer.counts["non_finite"]
    record = {"rank": rank, "world": world, "counters": counters, "failed": writer.failed, "busy": busy,
              "lost": writer.lost, "repaired": repaired, "encoded_units": sorted(gate.started),
              "seconds": time.perf_counter() - started}
    summary = finish_run(out, plan, token, record, config.lock_timeout)
    if busy or writer.failed:
        problems = [*busy, *(f"{f['label']}: {f['reason']} ({f['detail']})" for f in writer.failed),
                    *(f"{f['label']}: {f['reason']}" for f in writer.lost)]
        raise VaekitError(f"{len(problems)} unit(s) of this process were not encoded: {problems[0]}"
                          + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
                          + ". Everything else is in the cache; run the same command again to finish them.")
    if writer.lost:
        first = writer.lost[0]
        raise VaekitError(f"{len(writer.lost)} unit(s) of this process were taken over by another process and left "
                          f"to it: {first['label']}: {first['reason']}"
                          + (f"; and {len(writer.lost) - 1} more" if len(writer.lost) > 1 else "")
                          + ". Nothing of theirs was published by this process; the rest is in the cache.")
    return summary


class UnitGate:
    """Checked before a unit's first batch is encoded: is the lock still this process's, and is the unit
    still not done? A unit taken over by another process (this one was paused past --lock_timeout) or
    finished meanwhile is skipped, so overlapping runs encode each unit once."""

    def __init__(self, out, plan, leases, writer, seen):
        self.out, self.plan, self.leases, self.writer, self.seen = Path(out), plan, leases, writer, seen
        self.started = set()

    def __call__(self, unit):
        """True to encode `unit` now."""
        path = lock_path(self.out, unit)
        lost = renew(path, self.leases[unit])
        if lost is not None:
            self.writer.lost.append({"unit": unit, "label": self.plan.label(unit), "reason": f"skipped: {lost}"})
            self.writer.counts["units_lost"] += 1
            return False
        index = self.out / "units" / f"u-{unit:08d}.index.arrow"
        if index.is_file():
            try:
                meta = unit_schema(index)[0]
            except VaekitError:
                meta = {}
            if meta.get("signature") in done_signatures(self.plan, unit) and not meta.get("retry") and (
                    meta.get("token") not in (self.seen.get(unit), self.writer.token)):  # published since the listing
                self.writer.counts["units_done_meanwhile"] = self.writer.counts.get("units_done_meanwhile", 0) + 1
                release(path, self.leases[unit])
                return False
        self.started.add(unit)
        fault_point("unit-start", unit)
        return True


def gated(chunks, gate, progress=None):
    """The chunks of units `gate` lets through; a skipped unit's chunks are dropped as they arrive."""
    verdicts = {}
    for chunk in chunks:
        unit = chunk["unit"]
        if unit not in verdicts:
            verdicts[unit] = gate(unit)
        if verdicts[unit]:
            yield chunk
        elif progress is not None:
            progress.update(sum(len(m) for _, m in chunk["groups"].values()) + len(chunk["errors"]))


def encode_units(encoder, plan, units, policy, config, device, writer, counters, show_progress, gate=None):
    """Run the DataLoader -> encoder -> writer pipeline over `units` (each passing `gate` first, when given)."""
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
    if gate is not None:
        chunks = gated(chunks, gate, bar)
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


def finish_run(out, plan, token, record, stale_after=600.0):
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
    return finalize_cache(out, plan, token, [json.loads(p.read_text()) for p in records], stale_after)


def finalize_cache(out, plan, token, records, stale_after=600.0):
    """The catalog, the merged error list and summary.json of a finished run; returns the summary.

    Runs that overlap may finalise at the same moment: the catalog is written by `refresh_catalog`'s
    protocol, every other file atomically under a name of its own, and clean-up removes only what
    dead processes left (temporaries by owner, other runs' records once finalised or stale).
    """
    out = Path(out)
    rename_repeated_keys(out, plan, stale_after)  # before the catalog and errors.jsonl, which list the renames
    try:
        refresh_catalog(out)
    except VaekitError:  # a damaged card: readers say so; `vaekit cache verify --repair` restores it
        pass
    units = unit_survey(out)
    errors = write_error_list(out, plan, records, units)
    summary = run_summary(plan, token, records, units, errors)
    write_json(out / "summary.json", summary)
    remove_temporaries(out, stale_after)  # cards and lists of dead processes; a live writer's stay
    remove_old_runs(out, token, stale_after)
    (out / "runs" / token / "finalized").touch()
    return summary


def unit_survey(out):
    """{unit: (rows, error entries)} of every readable unit index (one schema read each); damaged ones left out."""
    units = {}
    for unit, path in scan_units(out).indices.items():
        try:
            meta = unit_schema(path)[0]
            units[unit] = (int(meta["rows"]), list(meta.get("errors") or []))
        except (VaekitError, KeyError, TypeError, ValueError):  # replaced meanwhile, or damaged: verify reports it
            continue
    return units


def write_error_list(out, plan, records, units):
    """errors.jsonl: every unit's recorded errors, the run's failed units and what the source skipped; returns the count."""
    lines = [*(e for _, errors in units.values() for e in errors), *(f for r in records for f in r["failed"]),
             *({"key": s["key"], "path": s["path"], "reason": s["reason"], "detail": None} for s in plan.skipped)]
    with atomic_path(Path(out) / "errors.jsonl") as tmp, open(tmp, "w", encoding="utf-8",
                                                              errors="backslashreplace") as f:
        for entry in lines:
            f.write(json.dumps(entry) + "\n")
    return len(lines)


def run_summary(plan, token, records, units, errors):
    """summary.json of a run from its ranks' records: the one place where a run's totals are assembled."""
    totals = {}
    for record in records:
        for name, value in record["counters"].items():
            totals[name] = totals.get(name, 0) + value
    seconds = max(r["seconds"] for r in records)
    repaired = [entry for r in records for entry in r.get("repaired", [])]
    return {
        "token": token,
        "processes": len(records),
        "source": plan.description,
        "units_in_source": plan.count,
        "units_encoded": totals.get("units_encoded", 0),
        "units_unchanged": totals.get("units_unchanged", 0),
        "units_failed": totals.get("units_failed", 0),
        "units_busy": sum(len(r["busy"]) for r in records),
        "units_lost": totals.get("units_lost", 0),
        "units_repaired": len(repaired),
        "units_missing": plan.count - len(set(units) & set(range(plan.count))),
        "images_in_source": len(plan.source) if plan.kind == "indexed" else None,
        "encoded": totals.get("encoded", 0),
        "errors": errors,
        "seconds": round(seconds, 2),
        "images_per_second": round(totals.get("encoded", 0) / seconds, 2) if seconds > 0 else None,
        "cache_images": sum(rows for rows, _ in units.values()),
        "cache_units": len(units),
        "parts": totals.get("parts", 0),
        "encoded_units": sorted({u for r in records for u in r.get("encoded_units", [])}),
        "repaired": repaired[:100],  # the first hundred, with the reason each failed its checks
    }


def remove_old_runs(out, token, stale_after):
    """Remove earlier runs' records (this run's stay as its trace): those finalised, or untouched for `stale_after` s.

    A run still finishing (another launch overlapping this one) keeps its folder: its last rank reads it.
    """
    now = time.time()
    for old in (Path(out) / "runs").iterdir():
        if old.name == token:
            continue
        try:
            done = (old / "finalized").exists() or now - max(
                [p.stat().st_mtime for p in old.iterdir()] or [old.stat().st_mtime]) > stale_after
        except FileNotFoundError:  # removed by another finaliser meanwhile
            continue
        if done:
            shutil.rmtree(old, ignore_errors=True)
