"""The checked reader: every read of a latent cache (LatentDataset, LatentStream, stats, verify, encode's
resume, tools) goes through here, so every reader gives the same messages.

What is checked, and when (the costs are what keeps a 10^8-image cache fast to open and read):

- on open, O(units): the card's fields (types, finite numbers, a hash of the cache identity that every
  unit index repeats); the catalog against one listing of units/ (the same units, each with exactly
  the part files the catalog's token and part count name), else each unit's index schema is read
  instead (and the catalog rebuilt when the cache is writable and no encode holds a lock);
- when a unit is first mapped in a process, O(rows of that unit), once: the index's file size and
  metadata hash against the catalog, its row count, column types, non-null keys, part numbers and
  offsets in range, buckets that the VAE's downsampling divides, and the xxh3 digest of its columns
  (about 40 us per 4096 rows);
- when a part is first mapped, O(header): its size and header hash against the index, then the
  header itself before anything is allocated or viewed (a length within the file, dtypes the card's,
  shapes the card's channels and the bucket's latent size, offsets within the data and not overlapping);
- on every read, O(1): the tensor of the row's bucket exists and its offset is within it.

Part names must be plain file names of the unit in units/, and no file is opened through a symbolic
link, so no read leaves the cache folder. Everything wrong raises one VaekitError (`CacheDamage`)
naming the unit and the fix. A flipped bit inside latent data keeps every size and header intact:
finding it needs the part's hash, which `vaekit cache verify` computes (no read hashes latents).
"""

import bisect
import collections
import contextlib
import errno
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import torch

from vaekit.cache.config import STORE_MODES
from vaekit.cache.format import (FORMAT_MINOR, INDEX_COLUMNS, MAX_HEADER, arrow_errors, bucket_name, card_hash,
                                 catalog_row, catalog_table, index_digest, is_part_of, map_file, meta_digest, meta_hash,
                                 open_index, open_plain, part_digest, part_name, read_card, read_catalog,
                                 require_version, scan_units, schema_of, unit_name, write_index)
from vaekit.errors import VaekitError
from vaekit.faults import fault_point
from vaekit.io import owner_tag

# Storage dtypes as safetensors spells them, and as torch holds them.
STORAGE_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
PART_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
ITEM_BYTES = {"F16": 2, "BF16": 2, "F32": 4}

TENSOR_NAME = re.compile(r"^(mean|logvar)/(\d+)x(\d+)$")


class CacheDamage(VaekitError):
    """A unit (or the card or catalog) that fails a check; `unit` is its number, or None for the whole cache."""

    def __init__(self, root, unit, what, fix=None):
        self.root, self.unit, self.what = Path(root), unit, what
        where = f"unit {unit_name(unit)}" if unit is not None else "the cache"
        super().__init__(f"{root}: {where} is damaged: {what}; {fix or repair_hint(root)}.")


def repair_hint(root, encode_too=True):
    """What to do about a damaged unit."""
    text = f"run `vaekit cache verify {root} --repair` to move it aside and encode it again"
    return text + (" (re-running the `vaekit encode` command also redoes it)" if encode_too else "")


def is_number(value):
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# The card


