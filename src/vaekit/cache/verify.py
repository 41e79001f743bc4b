"""`vaekit cache verify CACHE [--repair] [--jobs N]`: hash every part, check every index and the catalog.

Verify streams over the units (one listing, then each unit on its own: memory grows with the number
of units and parts, never of images) on a bounded pool of `jobs` threads (xxhash releases the GIL,
so threads hash in parallel), with a progress bar in bytes. Per unit it runs
`vaekit.cache.reader.check_unit` with every part hashed: the same checks readers run, plus the
content hashes readers never compute. It also checks the card against the identity every index
repeats, the catalog against the units, and lists leftovers (parts no index names, staging folders
and temporaries of dead processes).

`--repair` never deletes: it moves each damaged unit (index first, so the unit is at once "not
done", then its parts) and the leftovers into `quarantine/STAMP/` inside the cache with the reason,
restores a damaged card from the catalog's copy when the units confirm it, then encodes the moved
units again through `encode_dataset` restricted to them, with the options recorded in the card
(`--data` overrides the source). Units whose source cannot be read are listed as lost; their files
stay in the quarantine folder. A repair killed at any point is finished by running it again: a unit
moved aside and not yet encoded is found in the quarantine folder.
"""

import concurrent.futures
import dataclasses
import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from vaekit.cache.config import EncodeConfig
from vaekit.cache.format import (CATALOG_COLUMNS, card_hash, catalog_row, index_path, invalidate_catalog, lock_path,
                                 read_card, read_catalog, scan_units, unit_name, unit_schema, write_card)
from vaekit.cache.reader import CacheDamage, CardInfo, catalog_rows, check_unit, read_meta, refresh_catalog
from vaekit.errors import VaekitError
from vaekit.faults import fault_point
from vaekit.io import TEMPORARY_NAME, abandoned, ensure_folder, write_json
from vaekit.locks import describe_owner, release, try_lock


def load_card(root):
    """(CardInfo or None, problem text or None, the catalog's confirmed card copy or None)."""
    catalog = read_catalog(root)
    copy = catalog[1].get("card") if catalog else None
    if not isinstance(copy, dict) or catalog[1].get("card_hash") != card_hash(copy):
        copy = None
    try:
        return CardInfo(read_card(root), root), None, copy
    except VaekitError as e:
        return None, str(e), copy


def unit_card_hashes(listing, limit=16):
    """The card hashes the first `limit` unit indices record (what a restored card must match)."""
    found = set()
    for path in list(listing.indices.values())[:limit]:
        try:
            found.add(unit_schema(path)[0].get("card"))
        except VaekitError:
            continue
    return found


def verify_cache(cache_dir, jobs=1, progress=True):
    """Check a whole cache; returns a report dict (see `format_report`); raises only when no card can be had."""
    root = Path(cache_dir)
    started = time.perf_counter()
    if not root.is_dir():
        raise VaekitError(f"{root} is no folder; pass the folder `vaekit encode --out` wrote.")
    if not any((root / name).exists() for name in ("card.json", "catalog.arrow", "units")):
        raise VaekitError(f"{root} is not a latent cache (no card.json, catalog or units/); pass the folder "
                          "`vaekit encode --out` wrote.")
    info, card_problem, copy = load_card(root)
    listing = scan_units(root)
    recorded = unit_card_hashes(listing) - {None}
    if card_problem is None and info.hash is not None and recorded and info.hash not in recorded:
        card_problem = f"{root}: card.json does not match the cache identity its units record (edited or replaced)"
    if card_problem is not None:
        if copy is None or (recorded - {card_hash(copy)}):
            raise VaekitError(f"{card_problem.rstrip('.')} (no confirmed copy in the catalog either, so the units "
                              "cannot be checked; restore card.json from a backup).")
        info = CardInfo(copy, root)  # check the units against the catalog's copy; repair restores it
    catalog = read_catalog(root)
    rows = catalog_rows(catalog, listing, info)
    report = {"cache": str(root), "units": len(listing.indices), "damaged": [], "card": card_problem,
              "catalog": None, "leftovers": [], "pending": pending_units(root, listing), "bytes": 0,
              "without_checksums": info.minor < 1, "card_copy": copy}
    if catalog is None:
        report["catalog"] = "missing (a run in progress or cut short); readers list the units instead"
    elif rows is None:
        report["catalog"] = "does not match the units on disk; readers list the units instead"
        for unit in sorted(set(catalog[0].get("unit") or []) - set(listing.indices)):
            if isinstance(unit, int):
                report["damaged"].append({"unit": unit, "reason": "its index is missing (the catalog lists it)"})
    total = sum(sizes(root, listing))
    named = set()
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress,
               smoothing=0.1)

    def check(unit, path):
        index = check_unit(root, unit, path, info, hash_parts=True, progress=bar.update)
        if rows is not None:  # the catalog against the unit, as readers will compare them
            _, raw, size = read_meta(root, unit, path, info)
            if catalog_row(unit, index.meta, raw, size) != {k: rows[unit].get(k) for k in CATALOG_COLUMNS}:
                report["catalog"] = report["catalog"] or f"its row of unit {unit_name(unit)} differs from the unit"
        return index.parts

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
            waiting = {}
            for unit, path in listing.indices.items():
                waiting[pool.submit(check, unit, path)] = unit
                if len(waiting) >= 2 * max(1, jobs):  # a bounded window: memory never grows with the cache
                    collect(waiting, report, named, concurrent.futures.FIRST_COMPLETED)
            collect(waiting, report, named, concurrent.futures.ALL_COMPLETED)
    finally:
        bar.close()
    report["bytes"] = total
    report["leftovers"] = leftovers(root, listing, named, {d["unit"] for d in report["damaged"]})
    report["damaged"].sort(key=lambda d: d["unit"])
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def collect(waiting, report, named, when):
    """Move finished checks from `waiting` into the report."""
    done, _ = concurrent.futures.wait(waiting, return_when=when)
    for future in done:
        unit = waiting.pop(future)
        try:
            named.update(future.result())
        except CacheDamage as e:
            report["damaged"].append({"unit": unit, "reason": e.what})


