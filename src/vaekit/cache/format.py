"""The latent-cache format (version 2.1), both sides: what `vaekit encode` writes and what readers open.

A cache is one folder; its unit of work, of resume and of listing is a *unit*: one input shard of a
WebDataset, or one block of `unit_size` consecutive images of an indexed source (folder, Hugging
Face data set). Unit u of a job belongs to rank u % world.

    card.json                          the cache key (VAE fingerprint, scaling/shift, size policy, store,
                                       dtype, flip, tiling), the unit layout and the encode options
    units/u-UUUUUUUU.index.arrow       the unit's index, an Arrow IPC file with one row per image (key,
                                       path, sha256, flip offset, bucket, sizes, crop box, part, offset);
                                       its schema metadata holds the unit's signature, token, parts with
                                       their sizes and hashes, the digest of its own columns, the card's
                                       hash and the unit's errors. Renamed in last: a unit is done exactly
                                       when its index exists.
    units/u-UUUUUUUU.pPPP.TOKEN.safetensors
                                       the unit's latents, up to `shard_size` samples per part, one tensor
                                       per kind and bucket: `mean/{W}x{H}`, `logvar/{W}x{H}`, (N, C, h, w)
    units/.u-UUUUUUUU.OWNER.staging/   one writer's files of the unit before they are renamed in (OWNER:
                                       `hHOSTpPID`, so clean-up can tell a live writer's from a dead one's)
    locks/u-UUUUUUUU.lock              held by the process encoding the unit (host, pid, token, heartbeat)
    runs/TOKEN/rank-RRRRR.json         what each rank of a run did; the last rank to finish finalises
    catalog.arrow                      one row per unit (rows, token, parts, index size and metadata
                                       hash, label), a generation, and a copy of the card: opening a
                                       cache reads this one file when it matches the listing of units/
    errors.jsonl, summary.json         what the last run could not encode, and what it did
    quarantine/                        units `vaekit cache verify --repair` moved aside, with the reason

Integrity (minor version 1; caches written before it have no checksums and still open): every part's
size, xxh3-128 hash and header hash are recorded in its unit's index when it is written, the index
records an xxh3-128 digest of its own columns and one of its own metadata, and the catalog records
each index's size and the hash of its metadata. What readers check on every open and read is cheap (sizes, headers, names, row
counts, the index digest when a unit is first mapped); hashing every part is `vaekit cache verify`'s
job (vaekit.cache.verify). The checks themselves live in vaekit.cache.reader.

Crash safety: a writer stages a unit's parts and index in its own staging folder and renames them
into place at the unit's end, the index last, after checking that its lock still holds its own record
(a paused writer whose lease was taken over discards its work). The index names the parts by TOKEN,
unique per run, so an index never points at another run's parts. Whatever a kill leaves (staging
folders, parts no index names, locks and temporaries of dead processes) belongs to one unit and is
removed by the next process that takes that unit; a live process's files are never removed. Resume
is a listing of index files plus a few cheap checks per unit: no per-image work.
"""

import contextlib
import json
import mmap
import os
import re
import shutil
import stat
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from vaekit.data.crops import make_buckets
from vaekit.data.sources import display_text
from vaekit.errors import VaekitError
from vaekit.io import TEMPORARY_NAME, abandoned, atomic_path, ensure_folder, owner_tag, storage_errors, umask_mode
from vaekit.model.architecture import fingerprint, vae_config
from vaekit.model.normalization import scale_shift


FORMAT = "vaekit-latents"

FORMAT_VERSION = 2

# Minor versions of format 2: 0 had no checksums; 1 records part sizes and hashes, index digests and
# the card's hash. A reader of minor 1 opens minor 0 (without those checks); the card says which.
FORMAT_MINOR = 1

NON_FINITE = "non-finite latent"

UNIT_INDEX = re.compile(r"^u-(\d{8})\.index\.arrow$")

UNIT_PART = re.compile(r"^u-(\d{8})\.p(\d{3,})\.([0-9a-f]+)\.safetensors$")

UNIT_STAGING = re.compile(r"^\.u-(\d{8})(?:\.(h[0-9a-f]{8}p\d+))?\.staging$")

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


def staging_dir(out, unit, owner=None):
    """The folder this process (or `owner`, an owner tag) writes a unit's files in before renaming them into units/."""
    return Path(out) / "units" / f".{unit_name(unit)}.{owner or owner_tag()}.staging"


def part_name(unit, number, token):
    """The file name of part `number` of a unit written by the run `token`."""
    return f"{unit_name(unit)}.p{number:03d}.{token}.safetensors"