class CardInfo:
    """The checked fields of a format-2 card that readers use.

    Raises VaekitError (naming card.json) for a card that is no format-2 card or whose fields are
    missing, of the wrong type or not finite.
    """

    def __init__(self, card, root):
        self.root, self.card = Path(root), card
        require_version(card, root)
        fix = (f"restore card.json (`vaekit cache verify {root} --repair` restores it from the catalog's copy), "
               "or re-create the cache with `vaekit encode --overwrite`")

        def bad(what):
            return CacheDamage(root, None, f"card.json {what}", fix)

        key = card.get("key")
        if not isinstance(key, dict):
            raise bad("has no cache key")
        self.key = key
        self.store, self.dtype, self.flip = key.get("store"), key.get("dtype"), key.get("flip")
        if self.store not in STORE_MODES:
            raise bad(f"names no storage mode ({self.store!r})")
        if self.dtype not in STORAGE_DTYPES:
            raise bad(f"names no storage dtype ({self.dtype!r})")
        if not isinstance(self.flip, bool):
            raise bad(f"has no flip setting ({self.flip!r})")
        scale, shift = key.get("scaling_factor"), key.get("shift_factor")
        if not is_number(scale) or scale == 0:
            raise bad(f"has no usable scaling_factor ({scale!r})")
        if shift is not None and not is_number(shift):
            raise bad(f"has no usable shift_factor ({shift!r})")
        self.scaling_factor, self.shift_factor = float(scale), float(shift or 0.0)
        vae = card.get("vae") if isinstance(card.get("vae"), dict) else {}
        self.channels, self.factor = vae.get("latent_channels"), vae.get("downsample_factor")
        for name, value in (("latent_channels", self.channels), ("downsample_factor", self.factor)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 16):
                raise bad(f"has an impossible vae.{name} ({value!r})")
        minor = card.get("minor", 0)
        self.minor = minor if isinstance(minor, int) and not isinstance(minor, bool) else 0
        self.part_dtype = STORAGE_DTYPES[self.dtype]
        self.hash = card_hash(card) if self.minor >= 1 else None


NOTED = set()  # caches already noted as written before checksums, by folder


def open_card(root):
    """The checked card of the cache at `root` (a CardInfo); notes once when it predates checksums."""
    info = CardInfo(read_card(root), root)
    if info.minor < FORMAT_MINOR and str(root) not in NOTED:
        NOTED.add(str(root))
        warnings.warn(f"vaekit: {root} was written before cache checksums (format 2.0): sizes and structure are "
                      "checked on reading, content is not; re-encode it (--overwrite) to add them.", stacklevel=3)
    return info


# ----------------------------------------------------------------------------------------------
# Unit indices


def check_meta(root, unit, meta, card):
    """Raise CacheDamage unless a unit index's metadata is whole: plain part names of this unit, a row count,
    part records matching the names, and (from minor 1) the card's hash."""
    parts = meta.get("parts")
    if not isinstance(parts, list) or not all(is_part_of(p, unit) for p in parts) or len(set(parts)) != len(parts):
        raise CacheDamage(root, unit, "its index names parts that are no plain part files of this unit in units/")
    if len(parts) > 32767:  # the index's `part` column is int16
        raise CacheDamage(root, unit, "its index names more parts than it can address")
    rows = meta.get("rows")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise CacheDamage(root, unit, f"its index has no row count ({rows!r})")
    if not isinstance(meta.get("token"), str):
        raise CacheDamage(root, unit, "its index has no run token")
    if "meta_digest" in meta and meta["meta_digest"] != meta_digest(meta):
        raise CacheDamage(root, unit, "its index's metadata does not match the digest written with it")
    records = meta.get("part_files")
    if records is not None:
        if (not isinstance(records, list) or len(records) != len(parts)
                or not all(isinstance(r, dict) and r.get("name") == p and isinstance(r.get("bytes"), int)
                           and isinstance(r.get("xxh3_128"), str) and isinstance(r.get("header_xxh3_64"), str)
                           for r, p in zip(records, parts))):
            raise CacheDamage(root, unit, "its index's part records do not match its parts")
    elif meta.get("minor", 0) != 0:
        raise CacheDamage(root, unit, "its index lacks the sizes and hashes of its parts")
    if meta.get("minor", 0) != 0 and "meta_digest" not in meta:
        raise CacheDamage(root, unit, "its index lacks the digest of its metadata")
    if card.hash is not None and meta.get("card") != card.hash:
        raise CacheDamage(root, unit, "its index was written for another card (card.json was edited or replaced)",
                          f"restore card.json (`vaekit cache verify {root} --repair` restores it from the "
                          "catalog's copy), or re-encode the unit")
    return meta


