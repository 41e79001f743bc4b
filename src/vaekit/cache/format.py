"""The latent-cache format (version 2), both sides: what `vaekit encode` writes and what readers open.

A cache is one folder; its unit of work, of resume and of listing is a *unit*: one input shard of a
WebDataset, or one block of `unit_size` consecutive images of an indexed source (folder, Hugging
Face data set). Unit u of a job belongs to rank u % world.

    card.json                          the cache key (VAE fingerprint, scaling/shift, size policy, store,
                                       dtype, flip, tiling) and what the units are
    units/u-UUUUUUUU.index.arrow       the unit's index, an Arrow IPC file with one row per image (key,
                                       path, sha256, flip offset, bucket, sizes, crop box, part, offset);
                                       its schema metadata holds the unit's signature, parts and errors.
                                       Written last: a unit is done exactly when its index exists.
    units/u-UUUUUUUU.pPPP.TOKEN.safetensors
                                       the unit's latents, up to `shard_size` samples per part, one tensor
                                       per kind and bucket: `mean/{W}x{H}`, `logvar/{W}x{H}`, (N, C, h, w)
    units/.u-UUUUUUUU.staging/         where the unit's files are written before they are renamed in
    locks/u-UUUUUUUU.lock              held by the process encoding the unit (host, pid, heartbeat)
    runs/TOKEN/rank-RRRRR.json         what each rank of a run did; the last rank to finish finalises
    catalog.arrow                      one row per unit (name, rows, token): opening a cache reads this
                                       one file; it is removed whenever a unit changes
    errors.jsonl, summary.json         what the last run could not encode, and what it did

Crash safety: parts and index are written in the unit's staging folder and renamed into place; the
index is renamed last and names the parts (by TOKEN, unique per run), so an index never points at
another run's parts. Whatever a kill leaves (staging folders, parts no index names, locks of dead
processes) belongs to one unit and is removed by the next process that takes that unit. Resume is a
listing of index files plus one cheap signature check per unit: no per-image work.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from vaekit.data.crops import make_buckets
from vaekit.data.sources import display_text
from vaekit.errors import VaekitError
from vaekit.io import TEMPORARY_NAME, atomic_path, ensure_folder, storage_errors, umask_mode
from vaekit.model.architecture import fingerprint, vae_config
from vaekit.model.normalization import scale_shift


FORMAT = "vaekit-latents"

FORMAT_VERSION = 2

NON_FINITE = "non-finite latent"

UNIT_INDEX = re.compile(r"^u-(\d{8})\.index\.arrow$")

UNIT_PART = re.compile(r"^u-(\d{8})\.p(\d{3,})\.([0-9a-f]+)\.safetensors$")

UNIT_STAGING = re.compile(r"^\.u-(\d{8})\.staging$")

UNIT_LOCK = re.compile(r"^u-(\d{8})\.lock$")

# The index columns, one row per image. Sizes are (W, H) pairs as in Crop; `flip_offset` is the
# row of the mirrored image's latents in the same part and group, -1 when the cache stores none.
INDEX_COLUMNS = ("key", "path", "sha256", "part", "bucket_w", "bucket_h", "offset", "flip_offset",
                 "original_w", "original_h", "resized_w", "resized_h",
                 "crop_left", "crop_top", "crop_right", "crop_bottom")


def unit_name(unit):
    """u-00000012: the stem of every file of unit 12."""
    return f"u-{unit:08d}"


def index_path(out, unit):
    """Where unit `unit`'s index lives."""
    return Path(out) / "units" / f"{unit_name(unit)}.index.arrow"


def staging_dir(out, unit):
    """The folder a unit's files are written in before they are renamed into units/."""
    return Path(out) / "units" / f".{unit_name(unit)}.staging"


def lock_path(out, unit):
    """The lock file of a unit."""
    return Path(out) / "locks" / f"{unit_name(unit)}.lock"