def sizes(root, listing):
    """The sizes of every index and part, for the progress bar (one stat each)."""
    folder = root / "units"
    for names in [[p.name for p in listing.indices.values()], *map(sorted, listing.parts.values())]:
        for name in names:
            try:
                yield os.lstat(folder / name).st_size
            except OSError:
                yield 0


def leftovers(root, listing, named, damaged):
    """Files that belong to no done unit: parts no index names, and staging folders and temporaries of dead writers."""
    found = []
    for unit, parts in listing.parts.items():
        if unit not in damaged:
            found.extend(sorted(parts - named))
    for unit, folders in listing.staging.items():
        found.extend(name for name in folders if abandoned(root / "units" / name, stale_after=24 * 3600))
    found.extend(name for name in listing.other if TEMPORARY_NAME.match(name)
                 and abandoned(root / "units" / name, stale_after=24 * 3600))
    return found


def pending_units(root, listing):
    """Units a repair moved aside that have no index yet: {unit: quarantine folder} (a repair cut short, or lost)."""
    pending = {}
    quarantine = root / "quarantine"
    if not quarantine.is_dir():
        return pending
    for stamp in sorted(quarantine.iterdir()):
        for folder in sorted(stamp.glob("u-*")) if stamp.is_dir() else ():
            try:
                unit = int(folder.name[2:])
            except ValueError:
                continue
            if unit not in listing.indices:
                pending[unit] = str(folder.relative_to(root))
    return pending


# ----------------------------------------------------------------------------------------------
# Repair


def repair_cache(cache_dir, report, data=None, progress=True, lock_timeout=600.0):
    """Repair what `verify_cache` found; returns {"moved", "restored_card", "encoded", "lost", "quarantine"}."""
    root = Path(cache_dir)
    result = {"moved": [], "restored_card": False, "encoded": [], "lost": [], "quarantine": None, "busy": []}
    if report["card"] is not None:
        write_card(root, report["card_copy"])  # verify_cache confirmed the copy against the units
        result["restored_card"] = True
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder = root / "quarantine" / stamp
    for entry in report["damaged"]:
        unit = entry["unit"]
        moved = move_unit_aside(root, unit, folder, entry["reason"], lock_timeout)
        if moved is None:
            result["busy"].append(f"unit {unit_name(unit)} is being encoded by {describe_owner(lock_path(root, unit))}")
        else:
            result["moved"].append(unit)
    if report["leftovers"]:
        ensure_folder(folder / "leftovers")
        for name in report["leftovers"]:
            source = root / "units" / name
            if source.exists():
                os.replace(source, folder / "leftovers" / name.lstrip("."))
    if result["moved"] or report["leftovers"]:
        result["quarantine"] = str(folder.relative_to(root))
        invalidate_catalog(root)
    pending = sorted(set(result["moved"]) | set(report["pending"]))
    if pending:
        encoded, lost = encode_again(root, pending, data, progress)
        result["encoded"], result["lost"] = encoded, lost
    if not pending or report["catalog"] is not None:
        refresh_catalog(root)
    return result


def move_unit_aside(root, unit, folder, reason, lock_timeout):
    """Move a unit's index (first: the unit is then not done) and its parts into `folder`/u-UUUUUUUU; None if locked."""
    lock = lock_path(root, unit)
    ensure_folder(lock.parent)
    record = try_lock(lock, lock_timeout, f"repair{os.getpid()}")
    if not record:
        return None
    try:
        target = ensure_folder(folder / unit_name(unit))
        write_json(target / "reason.json", {"unit": unit, "reason": reason, "moved": time.strftime("%Y-%m-%d %H:%M:%S")})
        invalidate_catalog(root)
        index = index_path(root, unit)
        if index.exists():
            os.replace(index, target / index.name)
        fault_point("repair-moved", unit)
        for part in scan_units(root).parts.get(unit, ()):
            os.replace(root / "units" / part, target / part)
        return target
    finally:
        release(lock, record)