def unreadable(root, unit, path, error):
    """The CacheDamage of an index that cannot be opened (gone meanwhile, a link, not Arrow)."""
    if isinstance(error, FileNotFoundError):
        return CacheDamage(root, unit, "its index disappeared (a run replaced the unit meanwhile?)",
                           "open the cache again")
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return CacheDamage(root, unit, "its index is a symbolic link (a cache's files never are)")
    return CacheDamage(root, unit, f"its index cannot be read ({type(error).__name__}: {error})")


def read_meta(root, unit, path, card):
    """(checked metadata, raw bytes, size) of a unit index, reading only its schema."""
    try:
        meta, raw, size = schema_of(path)
    except arrow_errors() as e:
        raise unreadable(root, unit, path, e) from None
    return check_meta(root, unit, meta, card), raw, size


class UnitIndex:
    """A unit's index, mapped and checked: the Arrow table, its metadata and numpy views of its columns."""

    def __init__(self, root, unit, path, card, expected=None):
        self.root, self.unit = Path(root), unit
        try:
            table, size = open_index(path)
        except arrow_errors() as e:
            raise unreadable(root, unit, path, e) from None
        raw = (table.schema.metadata or {}).get(b"vaekit")
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise CacheDamage(root, unit, "its index holds no unit metadata")
        self.meta = check_meta(root, unit, meta, card)
        if expected is not None:
            fix = (f"open the cache again (a run may have replaced the unit meanwhile); if this persists, run "
                   f"`vaekit cache verify {root} --repair`")
            if (expected["token"], expected["rows"]) != (meta["token"], meta["rows"]):
                raise CacheDamage(root, unit, f"its index (token {meta['token']}, {meta['rows']} rows) is not the one "
                                  f"the cache was opened with (token {expected['token']}, {expected['rows']} rows)",
                                  fix)
            if expected["index_bytes"] != size or expected["index_meta"] != meta_hash(raw):
                raise CacheDamage(root, unit, f"its index ({size} bytes) differs from what the catalog recorded "
                                  f"({expected['index_bytes']} bytes, metadata hash {expected['index_meta']})", fix)
        self.table, self.parts = table, meta["parts"]
        self.records = {r["name"]: r for r in meta.get("part_files") or ()}
        self._check_columns(card)
        self.columns = Columns(table)

    def _check_columns(self, card):
        import pyarrow as pa  # loaded with the index already

        root, unit, table = self.root, self.unit, self.table
        kinds = {"key": pa.string(), "path": pa.string(), "sha256": pa.binary(32), "part": pa.int16()}
        for name in INDEX_COLUMNS:
            if name not in table.column_names or table.schema.field(name).type != kinds.get(name, pa.int32()):
                raise CacheDamage(root, unit, f"its index lacks the column {name!r} or holds another type there")
        if table.num_rows != self.meta["rows"]:
            raise CacheDamage(root, unit, f"its index has {table.num_rows} rows but says {self.meta['rows']}")
        digest = self.meta.get("digest")
        if digest is not None and digest != index_digest(table):
            raise CacheDamage(root, unit, "its index's rows do not match the digest written with them",
                              repair_hint(root))
        if table.column("key").null_count:
            raise CacheDamage(root, unit, "its index has a row without a key")
        if table.num_rows == 0:
            return
        ints = {name: table.column(name).to_numpy() for name in INDEX_COLUMNS[3:]}
        for name, values in ints.items():
            if table.column(name).null_count:
                raise CacheDamage(root, unit, f"its index has an empty {name!r}")
        if ints["part"].min() < 0 or ints["part"].max() >= len(self.parts):
            raise CacheDamage(root, unit, "its index points at a part it does not name")
        if ints["offset"].min() < 0 or ints["flip_offset"].min() < -1:
            raise CacheDamage(root, unit, "its index holds a negative latent offset")
        if not card.flip and ints["flip_offset"].max() >= 0:
            raise CacheDamage(root, unit, "its index points at mirrored latents in a cache encoded without --flip")
        width, height = ints["bucket_w"], ints["bucket_h"]
        if width.min() < 1 or height.min() < 1 or (card.factor and ((width % card.factor).any()
                                                                     or (height % card.factor).any())):
            raise CacheDamage(root, unit, "its index holds a bucket size the VAE's downsampling does not divide")