def new_token():
    """A run token: unique per run, increasing with time (hex nanoseconds plus the pid)."""
    return f"{time.time_ns():016x}{os.getpid() & 0xffff:04x}"


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


CACHE_ENTRIES = ("card.json", "units", "locks", "runs", "catalog.arrow", "errors.jsonl", "summary.json")


def clear_cache(out):
    """Remove the files of a cache (and only those) from `out`, the card last."""
    for name in CACHE_ENTRIES[1:]:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    (Path(out) / "card.json").unlink(missing_ok=True)


def check_card(card, path, key, overwrite):
    """Raise unless `card` (parsed) is a format-2 card with `key`; returns "same" or "replace" (with overwrite)."""
    if card.get("format") != FORMAT:
        raise VaekitError(f"{path} is no vaekit latent cache card; choose another --out.")
    if card.get("version") == 1 and not overwrite:
        raise VaekitError(f"{path.parent} is a latent cache of format 1; convert it with `vaekit cache migrate "
                          f"{path.parent}` (fast: no images are read), or pass --overwrite to re-encode it.")
    if card.get("version") != FORMAT_VERSION and not overwrite:
        raise VaekitError(f"{path.parent} was written in cache format {card.get('version')}, this vaekit writes "
                          f"{FORMAT_VERSION}; pass --overwrite to re-encode it, or choose another --out.")
    if card.get("version") == FORMAT_VERSION and card.get("key") == key:
        if card.get("units", {}).get("kind") == "migrated" and not overwrite:
            raise VaekitError(f"{path.parent} was migrated from format 1: its units do not follow the source's "
                              "split, so it cannot be extended in place. Encode into a new folder, or pass "
                              "--overwrite to re-encode it.")
        return "same"
    if not overwrite:
        raise VaekitError(
            f"{path.parent} holds latents of another cache: {describe_mismatch(card.get('key', {}), key)}. Its "
            "latents cannot be reused. Pass --overwrite to replace them, or choose another --out."
        )
    return "replace"


def create_card(out, card):
    """Put `card` in place as out/card.json unless one exists: atomic and lock-free, for ranks that race."""
    path = Path(out) / "card.json"
    with storage_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=".card.json.", suffix=".tmp", dir=out)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(card, indent=2) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, umask_mode(0o666))
            os.link(tmp, path)  # fails if it exists: the first rank's card wins, complete or not at all
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)


def open_card(out, key, card, overwrite=False, clear=True):
    """Create the cache's card, or check the existing one; returns the card in place.

    With `overwrite` a card with another key (or version) is replaced and the old cache's files removed
    when `clear` (the main process), else the caller waits for that. A folder holding files that are no
    cache is refused, so `--out` never silently mixes into unrelated data.
    """
    out = Path(out)
    path = out / "card.json"
    ensure_folder(out)
    if path.is_file():
        existing = read_card(out, hint="pass --overwrite to start a new cache")
        if check_card(existing, path, key, overwrite) == "same":
            return existing
        if clear:
            clear_cache(out)
    elif any(p.name not in CACHE_ENTRIES and not TEMPORARY_NAME.match(p.name) for p in out.iterdir()):
        raise VaekitError(f"{out} exists and is not a latent cache (no card.json); choose an empty or new folder.")
    create_card(out, card)
    return read_card(out)


def read_card(cache_dir, hint="re-create the cache with `vaekit encode --overwrite`"):
    """The cache's card.json as a dict; a clear error when `cache_dir` is no cache."""
    path = Path(cache_dir) / "card.json"
    if not path.is_file():
        raise VaekitError(f"{cache_dir} is not a latent cache (no card.json). Create one with `vaekit encode`.")
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VaekitError(f"{path} is unreadable ({e}); {hint}.") from None
    if not isinstance(card, dict):
        raise VaekitError(f"{path} is no vaekit latent cache card; {hint}.")
    return card