def is_part_of(name, unit):
    """Whether `name` is a plain part file name of `unit` (no folder, no '..': it can only name a file in units/)."""
    match = UNIT_PART.match(name) if isinstance(name, str) else None
    return bool(match) and int(match.group(1)) == unit and "/" not in name and "\0" not in name


def lock_path(out, unit):
    """The lock file of a unit."""
    return Path(out) / "locks" / f"{unit_name(unit)}.lock"


def new_token():
    """A run token: unique per run, increasing with time (hex nanoseconds plus the pid)."""
    return f"{time.time_ns():016x}{os.getpid() & 0xffff:04x}"


# ----------------------------------------------------------------------------------------------
# Checksums (xxhash: non-cryptographic, ~7 GB/s on one core, so hashing keeps up with disks)

HASH_CHUNK = 8 << 20  # bytes read per step when hashing a file: bounded memory, large sequential reads

# The header of a safetensors file is its first 8 + N bytes (N little-endian in the first 8); more than
# this is no header vaekit wrote (and safetensors itself refuses headers over 100 MB).
MAX_HEADER = 100 << 20


def open_plain(path):
    """A read-only file descriptor of the regular file `path`, never following a symbolic link.

    A cache's files are plain files in its own folders; a link could point anywhere, so a read through
    one would leave the cache. Raises OSError (ELOOP for a link, or a VaekitError-worthy reason).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(f"{path} is not a regular file")
    return fd


def map_file(path, copy=False):
    """(memory map or b"" for an empty file, size) of a plain file in the cache: read-only, or with `copy`
    private copy-on-write (writable views for torch, nothing written back)."""
    fd = open_plain(path)
    try:
        size = os.fstat(fd).st_size
        return (mmap.mmap(fd, 0, access=mmap.ACCESS_COPY if copy else mmap.ACCESS_READ) if size else b""), size
    finally:
        os.close(fd)


def part_digest(path, progress=None):
    """{"bytes", "xxh3_128", "header_xxh3_64"} of a part file, read once front to back in bounded memory
    (`progress(bytes)` is called after each read).

    The header hash covers the first 8 + N bytes (the length and the JSON header); when N is larger
    than the file, only the first 8 bytes (so the hash cannot match what the writer recorded).
    """
    import xxhash  # light, but only writers and verify hash

    whole = xxhash.xxh3_128()
    fd = open_plain(path)
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = os.fstat(fd).st_size
        header = f.read(8)
        if len(header) == 8:
            length = struct.unpack("<Q", header)[0]
            if length <= min(size - 8, MAX_HEADER):
                header += f.read(length)
        whole.update(header)
        if progress is not None:
            progress(len(header))
        buffer = bytearray(HASH_CHUNK)
        view = memoryview(buffer)
        while count := f.readinto(buffer):
            whole.update(view[:count])
            if progress is not None:
                progress(count)
    return {"bytes": size, "xxh3_128": whole.hexdigest(), "header_xxh3_64": xxhash.xxh3_64(header).hexdigest()}


def index_digest(table):
    """xxh3-128 of an index table's columns, the same for the table in memory and memory-mapped from its file.

    Hashes each column's logical content (values, string offsets relative to the first, string bytes,
    which rows are null), never Arrow's padding, so a writer can record it in the file it writes.
    """
    import pyarrow as pa  # see read_unit_meta
    import xxhash

    digest = xxhash.xxh3_128(f"{table.num_rows}".encode())
    for name in table.column_names:
        column = table.column(name).combine_chunks()  # one chunk as written: no copy
        digest.update(f"\0{name}:{column.type}:{column.null_count}\0".encode())
        if column.null_count:
            digest.update(np.packbits(column.is_null().to_numpy(zero_copy_only=False)).tobytes())
        if pa.types.is_string(column.type) or pa.types.is_binary(column.type):
            _, offsets, data = column.buffers()
            offsets = np.frombuffer(offsets, np.int32)[column.offset:column.offset + len(column) + 1]
            digest.update((offsets - offsets[0]).astype("<i4").tobytes())
            if data is not None and len(offsets) and offsets[-1] > offsets[0]:
                digest.update(memoryview(data)[int(offsets[0]):int(offsets[-1])])
        elif pa.types.is_fixed_size_binary(column.type):
            width = column.type.byte_width
            data = column.buffers()[1]
            if data is not None:
                digest.update(memoryview(data)[column.offset * width:(column.offset + len(column)) * width])
        else:
            digest.update(np.ascontiguousarray(column.fill_null(0).to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()


def card_identity(card):
    """The part of a card that decides how its units read (cache key, channels, downsampling), as a dict."""
    vae = card.get("vae") if isinstance(card.get("vae"), dict) else {}
    return {"key": card.get("key"), "latent_channels": vae.get("latent_channels"),
            "downsample_factor": vae.get("downsample_factor")}


def card_hash(card):
    """xxh3-64 of `card_identity`: written into every unit index and the catalog, checked against card.json."""
    import xxhash  # see part_digest

    return xxhash.xxh3_64(json.dumps(card_identity(card), sort_keys=True).encode()).hexdigest()


def meta_digest(meta):
    """xxh3-64 of an index's metadata without this digest itself: lets an index check its own metadata."""
    import xxhash  # see part_digest

    body = {k: v for k, v in meta.items() if k != "meta_digest"}
    return xxhash.xxh3_64(json.dumps(body, sort_keys=True).encode()).hexdigest()