class Columns(dict):
    """A unit index's columns, converted on first use: zero-copy numpy views, StringColumn for text."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self._records = None

    def record(self, row):
        """The ITEM_FIELDS of one row as Python ints.

        The columns are copied once into one row-major (rows, 11) int32 array (45 KB per 1000 images):
        a random read then touches one cache line instead of a page in each of eleven columns.
        """
        if self._records is None:
            self._records = np.stack([self[name] for name in ITEM_FIELDS], axis=1).astype(np.int32)
        return self._records[row].tolist()

    def __missing__(self, name):
        column = self.table.column(name)
        value = self[name] = StringColumn(column) if name in ("key", "path") else column.to_numpy()
        return value


ITEM_FIELDS = ("part", "bucket_w", "bucket_h", "offset", "flip_offset", "original_w", "original_h",
               "crop_left", "crop_top", "crop_right", "crop_bottom")


class StringColumn:
    """Rows of an Arrow string column decoded from its buffers (a pyarrow scalar per row costs ~5 us)."""

    def __init__(self, column):
        array = column.combine_chunks()
        _, offsets, data = array.buffers()
        self.offsets = np.frombuffer(offsets, np.int32)[array.offset:array.offset + len(array) + 1]
        self.data = memoryview(data) if data is not None else memoryview(b"")
        self.nulls = array.is_null().to_numpy(zero_copy_only=False) if array.null_count else None

    def __getitem__(self, row):
        if self.nulls is not None and self.nulls[row]:
            return None
        return str(self.data[int(self.offsets[row]):int(self.offsets[row + 1])], "utf-8", "backslashreplace")


# ----------------------------------------------------------------------------------------------
# Parts


def parse_part_header(root, unit, name, head, size, card):
    """{tensor name: (dtype, shape, start, stop)} of a part's safetensors header, checked before any view.

    `head` holds (at least) the file's first 8 + N bytes. The data section starts at 8 + N; offsets are
    relative to it and must lie within the file, match their shape and dtype, and not overlap.
    """
    def bad(what):
        return CacheDamage(root, unit, f"part {name} {what}")

    if size < 8:
        raise bad(f"is truncated ({size} bytes)")
    length = struct.unpack("<Q", bytes(head[:8]))[0]
    if length > min(size - 8, MAX_HEADER):
        raise bad(f"has a header length ({length} bytes) beyond its {size}-byte file")
    try:
        header = json.loads(bytes(head[8:8 + length]).decode("utf-8"))
    except ValueError:
        raise bad("has an unreadable header") from None
    if not isinstance(header, dict):
        raise bad("has an unreadable header")
    data_size = size - 8 - length
    tensors, spans, counts = {}, [], 0
    for tensor, info in header.items():
        if tensor == "__metadata__":
            continue
        match = TENSOR_NAME.match(tensor) if isinstance(tensor, str) else None
        if not match or not isinstance(info, dict):
            raise bad(f"holds a tensor {tensor!r} that is no cache tensor")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype != card.part_dtype:
            raise bad(f"stores {tensor} as {dtype}, but the cache's dtype is {card.dtype}")
        if (not isinstance(shape, list) or len(shape) != 4
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in shape)):
            raise bad(f"gives {tensor} an impossible shape {shape!r}")
        width, height = int(match.group(2)), int(match.group(3))
        if card.channels is not None and shape[1] != card.channels:
            raise bad(f"gives {tensor} {shape[1]} channels, the VAE has {card.channels}")
        if card.factor and shape[2:] != [height // card.factor, width // card.factor]:
            raise bad(f"gives {tensor} a latent size {shape[2:]} that bucket {width}x{height} does not have")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"gives {tensor} offsets {offsets!r} outside its data ({data_size} bytes)")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEM_BYTES[dtype]:
            raise bad(f"gives {tensor} {offsets[1] - offsets[0]} bytes for a shape of {math.prod(shape)} values")
        tensors[tensor] = (dtype, shape, offsets[0], offsets[1])
        spans.append(offsets)
        if match.group(1) == "mean":
            counts += shape[0]
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise bad("has tensors whose data overlap")
    for tensor, (_, shape, _, _) in tensors.items():
        if tensor.startswith("logvar/"):
            mean = tensors.get("mean/" + tensor[7:])
            if card.store != "mean_logvar" or mean is None or mean[1] != shape:
                raise bad(f"holds {tensor} without a matching mean (store: {card.store})")
        elif card.store == "mean_logvar" and "logvar/" + tensor[5:] not in tensors:
            raise bad(f"lacks the logvar of {tensor}")
    metadata = header.get("__metadata__")
    count = metadata.get("count") if isinstance(metadata, dict) else None
    if count is not None and count != str(counts):
        raise bad(f"holds {counts} samples but says {count}")
    return tensors, 8 + length


def check_record(root, unit, name, size, head_bytes, record):
    """Raise unless a part's size and header hash are those its index recorded."""
    import xxhash  # light; only minor-1 caches record hashes

    if record is None:
        return
    if size != record["bytes"]:
        raise CacheDamage(root, unit, f"part {name} has {size} bytes, its index recorded {record['bytes']} "
                          "(cut short, or replaced)")
    if xxhash.xxh3_64(head_bytes).hexdigest() != record["header_xxh3_64"]:
        raise CacheDamage(root, unit, f"part {name} has another header than the one written (edited?)")