def require_version(card, cache_dir):
    """Raise the pointer to `vaekit cache migrate` for a format-1 cache; other versions are refused too."""
    if card.get("version") == 1:
        raise VaekitError(f"{cache_dir} is a latent cache of format 1, which this vaekit reads only to convert it: "
                          f"run `vaekit cache migrate {cache_dir}` (fast: no images are read).")
    if card.get("version") != FORMAT_VERSION:
        raise VaekitError(f"{cache_dir} is a latent cache of format {card.get('version')}; this vaekit reads format "
                          f"{FORMAT_VERSION}. Re-encode it with `vaekit encode --overwrite`.")


# ----------------------------------------------------------------------------------------------
# Units on disk


def list_units(out):
    """{unit number: index path} of every done unit (a directory listing, O(units))."""
    folder = Path(out) / "units"
    if not folder.is_dir():
        return {}
    found = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = UNIT_INDEX.match(entry.name)
            if match:
                found[int(match.group(1))] = Path(entry.path)
    return dict(sorted(found.items()))


def read_unit_meta(path):
    """The metadata of a unit index (signature, token, parts, rows, errors), reading only its schema."""
    import pyarrow as pa  # pyarrow is large; the CLI's parser never needs it

    try:
        schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
        return json.loads(schema.metadata[b"vaekit"])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException) as e:
        raise VaekitError(f"Cannot read the unit index {path} ({type(e).__name__}: {e}); re-run `vaekit encode` to "
                          "redo that unit, or delete the file.") from None


def open_index(path):
    """A unit index as a memory-mapped Arrow table (nothing read until a column is touched)."""
    import pyarrow as pa  # see read_unit_meta

    try:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowException) as e:
        raise VaekitError(f"Cannot read the unit index {path} ({type(e).__name__}: {e}); re-run `vaekit encode` to "
                          "redo that unit.") from None


def index_table(rows, meta):
    """An Arrow table of index rows (dicts with INDEX_COLUMNS) with `meta` in its schema."""
    import pyarrow as pa  # see read_unit_meta

    def column(name, kind):
        return pa.array([row[name] for row in rows], type=kind)

    # A file name that is not valid UTF-8 (lone surrogates in Python) is stored in its readable spelling.
    rows = [{**row, "path": display_text(row["path"])} if row["path"] is not None else row for row in rows]

    i32, i16 = pa.int32(), pa.int16()
    arrays = {"key": column("key", pa.string()), "path": column("path", pa.string()),
              "sha256": column("sha256", pa.binary(32)), "part": column("part", i16)}
    for name in INDEX_COLUMNS[4:]:
        arrays[name] = column(name, i32)
    table = pa.table(arrays)
    return table.replace_schema_metadata({"vaekit": json.dumps(meta)})


def write_index(path, table):
    """Write an Arrow IPC file atomically (uncompressed, so readers memory-map it)."""
    import pyarrow as pa  # see read_unit_meta

    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def part_files(out, unit):
    """The part files of a unit present on disk, as {file name: token}."""
    folder = Path(out) / "units"
    stem = unit_name(unit)
    found = {}
    for path in folder.glob(f"{stem}.p*.safetensors"):
        match = UNIT_PART.match(path.name)
        if match and int(match.group(1)) == unit:
            found[path.name] = match.group(3)
    return found


def current_parts(out, unit):
    """The parts named by the unit's index in place (which readers may be using), or none."""
    path = index_path(out, unit)
    try:
        return set(read_unit_meta(path)["parts"]) if path.is_file() else set()
    except VaekitError:  # an unreadable index is replaced; nothing of it is worth keeping
        return set()


def clean_unit(out, unit, keep=()):
    """Remove what a killed run left of a unit: its staging folder and parts its index does not name."""
    removed = 0
    staging = staging_dir(out, unit)
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        removed += 1
    for name in part_files(out, unit):
        if name not in keep:
            (Path(out) / "units" / name).unlink(missing_ok=True)
            removed += 1
    return removed


def invalidate_catalog(out):
    """Remove the catalog: a unit is about to change, so readers must list the units again."""
    (Path(out) / "catalog.arrow").unlink(missing_ok=True)