def meta_hash(raw):
    """xxh3-64 of an index's raw schema metadata (its signature, parts with hashes, and column digest)."""
    import xxhash  # see part_digest

    return xxhash.xxh3_64(raw).hexdigest()


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


CACHE_ENTRIES = ("card.json", "units", "locks", "runs", "catalog.arrow", "errors.jsonl", "summary.json",
                 "quarantine")


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
        fd, tmp = tempfile.mkstemp(prefix=f".card.json.{owner_tag()}.", suffix=".tmp", dir=out)
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


def write_card(out, card):
    """Replace out/card.json atomically (a repair restoring it, a run recording a longer shard list)."""
    path = Path(out) / "card.json"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")


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
        fd = open_plain(path)
        with os.fdopen(fd, "rb") as f:
            card = json.loads(f.read(1 << 24).decode("utf-8"))  # a card is a few KB; more is no card
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
    return scan_units(out).indices


class Listing:
    """One listing of units/: index paths, part names and staging folders by unit, and anything else."""

    def __init__(self):
        self.indices = {}  # unit -> index path
        self.parts = {}  # unit -> {part file name}
        self.staging = {}  # unit -> [staging folder name]
        self.other = []  # names that are no file of a unit


def scan_units(out):
    """A `Listing` of out/units (one directory read; no file is opened)."""
    listing = Listing()
    folder = Path(out) / "units"
    if not folder.is_dir():
        return listing
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if match := UNIT_INDEX.match(name):
                listing.indices[int(match.group(1))] = Path(entry.path)
            elif match := UNIT_PART.match(name):
                listing.parts.setdefault(int(match.group(1)), set()).add(name)
            elif match := UNIT_STAGING.match(name):
                listing.staging.setdefault(int(match.group(1)), []).append(name)
            else:
                listing.other.append(name)
    listing.indices = dict(sorted(listing.indices.items()))
    return listing


def arrow_errors():
    """The exceptions reading a damaged Arrow file raises (for `except`)."""
    import pyarrow as pa  # pyarrow is large; the CLI's parser never needs it

    return OSError, KeyError, TypeError, ValueError, pa.ArrowException


def schema_of(path):
    """(metadata dict, its raw bytes, index file size) of a unit index, reading only its schema; raises what
    pyarrow, the file system or JSON raise (see `arrow_errors`)."""
    import pyarrow as pa  # see arrow_errors

    mapped, size = map_file(path)
    raw = pa.ipc.open_file(pa.py_buffer(mapped)).schema.metadata[b"vaekit"]
    meta = json.loads(raw)
    if not isinstance(meta, dict):
        raise ValueError("no unit metadata")
    return meta, raw, size


def unit_schema(path):
    """`schema_of`, with one VaekitError naming the file when the index cannot be read."""
    try:
        return schema_of(path)
    except arrow_errors() as e:
        raise VaekitError(f"Cannot read the unit index {path} ({type(e).__name__}: {e}); run `vaekit cache verify "
                          f"{Path(path).parent.parent} --repair` to encode that unit again.") from None


def read_unit_meta(path):
    """The metadata of a unit index (signature, token, parts, rows, errors), reading only its schema."""
    return unit_schema(path)[0]


def open_index(path):
    """(Arrow table memory-mapped from a unit index (nothing read until a column is touched), file size);
    raises what `schema_of` raises."""
    import pyarrow as pa  # see arrow_errors

    mapped, size = map_file(path)
    return pa.ipc.open_file(pa.py_buffer(mapped)).read_all(), size


def index_table(rows, meta):
    """An Arrow table of index rows (dicts with INDEX_COLUMNS) with `meta` in its schema.

    The metadata gains the format's minor version and the digest of the table's own columns.
    """
    import pyarrow as pa  # see arrow_errors

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
    meta = {**meta, "minor": FORMAT_MINOR, "digest": index_digest(table)}
    meta["meta_digest"] = meta_digest(meta)
    return table.replace_schema_metadata({"vaekit": json.dumps(meta)})