def part_error(root, unit, name, error):
    """The CacheDamage of a part that cannot be opened (missing, a link, a folder, unreadable)."""
    if isinstance(error, FileNotFoundError):
        return CacheDamage(root, unit, f"part {name} is missing")
    if error.errno == errno.ELOOP:
        return CacheDamage(root, unit, f"part {name} is a symbolic link (a cache's files never are)")
    return CacheDamage(root, unit, f"part {name} cannot be read ({error.strerror or error})")


def open_part_file(root, unit, name):
    """(copy-on-write memory map, size) of a part named by a unit's index, or CacheDamage."""
    try:
        return map_file(Path(root) / "units" / name, copy=True)
    except OSError as e:
        raise part_error(root, unit, name, e) from None


def map_part(root, unit, name, card, record=None, verify=False):
    """{tensor name: tensor} of a part as zero-copy views of a memory map, after every check of its header.

    With `verify` the whole part is hashed once here and compared with its index's record (it reads
    every byte: for small caches, or a first pass over a copied cache).

    Written by hand: safetensors' `safe_open` maps the file too but builds every slice through a
    Python call costing about 15 us, the bulk of a random read; a numpy view indexed directly costs a
    microsecond. The format is an 8-byte header length, a JSON header, then the data.
    """
    mapped, size = open_part_file(root, unit, name)
    if size < 8:
        raise CacheDamage(root, unit, f"part {name} is truncated ({size} bytes)")
    length = struct.unpack("<Q", mapped[:8])[0]
    head = mapped[:8 + min(length, size - 8, MAX_HEADER)]
    check_record(root, unit, name, size, head, record)
    specs, start = parse_part_header(root, unit, name, head, size, card)
    if verify and record is not None:
        import xxhash  # see check_record

        if xxhash.xxh3_128(mapped).hexdigest() != record["xxh3_128"]:
            raise CacheDamage(root, unit, f"part {name} does not match its hash (its latent data changed)",
                              repair_hint(root, encode_too=False))
    data = np.frombuffer(mapped, dtype=np.uint8)  # copy-on-write map: writable views, nothing copied
    tensors = {}
    for tensor, (dtype, shape, begin, end) in specs.items():
        raw = torch.from_numpy(data[start + begin:start + end])
        tensors[tensor] = raw.view(PART_DTYPES[dtype]).view(shape)
    return tensors


class LRU(collections.OrderedDict):
    """An OrderedDict that keeps the `size` most recently used entries (file handles, mapped tables)."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        """The value for `key`, made (and the oldest entry dropped) if absent."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