def repair_config(root, data=None):
    """The EncodeConfig that encodes this cache's units again: the options recorded in its card, or rebuilt
    from its key for caches written before they were recorded; `data` replaces the source."""
    card = read_card(root)
    fields = {f.name for f in dataclasses.fields(EncodeConfig)}
    options = {k: v for k, v in (card.get("encode") or {}).items() if k in fields}
    if not options:
        key, vae, units = card.get("key", {}), card.get("vae", {}), card.get("units", {})
        policy = key.get("size_policy") or {}
        options = {"vae": vae.get("source") or "", "override": vae.get("override", []),
                   "weights": vae.get("weights", "ema"), "store": key.get("store"), "dtype": key.get("dtype"),
                   "flip": key.get("flip"), "tile": key.get("tile", "off"), "background": key.get("background"),
                   "small_images": policy.get("small_images"), "min_size": policy.get("min_size", 0)}
        if policy.get("mode") == "buckets":
            options.update(buckets=True, resolution=int(round(policy["target_area"] ** 0.5)),
                           min_aspect=policy["min_aspect"], max_aspect=policy["max_aspect"], bucket_step=policy["step"])
        else:
            options["resolution"] = policy.get("resolution")
        if units.get("unit_size"):
            options["unit_size"] = units["unit_size"]
        options = {k: v for k, v in options.items() if v is not None}
    if data is not None:
        options["data"] = str(data)
    if not options.get("data"):
        raise VaekitError(f"{root} does not record the source it was encoded from; pass --data SRC to encode "
                          "the damaged units again.")
    return EncodeConfig(**{**options, "out": str(root), "overwrite": False})


def encode_again(root, units, data, progress):
    """Encode `units` again through the encode pipeline; returns (units now done, [(unit, why lost)])."""
    from vaekit.cache.encode import encode_dataset  # torch and the VAE: only when there is something to encode

    reason = None
    fault_point("repair-encoding")
    try:
        encode_dataset(repair_config(root, data), progress=progress, units=set(units))
    except VaekitError as e:
        reason = str(e)
    listing = scan_units(root)
    encoded = [u for u in units if u in listing.indices]
    lost = [(u, reason or "the source has no such unit any more") for u in units if u not in listing.indices]
    return encoded, lost


def format_report(report, repair=None):
    """The text `vaekit cache verify` prints."""
    rate = report["bytes"] / report["seconds"] / 2**20 if report.get("seconds") else 0.0
    lines = [f"verified {report['cache']}: {report['units']} units, {report['bytes'] / 2**20:.1f} MB hashed in "
             f"{report['seconds']:.1f} s ({rate:.0f} MB/s)"]
    if report["without_checksums"]:
        lines.append("note: written before cache checksums (format 2.0): structure checked, content not")
    if report["card"]:
        lines.append(f"card: {report['card']}")
    if report["catalog"]:
        lines.append(f"catalog: {report['catalog']}")
    for entry in report["damaged"]:
        lines.append(f"damaged: unit {unit_name(entry['unit'])}: {entry['reason']}")
    for unit, where in sorted(report["pending"].items()):
        lines.append(f"missing: unit {unit_name(unit)} was moved aside to {where} and not encoded again yet")
    if report["leftovers"]:
        lines.append(f"leftovers: {len(report['leftovers'])} file(s) no unit names (from killed runs), e.g. "
                     f"{report['leftovers'][0]}")
    if repair is None:
        if report["damaged"] or report["pending"] or report["card"]:
            lines.append(f"run `vaekit cache verify {report['cache']} --repair` to move damaged units aside and "
                         "encode them again")
        elif not report["leftovers"]:
            lines.append("the cache is whole")
        return "\n".join(lines)
    if repair["restored_card"]:
        lines.append("restored card.json from the catalog's copy")
    if repair["quarantine"]:
        lines.append(f"moved {len(repair['moved'])} damaged unit(s) and {len(report['leftovers'])} leftover(s) to "
                     f"{report['cache']}/{repair['quarantine']}")
    if repair["encoded"]:
        lines.append(f"encoded again: {len(repair['encoded'])} unit(s)")
    for message in repair["busy"]:
        lines.append(f"left alone: {message}")
    for unit, why in repair["lost"]:
        lines.append(f"lost: unit {unit_name(unit)} ({why})")
    return "\n".join(lines)


def report_json(report, repair=None):
    """The report as JSON-safe data (for --json)."""
    data = {k: v for k, v in report.items() if k != "card_copy"}
    data["pending"] = {unit_name(u): w for u, w in report["pending"].items()}
    if repair is not None:
        data["repair"] = {**repair, "lost": [{"unit": u, "reason": r} for u, r in repair["lost"]]}
    return json.loads(json.dumps(data))