def write_index(path, table):
    """Write an Arrow IPC file atomically (uncompressed, so readers memory-map it)."""
    import pyarrow as pa  # see arrow_errors

    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def part_files(out, unit):
    """The part files of a unit present on disk, as {file name: token}."""
    return {name: UNIT_PART.match(name).group(3) for name in scan_units(out).parts.get(unit, ())}


def current_parts(out, unit):
    """The parts named by the unit's index in place (which readers may be using), or none."""
    path = index_path(out, unit)
    try:
        parts = read_unit_meta(path).get("parts") if path.is_file() else []
    except VaekitError:  # an unreadable index is replaced; nothing of it is worth keeping
        return set()
    return {p for p in parts if is_part_of(p, unit)} if isinstance(parts, list) else set()


def clean_unit(out, unit, keep=(), keep_tokens=(), stale_after=None, listing=None):
    """Remove what killed writers left of a unit: their staging folders, and parts no index names.

    Call it holding the unit's lock. Kept: parts in `keep`, parts of runs in `keep_tokens` (a writer
    that lost this unit's lease but is still alive), parts the index in place names (read just before
    deleting), and the staging folders of writers that may be alive (`vaekit.io.abandoned`). `listing`
    (a `scan_units` taken earlier, so a run's claims list the folder once) may be stale: what appeared
    since is never removed, what vanished is skipped.
    """
    removed = 0
    folder = Path(out) / "units"
    listing = listing or scan_units(out)
    for name in listing.staging.get(unit, ()):
        path = folder / name
        if name == staging_dir(out, unit).name or abandoned(path, stale_after=stale_after):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed + remove_parts(out, unit, listing.parts.get(unit, ()), keep, keep_tokens)


def remove_parts(out, unit, names, keep=(), keep_tokens=()):
    """Delete the unit's parts `names`, except those in `keep`, of runs in `keep_tokens`, or named by the
    unit's index in place (read just before deleting); returns how many were deleted."""
    stray = {name for name in names if name not in keep and UNIT_PART.match(name).group(3) not in keep_tokens}
    stray -= current_parts(out, unit)  # never a part a published index names
    for name in stray:
        (Path(out) / "units" / name).unlink(missing_ok=True)
    return len(stray)


def invalidate_catalog(out):
    """Remove the catalog: a unit is about to change, so readers must list the units again."""
    (Path(out) / "catalog.arrow").unlink(missing_ok=True)


CATALOG_COLUMNS = ("unit", "rows", "token", "parts", "index_bytes", "index_meta", "label")


def catalog_row(unit, meta, raw, size):
    """A unit's catalog row from its index metadata (`unit_schema`'s three values)."""
    return {"unit": unit, "rows": int(meta["rows"]), "token": str(meta["token"]), "parts": len(meta["parts"]),
            "index_bytes": int(size), "index_meta": meta_hash(raw), "label": str(meta.get("label", ""))}


def catalog_table(rows, meta):
    """The catalog as an Arrow table: one row per unit (CATALOG_COLUMNS), `meta` in its schema."""
    import pyarrow as pa  # see arrow_errors

    kinds = {"unit": pa.int64(), "rows": pa.int64(), "token": pa.string(), "parts": pa.int32(),
             "index_bytes": pa.int64(), "index_meta": pa.string(), "label": pa.string()}
    table = pa.table({name: pa.array([row[name] for row in rows], kind) for name, kind in kinds.items()})
    return table.replace_schema_metadata({"vaekit": json.dumps({"format": FORMAT_VERSION, "minor": FORMAT_MINOR,
                                                                **meta})})


def write_catalog(out, rows, meta):
    """Write catalog.arrow from rows of `catalog_row` (the plain write; see reader.refresh_catalog for the
    protocol that keeps it from ever describing other units than those on disk)."""
    write_index(Path(out) / "catalog.arrow", catalog_table(rows, meta))


def read_catalog(out):
    """(rows as a dict of columns, metadata) of catalog.arrow, or None when absent or unreadable."""
    import pyarrow as pa  # see arrow_errors

    path = Path(out) / "catalog.arrow"
    try:
        mapped, _ = map_file(path)
        table = pa.ipc.open_file(pa.py_buffer(mapped)).read_all()
        meta = json.loads(table.schema.metadata[b"vaekit"]) if table.schema.metadata else {}
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None  # a reader falls back to listing the units
    return columns, meta if isinstance(meta, dict) else {}


@contextlib.contextmanager
def unit_files(out, unit):
    """Yield this process's fresh staging folder of a unit; afterwards it is removed whatever happened."""
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


def bucket_codes(buckets):
    """int32 codes of (W, H) pairs: W * 65536 + H, sortable and unique for sides below 65536."""
    buckets = np.asarray(buckets, dtype=np.int64).reshape(-1, 2)
    return (buckets[:, 0] * 65536 + buckets[:, 1]).astype(np.int64)