def mapped_file_budget():
    """How many files each of the reader's two caches (unit indices, parts) may keep mapped.

    Every mapping holds a file descriptor. The soft limit is raised to the hard one (what a user could
    do with `ulimit -n`), and a quarter of it goes to each cache, leaving the rest to the program
    (DataLoader pipes, checkpoints). Random reads over more units than this reopen files (~0.3 ms).
    """
    import resource  # Unix only, like the rest of the cache's file handling

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(16, min(8192, (soft - 256) // 4))


class PartReader:
    """Checked parts memory-mapped on first use, at most `size` mapped at once (each hashed first with `verify`)."""

    def __init__(self, root, card, size=None, verify=False):
        self.root, self.card, self.size, self.verify = Path(root), card, size or mapped_file_budget(), verify
        self._parts = LRU(self.size)

    def __getstate__(self):
        return {**self.__dict__, "_parts": LRU(self.size)}

    def tensors(self, unit, part, record=None):
        """The mapped tensors of a part (file name in units/) of `unit`."""
        return self._parts.get_or(part, lambda: map_part(self.root, unit, part, self.card, record, self.verify))

    def row(self, unit, part, group, offset, kind="mean", record=None):
        """One sample's stored tensor (C, h, w) in the storage dtype (a view of the map)."""
        tensor = self.tensors(unit, part, record).get(f"{kind}/{group}")
        if tensor is None:
            raise CacheDamage(self.root, unit, f"part {part} has no {kind}/{group} tensor, which its index points at")
        if not 0 <= offset < tensor.shape[0]:
            raise CacheDamage(self.root, unit, f"its index points at row {offset} of {kind}/{group} in part {part}, "
                              f"which holds {tensor.shape[0]}")
        return tensor[offset]


def read_part_head(root, unit, name):
    """(the first 8 + N bytes of a part, its size): what the header checks need, without mapping the data."""
    try:
        fd = open_plain(Path(root) / "units" / name)
    except OSError as e:
        raise part_error(root, unit, name, e) from None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) == 8:
            length = struct.unpack("<Q", head)[0]
            head += os.pread(fd, min(length, max(size - 8, 0), MAX_HEADER), 8)
        return head, size
    finally:
        os.close(fd)


def check_unit(root, unit, path, card, row=None, hash_parts=False, progress=None):
    """Raise CacheDamage unless a unit is whole; returns its checked UnitIndex.

    Checked: the index (as on first map, digest included, and against the catalog `row` when given),
    every part's size, header hash and header, and that each row's offsets lie within its part's
    tensor and the rows account for every stored sample. With `hash_parts` each part is also read
    whole and its xxh3-128 compared with the index's record (`progress(bytes)` is called as it goes).
    The cheap form (no hashing of parts) reads the index and each part's header: what an encode
    re-run pays per unit.
    """
    index = UnitIndex(root, unit, path, card, row)
    columns = index.columns
    part_of = columns["part"]
    stored = 0
    for number, name in enumerate(index.parts):
        record = index.records.get(name)
        if hash_parts:
            try:
                digest = part_digest(Path(root) / "units" / name, progress)
            except OSError as e:
                raise part_error(root, unit, name, e) from None
            if record is not None and digest["xxh3_128"] != record["xxh3_128"]:
                if digest["bytes"] == record["bytes"] and digest["header_xxh3_64"] == record["header_xxh3_64"]:
                    raise CacheDamage(root, unit, f"part {name} does not match its hash (its latent data changed)",
                                      repair_hint(root, encode_too=False))
        head, size = read_part_head(root, unit, name)
        check_record(root, unit, name, size, head, record)
        specs, _ = parse_part_header(root, unit, name, head, size, card)
        mine = np.flatnonzero(part_of == number)
        codes = columns["bucket_w"][mine].astype(np.int64) * 65536 + columns["bucket_h"][mine]
        for code in np.unique(codes):
            group = bucket_name(int(code) // 65536, int(code) % 65536)
            spec = specs.get(f"mean/{group}")
            if spec is None:
                raise CacheDamage(root, unit, f"part {name} has no mean/{group} tensor, which its index points at")
            rows = mine[codes == code]
            if max(columns["offset"][rows].max(), columns["flip_offset"][rows].max()) >= spec[1][0]:
                raise CacheDamage(root, unit, f"its index points past the {spec[1][0]} rows of mean/{group} in {name}")
        stored += sum(spec[1][0] for tensor, spec in specs.items() if tensor.startswith("mean/"))
    if len(part_of) and stored != len(part_of) + int((columns["flip_offset"] >= 0).sum()):
        raise CacheDamage(root, unit, f"its parts hold {stored} samples, its index accounts for "
                          f"{len(part_of) + int((columns['flip_offset'] >= 0).sum())}")
    return index


# ----------------------------------------------------------------------------------------------
# The whole cache: catalog or listing


def catalog_rows(catalog, listing, card):
    """{unit: catalog row} when the catalog describes exactly the units on disk, else None.

    Cheap: the listing already holds every index and part name. A unit matches when the catalog's token
    and part count name exactly the part files present for it; a run that replaced a unit after the
    catalog was written left parts of another token.
    """
    if catalog is None:
        return None
    columns, meta = catalog
    if not all(name in columns for name in ("unit", "rows", "token", "parts", "index_bytes", "index_meta")):
        return None  # a catalog of minor 0: rebuilt by the next writer or reader that may
    if card.hash is not None and meta.get("card_hash") != card.hash:
        return None
    units = columns["unit"]
    if len(units) != len(listing.indices) or set(units) != set(listing.indices):
        return None
    rows = {}
    for i, unit in enumerate(units):
        row = {name: values[i] for name, values in columns.items()}
        if not isinstance(row["token"], str) or not isinstance(row["parts"], int) or not 0 <= row["parts"] < 32768:
            return None
        if not isinstance(row["rows"], int) or row["rows"] < 0:
            return None
        expected = {part_name(unit, p, row["token"]) for p in range(row["parts"])}
        if expected != listing.parts.get(unit, set()):
            return None
        rows[unit] = row
    return rows


def survey_units(root, listing, card):
    """{unit: catalog row} read from every unit index's schema (O(units) small reads); CacheDamage on the first bad one."""
    rows = {}
    for unit, path in listing.indices.items():
        meta, raw, size = read_meta(root, unit, path, card)
        rows[unit] = catalog_row(unit, meta, raw, size)
    return rows


def may_write_catalog(root):
    """Whether a reader may rebuild the catalog: the folder is writable and no encode holds a unit lock."""
    locks = Path(root) / "locks"
    try:
        busy = locks.is_dir() and any(True for _ in os.scandir(locks))
    except OSError:
        busy = True
    return not busy and os.access(root, os.W_OK)


def refresh_catalog(root, card=None, attempts=3):
    """Write catalog.arrow describing the units on disk now; returns whether a current catalog is in place.

    The catalog is computed from one listing and every index's schema. A catalog in place that still
    matches the listing is kept (never replaced by one computed earlier); after renaming ours in, the
    listing is taken again, and if a unit changed meanwhile ours is withdrawn (removed only if it is
    still ours), so a catalog never lingers describing other units than those on disk. Writers of
    units remove the catalog before and after they change a unit, which closes the other order.
    """
    root = Path(root)
    info = card if isinstance(card, CardInfo) else CardInfo(read_card(root), root)
    for _ in range(attempts):
        listing = scan_units(root)
        try:
            rows = survey_units(root, listing, info)
        except CacheDamage as e:
            if (root / "units" / f"{unit_name(e.unit)}.index.arrow").exists():
                return False  # a damaged unit: readers list units and report it; verify repairs it
            continue  # a unit was replaced while we read: start again
        fault_point("catalog-computed")
        existing = read_catalog(root)
        if catalog_rows(existing, scan_units(root), info) is not None:
            return True  # the catalog in place is current: never replaced with one computed earlier
        generation = int((existing[1] if existing else {}).get("generation", 0) or 0) + 1
        writer = f"{owner_tag()}.{os.urandom(4).hex()}"
        meta = {"generation": generation, "writer": writer, "card_hash": info.hash, "card": info.card}
        write_index(root / "catalog.arrow", catalog_table([rows[u] for u in sorted(rows)], meta))
        if catalog_rows(read_catalog(root), scan_units(root), info) is not None:
            return True
        withdraw_catalog(root, writer)
    return False


def withdraw_catalog(root, writer):
    """Remove catalog.arrow if it is still the one `writer` wrote (another may have replaced it meanwhile)."""
    path = Path(root) / "catalog.arrow"
    aside = path.with_name(f".catalog.arrow.{owner_tag()}.withdrawn.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    found = read_catalog_file(aside)
    if found is not None and found.get("writer") != writer:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # someone else's: put it back unless a newer one is in place already
    aside.unlink(missing_ok=True)


def read_catalog_file(path):
    """The metadata of a catalog file at `path` (for `withdraw_catalog`), or None."""
    import pyarrow as pa  # see format.unit_schema

    try:
        mapped, _ = map_file(path)
        return json.loads(pa.ipc.open_file(pa.py_buffer(mapped)).schema.metadata[b"vaekit"])
    except (OSError, KeyError, TypeError, ValueError, pa.ArrowException):
        return None


class CacheUnits:
    """The units of a cache: row counts up front, each unit's index mapped and checked on first use."""

    def __init__(self, cache_dir, card=None, rebuild=True):
        self.root = Path(cache_dir)
        self.card = card or open_card(self.root)
        listing = scan_units(self.root)
        catalog = read_catalog(self.root)
        rows = catalog_rows(catalog, listing, self.card)
        if rows is None and catalog is not None:
            # Writers remove the catalog before a unit changes, so a unit it lists can only lose its index
            # by damage (a deleted or unsynced file): never serve the rest silently.
            lost = sorted(u for u in catalog[0].get("unit", []) if isinstance(u, int) and u not in listing.indices)
            if lost:
                raise CacheDamage(self.root, lost[0], "its index is missing, though the catalog lists it"
                                  + (f" (and {len(lost) - 1} more units)" if len(lost) > 1 else ""))
        if rows is None:  # no catalog, an older one, or one that disagrees with units/: read the units
            rows = survey_units(self.root, listing, self.card)
            if rebuild and rows and may_write_catalog(self.root):
                with contextlib.suppress(VaekitError, OSError):
                    refresh_catalog(self.root, self.card)
        self.units = np.array(sorted(rows), dtype=np.int64)
        self.rows = [rows[int(u)] for u in self.units]
        self.paths = [listing.indices[int(u)] for u in self.units]
        self.starts = np.concatenate([[0], np.cumsum([r["rows"] for r in self.rows], dtype=np.int64)])
        self._starts = self.starts.tolist()  # bisect on a list beats a numpy call per item
        self.budget = min(mapped_file_budget(), 1024)  # also bounds the row-major copies: 180 KB per 4096 rows
        self._open = LRU(self.budget)

    def __len__(self):
        return int(self.starts[-1])

    def __getstate__(self):  # mapped files stay in their process; workers map their own
        return {**self.__dict__, "_open": LRU(self.budget)}

    def locate(self, position):
        """(unit slot, row) of a global image position."""
        slot = bisect.bisect_right(self._starts, position) - 1
        return slot, position - self._starts[slot]

    def index(self, slot):
        """The checked UnitIndex of the unit in `slot`."""
        return self._open.get_or(slot, lambda: UnitIndex(self.root, int(self.units[slot]), self.paths[slot],
                                                         self.card, self.rows[slot]))

    def unit(self, slot):
        """(numpy columns, Arrow table, metadata) of the unit in `slot`; columns are zero-copy views."""
        index = self.index(slot)
        return index.columns, index.table, index.meta


# ----------------------------------------------------------------------------------------------
# Small tools: every sample as a dict


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
    units = CacheUnits(cache_dir, rebuild=False)
    entries = []
    for slot in range(len(units.units)):
        _, table, meta = units.unit(slot)
        entries.extend(entry_dicts(int(units.units[slot]), table, meta, flips))
    return entries