def write_catalog(out, units):
    """catalog.arrow: (unit, rows, token) of each done unit, so opening the cache reads one file."""
    import pyarrow as pa  # see read_unit_meta

    table = pa.table({"unit": pa.array([u for u, _, _ in units], pa.int64()),
                      "rows": pa.array([r for _, r, _ in units], pa.int64()),
                      "token": pa.array([t for _, _, t in units], pa.string())})
    write_index(Path(out) / "catalog.arrow", table.replace_schema_metadata({"vaekit": json.dumps({"format": 2})}))


def read_catalog(out):
    """[(unit, rows)] from catalog.arrow if present and consistent with the listing, else None."""
    import pyarrow as pa  # see read_unit_meta

    path = Path(out) / "catalog.arrow"
    if not path.is_file():
        return None
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (OSError, pa.ArrowException):
        return None  # a reader falls back to listing the units
    return list(zip(table.column("unit").to_pylist(), table.column("rows").to_pylist()))


@contextlib.contextmanager
def unit_files(out, unit):
    """Yield the unit's fresh staging folder; afterwards it is removed whatever happened."""
    staging = staging_dir(out, unit)
    shutil.rmtree(staging, ignore_errors=True)
    ensure_folder(staging)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staged, final):
    """Rename a finished file from a staging folder into units/ (atomic on one file system)."""
    with storage_errors(final):
        os.replace(staged, final)


def bucket_name(width, height):
    """The tensor-name suffix of a bucket: 'WxH'."""
    return f"{width}x{height}"


def rows_of(table):
    """An index table's columns as numpy arrays (int columns) and Python lists (key, path) - for small tools."""
    data = {name: table.column(name).to_numpy() for name in INDEX_COLUMNS[3:]}
    data["key"] = table.column("key").to_pylist()
    data["path"] = table.column("path").to_pylist()
    data["sha256"] = [bytes(s).hex() if s is not None else None for s in table.column("sha256").to_pylist()]
    return data


def entry_dicts(unit, table, meta, flips=True):
    """A unit's index rows as dicts (one per stored sample, mirrored ones after their image): for tools and tests."""
    data = rows_of(table)
    parts = meta["parts"]
    entries = []
    for i, key in enumerate(data["key"]):
        bucket = [int(data["bucket_w"][i]), int(data["bucket_h"][i])]
        common = {
            "key": key, "path": data["path"][i], "sha256": data["sha256"][i], "unit": unit,
            "part": f"units/{parts[int(data['part'][i])]}", "group": bucket_name(*bucket), "bucket": bucket,
            "original_size": [int(data["original_w"][i]), int(data["original_h"][i])],
            "resized_size": [int(data["resized_w"][i]), int(data["resized_h"][i])],
            "crop_box": [int(data[c][i]) for c in ("crop_left", "crop_top", "crop_right", "crop_bottom")],
        }
        entries.append({**common, "flip": False, "offset": int(data["offset"][i])})
        if flips and data["flip_offset"][i] >= 0:
            entries.append({**common, "flip": True, "offset": int(data["flip_offset"][i])})
    return entries


def cache_entries(cache_dir, flips=True):
    """Every stored sample of a cache as a dict, in unit order (O(images) memory: for tools, tests, small caches)."""
    card = read_card(cache_dir)
    require_version(card, cache_dir)
    entries = []
    for unit, path in list_units(cache_dir).items():
        entries.extend(entry_dicts(unit, open_index(path), read_unit_meta(path), flips))
    return entries


def unit_errors(out):
    """The error entries recorded in every unit's index, in unit order."""
    for path in list_units(out).values():
        yield from read_unit_meta(path).get("errors", [])


def bucket_codes(buckets):
    """int32 codes of (W, H) pairs: W * 65536 + H, sortable and unique for sides below 65536."""
    buckets = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)
    return (buckets[:, 0] * 65536 + buckets[:, 1]).astype(np.int64)
