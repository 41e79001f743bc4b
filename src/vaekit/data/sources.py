"""Image sources: `open_source(spec)` gives an indexed, deterministic list of images.

A `Source` is a sequence of `Record`s (key, local path or None, a `read_bytes(max_bytes)` callable) over an
image folder, a Hugging Face `datasets` data set, WebDataset tar shards or `builtin:photos`.
`source.subset(range(rank, len(source), world))` splits it across processes.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import os
import re
import tarfile
import typing
from collections.abc import Sequence
from pathlib import Path

from vaekit.data.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from vaekit.data.decode import OPEN_ERRORS, ImageError, check_size, decode_image, file_kind, read_image_file
from vaekit.data.shards import RENAMED_KEY, expand_shards, image_fields, renamed_key, shard_labels, tar_samples
from vaekit.errors import VaekitError, describe_exception


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a source: a unique key, its local file (None inside tars and datasets), a byte loader."""

    key: str
    path: str | None
    read_bytes: typing.Callable[..., bytes]  # read_bytes(max_bytes=None): refuses a file over max_bytes unread

    def decode(self, background=(255, 255, 255), max_pixels=DEFAULT_MAX_PIXELS, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        """Read and decode this image to RGB; errors name the key or path."""
        where = self.path or self.key
        try:
            data = self.read_bytes(max_bytes=max_bytes)
        except ImageError as e:
            raise ImageError(e.reason, where, e.detail) from None
        except FileNotFoundError:
            raise ImageError("file not found", where) from None
        except OSError as e:
            raise ImageError("unreadable file", where, describe_exception(e)) from None
        try:
            return decode_image(data, background=background, max_pixels=max_pixels, max_bytes=max_bytes)
        except ImageError as e:
            raise ImageError(e.reason, where, e.detail) from None


class Source(Sequence):
    """An ordered, indexable list of images (`Record`s) with unique, deterministic keys.

    Every process that opens the same spec sees the same order, so `subset` splits it the same way
    in DataLoader workers and across ranks. A Source pickles (it holds paths and offsets, no handles).
    `skipped` lists what the source left out when it was opened ({"key", "path", "reason"}: special
    files, symlink loops, unreadable files, tar members that give no image, repeated keys), for the
    run to report with its own skipped images; `renamed` the images stored under another key than
    their own ({"key", "path", "reason", "detail"}: a key an earlier shard already has).
    """

    def __init__(self, description, keys, paths, reader, positions=None, skipped=(), renamed=()):
        self.description = description
        self._keys = keys
        self._paths = paths
        self._reader = reader  # picklable object with read(position, max_bytes) -> bytes
        self._positions = range(len(keys)) if positions is None else positions
        self.skipped = list(skipped)
        self.renamed = list(renamed)

    def __len__(self):
        return len(self._positions)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        position = self._positions[index]
        return Record(self._keys[position], self._paths[position], functools.partial(self._reader.read, position))

    def keys(self):
        """All keys in order."""
        return [self._keys[p] for p in self._positions]

    def subset(self, indices):
        """A Source over the given indices of this one (for holdout splits and per-rank shards)."""
        positions = [self._positions[i] for i in indices]
        return Source(self.description, self._keys, self._paths, self._reader, positions, self.skipped, self.renamed)

    def __repr__(self):
        return f"<Source {self.description}: {len(self)} images>"


class _FileReader:
    """Reads whole local files by position, never blocking on a file that is not a regular one."""

    def __init__(self, paths):
        self.paths = paths

    def read(self, position, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        return read_image_file(self.paths[position], max_bytes)


class _TarReader:
    """Reads tar members by their data offset, so any sample of any shard is one seek away."""

    def __init__(self, entries):
        self.entries = entries  # [(tar path, data offset, size)]

    def read(self, position, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        path, offset, size = self.entries[position]
        check_size(size, max_bytes)  # the member's declared size: an oversized one is never read
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ImageError("truncated image", None, f"tar shard {path} ends inside this member")
        return data


class _HFReader:
    """Reads an image cell of a Hugging Face dataset: {'bytes', 'path'} dicts, raw bytes or a file path."""

    def __init__(self, dataset, column, base_dir):
        self.dataset = dataset
        self.column = column
        self.base_dir = base_dir

    def read(self, position, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        value = self.dataset[position][self.column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            check_size(len(value), max_bytes)  # already in memory (Arrow), but over the limit all the same
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value)
            if not path.is_absolute() and self.base_dir is not None:
                path = Path(self.base_dir) / path
            return read_image_file(path, max_bytes)
        raise ImageError("empty image field", None, f"column '{self.column}' holds {type(value).__name__}")


def display_text(text):
    """`text` with any undecodable bytes of a file name (lone surrogates) written as \\xNN escapes.

    A name that is not valid UTF-8 keeps its bytes in the path used to read the file; its key, which
    is written into cache indices, lists, CSV and HTML, is this valid, readable spelling of it.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_images(root, skipped=None):
    """Image files under `root`, recursively, sorted by relative path; hidden files and folders skipped.

    Only regular, readable files are listed. Anything else with an image extension (a FIFO, a
    socket, a device, a folder, a broken link, a symlink loop, an unreadable file) is appended to
    `skipped` as {"key", "path", "reason"} and left out, so no reader ever blocks on it.
    """
    root = Path(root)
    if not root.is_dir():
        raise VaekitError(f"Image folder not found: {root}. Pass an existing folder of images.")
    found = []
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop; each real folder is listed once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = Path(dirpath) / name
            reason = unusable_file(path)
            if reason is None:
                found.append(path)
            elif skipped is not None:
                skipped.append({"key": display_text(path.relative_to(root).as_posix()), "path": str(path),
                                "reason": reason})
    if not found:
        raise VaekitError(
            f"No images found in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}; hidden files "
            "skipped). Put images there or pass another folder."
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def unusable_file(path):
    """Why `path` cannot be read as an image file (symlink loop, not a regular file, ...), or None."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks, as reading will
    except FileNotFoundError:
        return "broken symlink"
    except OSError as e:
        return OPEN_ERRORS.get(e.errno, "unreadable file")
    kind = file_kind(mode)
    if kind != "regular file":
        return f"not a regular file ({kind})"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


# The colour photographs that ship inside scikit-image's wheel (no download needed), by their
# skimage.data names. Left out: greyscale and synthetic images, `cat` (chelsea mirrored) and
# everything skimage.data fetches over the network.
BUILTIN_PHOTOS = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}


def open_source(spec, source="auto", split=None, image_column=None, key_column=None):
    """Open an image source by spec; `source` is auto, folder, hf, webdataset or builtin.

    Specs: a folder of images; `builtin:photos`; a `save_to_disk` folder, a folder or files that
    `datasets.load_dataset` reads, or a hub name (`hf:` prefix forces it); a .tar shard, a folder of
    .tar shards, or a brace pattern like `shards-{000..009}.tar`. `split`, `image_column` and
    `key_column` apply to Hugging Face data sets; `image_column` names the WebDataset field (`jpg`).
    """
    spec = str(spec)
    kind = _detect_kind(spec) if source == "auto" else source
    if kind == "folder":
        return _open_folder(spec)
    if kind == "builtin":
        return _open_builtin(spec)
    if kind == "hf":
        return _open_hf(spec.removeprefix("hf:"), split, image_column, key_column)
    if kind == "webdataset":
        return _open_webdataset(spec, image_column)
    raise VaekitError(f"Unknown source type '{source}'. Use auto, folder, hf, webdataset or builtin.")


def _detect_kind(spec):
    """Guess the source type of a spec."""
    if spec.startswith("builtin:"):
        return "builtin"
    if spec.startswith("hf:"):
        return "hf"
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() == ".tar":
            return "webdataset"
        if path.suffix.lower() in (".parquet", ".arrow", ".csv", ".json", ".jsonl"):
            return "hf"
        raise VaekitError(f"Cannot tell what kind of data {spec} is. Pass a folder, a .tar shard or a data set.")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        entries = [e for e in path.iterdir() if not e.name.startswith(".")]
        if any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in entries):
            return "folder"
        if any(e.suffix.lower() == ".tar" for e in entries):
            return "webdataset"
        # Data files of a hub-style repository sit at the top or one folder down (data/train-*.parquet).
        if any(e.suffix.lower() in (".parquet", ".arrow") for e in [*entries, *path.glob("*/*")]):
            return "hf"
        return "folder"
    if ("{" in spec or "::" in spec) and ".tar" in spec:
        return "webdataset"
    # OWNER/NAME is a hub name unless OWNER is a local folder: then it is most likely a mistyped path.
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith((".", "/")) and not path.parent.exists():
        return "hf"
    raise VaekitError(
        f"Data not found: {spec}. Pass an image folder, a Hugging Face data set (saved with save_to_disk, "
        "or a hub name, forced with an hf: prefix), WebDataset shards (a .tar, a folder of them, or a pattern "
        "like shards-{000..009}.tar) or builtin:photos."
    )


def _open_folder(spec):
    root = Path(spec)
    skipped, keys, paths, seen = [], [], [], set()
    for file in list_images(root, skipped):
        key = display_text(file.relative_to(root).as_posix())
        if key in seen:
            # Only a name that is not UTF-8 (written with \xNN escapes) beside one literally named with
            # those escapes can repeat a key; as in a shard, the first file keeps it.
            skipped.append({"key": key, "path": str(file), "reason": "duplicate key"})
            continue
        seen.add(key)
        keys.append(key)
        paths.append(os.path.realpath(file))
    return Source(f"image folder {display_text(str(root))}", keys, paths, _FileReader(paths), skipped=skipped)


def _open_builtin(spec):
    name = spec.removeprefix("builtin:")
    if name != "photos":
        raise VaekitError(f"Unknown built-in data '{spec}'. The only one is builtin:photos.")
    found = importlib.util.find_spec("skimage")  # its data folder, without importing the (slow) package
    if found is None or not found.submodule_search_locations:
        raise VaekitError("builtin:photos needs scikit-image: pip install scikit-image.")
    data_dir = Path(list(found.submodule_search_locations)[0]) / "data"
    keys, paths = [], []
    for key, filename in BUILTIN_PHOTOS.items():
        if (data_dir / filename).is_file():
            keys.append(f"skimage/{key}")
            paths.append(str(data_dir / filename))
    if not paths:
        raise VaekitError(f"No photos found in {data_dir}; reinstall scikit-image (pip install -U scikit-image).")
    return Source("builtin:photos (scikit-image)", keys, paths, _FileReader(paths))


def _open_webdataset(spec, field=None):
    """Index tar shards once: group members into samples as a stream would, keep each image member's offset.

    Every member is accounted for as in a streamed read (`vaekit.data.shards.tar_samples`): what
    gives no image is listed in `skipped`. A key an earlier shard already has is renamed KEY@SHARD
    and listed in `renamed`: the same rule `vaekit encode` applies to streamed shards.
    """
    urls = expand_shards(spec)  # one shard-list rule for indexed and streamed
    wanted = image_fields(field)
    keys, entries, skipped, renamed, first = [], [], [], [], {}
    for url, label in zip(urls, shard_labels(urls)):
        try:
            # 'r:' = uncompressed only: offsets into a .tar.gz would need decompressing everything before them.
            with tarfile.open(url, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, OSError) as e:
            raise VaekitError(
                f"Cannot index {url} as an uncompressed tar ({e}). WebDataset shards must be plain .tar files "
                "(decompress .tar.gz first)."
            ) from None
        # The byte limit is checked when a member is read, with the reader's limit.
        for key, found in tar_samples(members, wanted, None, lambda member: (member.offset_data, member.size)):
            key = display_text(key)
            if isinstance(found, ImageError):
                skipped.append({"key": key, "path": url, "reason": found.reason})
                continue
            if key in first:
                renamed.append({"key": key, "path": url, "reason": RENAMED_KEY,
                                "detail": f"stored as {renamed_key(key, label)}: the earlier shard {first[key]} has "
                                          f"the key {key}"})
                key = renamed_key(key, label)
                if key in first:  # only for a shard name without a dot
                    skipped.append({"key": key, "path": url, "reason": "duplicate key"})
                    continue
            first[key] = label
            keys.append(key)
            entries.append((url, *found))
    if not keys:
        raise VaekitError(
            f"No images found in the shards {spec} (looked for members ending in {', '.join(wanted)}). "
            "Name the image field with image_column=EXT."
        )
    return Source(f"webdataset {spec} ({len(urls)} shards)", keys, [None] * len(keys), _TarReader(entries),
                  skipped=skipped, renamed=renamed)


def _open_hf(spec, split, image_column, key_column):
    """A Hugging Face data set: saved with save_to_disk, loadable by load_dataset, or on the hub."""
    import datasets  # slow to import; only data sets need it

    path = Path(spec)
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            data = datasets.load_from_disk(str(path))
        elif path.is_file():  # a single data file goes through its format's builder, never the hub
            builder = {".jsonl": "json"}.get(path.suffix.lower(), path.suffix.lower().lstrip("."))
            data = datasets.load_dataset(builder, data_files=str(path))
        else:
            data = datasets.load_dataset(spec)
    except Exception as e:  # the library raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        if path.exists():
            raise VaekitError(f"Cannot load Hugging Face data set {spec}: {type(e).__name__}: {e}") from None
        raise VaekitError(
            f"Cannot load '{spec}': it is no local file or folder, and loading it as a Hugging Face hub data set "
            f"failed ({type(e).__name__}: {e}). On an offline machine, run "
            "`datasets.load_dataset(NAME).save_to_disk(DIR)` where there is a network and pass DIR."
        ) from None
    if isinstance(data, (datasets.DatasetDict, dict)):
        names = list(data)
        if split is None:
            split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
            if split is None:
                raise VaekitError(f"Data set {spec} has splits {', '.join(names)}; choose one with split=NAME.")
        if split not in names:
            raise VaekitError(f"Data set {spec} has no split '{split}'; it has {', '.join(names)}.")
        data = data[split]
    elif not isinstance(data, datasets.Dataset):
        raise VaekitError(f"{spec} is a streaming data set; save it to disk first (save_to_disk) for indexed access.")
    split = split or (str(data.split) if data.split is not None else "train")
    column = image_column or _find_image_column(data, spec)
    if column not in data.column_names:
        raise VaekitError(f"Data set {spec} has no column '{column}'; columns: {', '.join(data.column_names)}.")
    if isinstance(data.features[column], datasets.Image):
        data = data.cast_column(column, datasets.Image(decode=False))  # raw bytes: we decode, robustly
    if key_column:
        if key_column not in data.column_names:
            columns = ", ".join(data.column_names)
            raise VaekitError(f"Data set {spec} has no key column '{key_column}'; columns: {columns}.")
        keys = [str(k) for k in data[key_column]]
        if len(set(keys)) != len(keys):
            duplicate = next(k for k in keys if keys.count(k) > 1)
            raise VaekitError(f"Key column '{key_column}' of {spec} repeats '{duplicate}'; keys must be unique.")
    else:
        keys = [f"{split}/{i}" for i in range(len(data))]
    data = data.select_columns([column])
    base_dir = str(path) if path.is_dir() else None
    reader = _HFReader(data, column, base_dir)
    return Source(f"Hugging Face data set {spec} [{split}]", keys, [None] * len(keys), reader)


def _find_image_column(data, spec):
    """The first column of Image type, else a conventionally named bytes or path column."""
    import datasets  # only Hugging Face sources need it (see _open_hf)

    for name, feature in data.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img", "jpg", "jpeg", "png", "webp"):
        if name in data.column_names:
            return name
    raise VaekitError(
        f"No image column found in {spec} (columns: {', '.join(data.column_names)}). Name it with image_column=NAME."
    )


def split_holdout(source, holdout, seed=0):
    """Split a Source into (train, held out) deterministically by hashing keys with the seed.

    `holdout` < 1 is a fraction (at least one image when > 0), >= 1 a count. Hashing keys, not
    positions, keeps an image on the same side when others are added or removed.
    """
    total = len(source)
    if holdout < 0:
        raise VaekitError(f"holdout must be a count or a fraction >= 0, got {holdout}.")
    if holdout >= 1:
        if holdout != int(holdout):
            raise VaekitError(f"holdout {holdout} is above 1 so it counts images; give a whole number.")
        count = int(holdout)
    else:
        count = max(1, round(holdout * total)) if holdout > 0 else 0
    if count and count >= total:
        raise VaekitError(f"holdout {holdout} would hold out {count} of {total} images and leave none to train on.")
    keys = source.keys()
    ranked = sorted(range(total), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode("utf-8", "surrogateescape")).hexdigest())
    held = set(ranked[:count])
    return (source.subset([i for i in range(total) if i not in held]),
            source.subset([i for i in range(total) if i in held]))
