"""Images in, tensors out: robust decoding, image sources, crops, aspect buckets and the training dataset.

The pieces other modules build on:

- `decode_image(source)` turns a path, bytes or PIL image into an RGB PIL image, or raises
  `ImageError` whose `reason` is a short, stable string ("zero-byte file", "truncated image",
  "not an image", "corrupt image", "too many pixels (N > limit)", ...).
- `open_source(spec)` gives a `Source`: an indexed, deterministic list of `Record`s (key, local
  path or None, a `read_bytes()` callable) over an image folder, a Hugging Face `datasets` data set,
  WebDataset tar shards or `builtin:photos`. `source.subset(range(rank, len(source), world))`
  splits it across processes.
- `prepare_image(img, size, crop=...)` resizes and crops by the small-image policy and returns the
  output with a `Crop` that records exactly where it came from.
- `make_buckets` / `nearest_bucket` / `resize_crop_to_bucket` for aspect-ratio bucketing.
- `to_tensor` / `to_pil` convert between PIL images and (3, H, W) tensors in [-1, 1].
- `TrainImageDataset`, `collate_images`, `DataConfig` and `build_train_val` for the trainer.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import io
import math
import os
import re
import tarfile
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vaekit.errors import VaekitError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# About 134 megapixels (an 11,585 px square, 400 MB as 8-bit RGB). It sits below Pillow's own hard
# limit (2 x Image.MAX_IMAGE_PIXELS = 179 MP), so by default this check is the one that fires.
DEFAULT_MAX_PIXELS = 128 * 1024 * 1024

# Bicubic with Pillow's antialiasing (the filter support widens with the downscale factor), so
# downscaled photos do not alias; less ringing than Lanczos on hard edges.
RESAMPLE = Image.Resampling.BICUBIC

CropMode = typing.Literal["random", "resize_random", "center"]
SmallImagePolicy = typing.Literal["upscale", "skip", "pad"]
CROP_MODES = typing.get_args(CropMode)
SMALL_IMAGE_POLICIES = typing.get_args(SmallImagePolicy)

# Magic numbers of the formats above: a file that starts like one but does not open is corrupt,
# anything else is not an image at all.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(VaekitError):
    """An image that cannot be used; `reason` is short and stable enough to count by."""

    def __init__(self, reason, where=None, detail=None):
        self.reason = reason
        self.where = where
        self.detail = detail
        text = f"{where}: {reason}" if where else reason
        if detail:
            text += f" ({detail})"
        super().__init__(f"{text}. Fix or remove the file; runs skip and list such images.")

    def __reduce__(self):  # keep reason/where/detail when sent between processes
        return (type(self), (self.reason, self.where, self.detail))


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_image(source, background=(255, 255, 255), max_pixels=DEFAULT_MAX_PIXELS):
    """Decode a path, bytes, file object or PIL image to an RGB PIL image, or raise ImageError.

    EXIF orientation is applied; transparency is composited on `background`; animations give their
    first frame; `max_pixels` (None: no limit of ours) is checked from the header before decoding.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else None
    data = b""
    if not isinstance(source, Image.Image):
        data = _read_all(source, where)
        if not data:
            raise ImageError("zero-byte file", where)
        _check_webp_length(data, where)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_flag()
    try:
        with warnings.catch_warnings():
            # Our own limit is checked first; Pillow's warning for sizes under its hard limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                return _finish_image(source, background, max_pixels, where)
            with Image.open(io.BytesIO(data)) as img:
                return _finish_image(img, background, max_pixels, where)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        limit = 2 * Image.MAX_IMAGE_PIXELS
        raise ImageError(f"too many pixels ({pixels.group(1) if pixels else '?'} > {limit})", where,
                         "Pillow's limit; raise PIL.Image.MAX_IMAGE_PIXELS to allow more") from None
    except UnidentifiedImageError:
        reason = "corrupt image" if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP" else "not an image"
        raise ImageError(reason, where) from None
    except MemoryError:
        raise ImageError("too large to decode", where) from None
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError, struct.error, ...
        reason = "truncated image" if "truncated" in str(e).lower() or isinstance(e, EOFError) else "corrupt image"
        raise ImageError(reason, where, f"{type(e).__name__}: {e}") from None


def _read_all(source, where):
    """Bytes of a path, bytes-like or file object; a missing or unreadable file is an ImageError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            return Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageError("file not found", where) from None
        except OSError as e:
            raise ImageError("unreadable file", where, f"{type(e).__name__}: {e}") from None
    if hasattr(source, "read"):
        return source.read()
    raise TypeError(f"decode_image takes a path, bytes, a file object or a PIL image, not {type(source).__name__}")


def _check_webp_length(data, where):
    """Pillow reports a cut-off WebP only as 'could not create decoder'; the RIFF header knows its length."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8
        if len(data) < declared:
            raise ImageError("truncated image", where, f"{len(data)} of {declared} bytes")


@functools.cache
def _warn_truncated_flag():
    """Warn once: with LOAD_TRUNCATED_IMAGES set elsewhere, Pillow pads cut-off files silently."""
    warnings.warn(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in this process): truncated images "
        "are padded instead of reported. Set it back to False to have them detected and skipped.",
        stacklevel=3,
    )


def _finish_image(img, background, max_pixels, where):
    """Size check, decode, EXIF orientation and conversion to RGB of an opened image."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"too many pixels ({width * height} > {max_pixels})", where)
    img.load()  # decode now, so truncation and corruption surface here and not in a later resize
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not cost the pixels; keep the stored orientation
        pass
    try:
        return _to_rgb(img, background)
    except ValueError as e:
        raise ImageError(f"unsupported image mode {img.mode}", where, str(e)) from None


def _to_rgb(img, background):
    """Any Pillow mode to 8-bit RGB: high bit depths rescaled (not clipped), alpha composited on `background`."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = Image.fromarray(_scale_to_uint8(img), "L")
        mode = "L"
    if mode == "RGB":
        return img.copy()
    if mode == "La":  # premultiplied grey + alpha: Pillow converts it only to LA
        img, mode = img.convert("LA"), "LA"
    if mode == "LAB":  # Pillow's plain convert would read L*a*b* as if it were RGB
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        lab_to_srgb = ImageCms.buildTransform(lab, srgb, "LAB", "RGB")
        return ImageCms.applyTransform(img, lab_to_srgb)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # also applies a palette's or a colour key's tRNS transparency
        out = Image.new("RGB", rgba.size, tuple(int(c) for c in background))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")  # 1, L, P, CMYK (Pillow undoes Adobe's inverted CMYK JPEGs), YCbCr, ...


def _scale_to_uint8(img):
    """Greyscale of more than 8 bits to uint8 by value scaling; Pillow's own convert('L') clips at 255."""
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        # Float images are either in [0, 1] (scientific, HDR exports) or in 0-255 (Pillow's own 'F').
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    values = values.astype(np.int64)
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if img.mode.startswith("I;16") or (low >= 0 and high <= 65535):
        # 16-bit full scale: 65535 -> 255 and 32768 -> 128, rounding half up in integers.
        return ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    # 32-bit integers outside the 16-bit range carry no known full scale: stretch min..max to 0..255.
    return ((values - low) * 255 // max(high - low, 1)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a source: a unique key, its local file (None inside tars and datasets), a byte loader."""

    key: str
    path: str | None
    read_bytes: typing.Callable[[], bytes]

    def decode(self, background=(255, 255, 255), max_pixels=DEFAULT_MAX_PIXELS):
        """Read and decode this image to RGB; errors name the key or path."""
        where = self.path or self.key
        try:
            data = self.read_bytes()
        except ImageError as e:
            raise ImageError(e.reason, where, e.detail) from None
        except FileNotFoundError:
            raise ImageError("file not found", where) from None
        except OSError as e:
            raise ImageError("unreadable file", where, f"{type(e).__name__}: {e}") from None
        try:
            return decode_image(data, background=background, max_pixels=max_pixels)
        except ImageError as e:
            raise ImageError(e.reason, where, e.detail) from None


class Source(Sequence):
    """An ordered, indexable list of images (`Record`s) with unique, deterministic keys.

    Every process that opens the same spec sees the same order, so `subset` splits it the same way
    in DataLoader workers and across ranks. A Source pickles (it holds paths and offsets, no handles).
    """

    def __init__(self, description, keys, paths, reader, positions=None):
        self.description = description
        self._keys = keys
        self._paths = paths
        self._reader = reader  # picklable object with read(position) -> bytes
        self._positions = range(len(keys)) if positions is None else positions

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
        return Source(self.description, self._keys, self._paths, self._reader, positions)

    def __repr__(self):
        return f"<Source {self.description}: {len(self)} images>"


class _FileReader:
    """Reads whole local files by position."""

    def __init__(self, paths):
        self.paths = paths

    def read(self, position):
        return Path(self.paths[position]).read_bytes()


class _TarReader:
    """Reads tar members by their data offset, so any sample of any shard is one seek away."""

    def __init__(self, entries):
        self.entries = entries  # [(tar path, data offset, size)]

    def read(self, position):
        path, offset, size = self.entries[position]
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

    def read(self, position):
        value = self.dataset[position][self.column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value)
            if not path.is_absolute() and self.base_dir is not None:
                path = Path(self.base_dir) / path
            return path.read_bytes()
        raise ImageError("empty image field", None, f"column '{self.column}' holds {type(value).__name__}")


def list_images(root):
    """Image files under `root`, recursively, sorted by relative path; hidden files and folders skipped."""
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
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    if not found:
        raise VaekitError(
            f"No images found in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}; hidden files "
            "skipped). Put images there or pass another folder."
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


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
    files = list_images(root)
    keys = [f.relative_to(root).as_posix() for f in files]
    paths = [str(f.resolve()) for f in files]
    return Source(f"image folder {root}", keys, paths, _FileReader(paths))


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
    """Index tar shards once: group members by WebDataset key, keep the image member's offset."""
    from webdataset.tariterators import base_plus_ext  # WebDataset's own key/extension split

    shards = _expand_shards(spec)
    wanted = (field.lower(),) if field else tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    keys, entries = [], []
    used = set()
    for shard in shards:
        try:
            # 'r:' = uncompressed only: offsets into a .tar.gz would need decompressing everything before them.
            with tarfile.open(shard, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, OSError) as e:
            raise VaekitError(
                f"Cannot index {shard} as an uncompressed tar ({e}). WebDataset shards must be plain .tar files "
                "(decompress .tar.gz first)."
            ) from None
        chosen = {}  # key -> (rank of the field in `wanted`, member), first key occurrence fixes the order
        for member in members:
            if not member.isfile():
                continue
            base, ext = base_plus_ext(member.name)
            if base is None or os.path.basename(base).startswith("."):
                continue
            ext = ext.lower()
            if ext in wanted:
                rank = wanted.index(ext)
                if base not in chosen or rank < chosen[base][0]:
                    chosen[base] = (rank, member)
        for base, (_, member) in chosen.items():
            # Keys should be unique across shards; a repeat gets its shard's name so none is lost.
            key = base if base not in used else f"{shard.name}/{base}"
            used.add(key)
            keys.append(key)
            entries.append((str(shard), member.offset_data, member.size))
    if not keys:
        raise VaekitError(
            f"No images found in the shards {spec} (looked for members ending in {', '.join(wanted)}). "
            "Name the image field with image_column=EXT."
        )
    return Source(f"webdataset {spec} ({len(shards)} shards)", keys, [None] * len(keys), _TarReader(entries))


def _expand_shards(spec):
    """Shard paths of a .tar, a folder of .tar files, or a brace pattern; each must exist."""
    path = Path(spec)
    if path.is_dir():
        shards = sorted(p for p in path.rglob("*.tar") if not any(x.startswith(".") for x in p.relative_to(path).parts))
    elif path.is_file():
        shards = [path]
    else:
        from webdataset.shardlists import expand_urls  # brace expansion as WebDataset itself does it

        shards = [Path(p) for p in expand_urls(spec)]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise VaekitError(f"Shard not found: {missing[0]} ({len(missing)} of {len(shards)} missing from {spec}).")
    if not shards:
        raise VaekitError(f"No .tar shards in {spec}.")
    return shards


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
    import datasets

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
    ranked = sorted(range(total), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest())
    held = set(ranked[:count])
    return (source.subset([i for i in range(total) if i not in held]),
            source.subset([i for i in range(total) if i in held]))


# ----------------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class Crop:
    """Where an output image came from: the input, resized to `resized_size`, cut at `box`.

    `box` is (left, top, right, bottom) in pixels of the resized image; it reaches outside it where
    the small-image policy padded with the background. In input pixels the box is
    `left * W / resized_w`, `top * H / resized_h`, ... (`box_in_original`).
    """

    original_size: tuple[int, int]  # (W, H) of the decoded input, after EXIF orientation
    resized_size: tuple[int, int]  # (W, H) after resizing, before cropping
    box: tuple[int, int, int, int]

    @property
    def scale(self):
        """Resize factor (resized width / original width)."""
        return self.resized_size[0] / self.original_size[0]

    def box_in_original(self):
        """The crop box in input pixels (floats)."""
        sx = self.original_size[0] / self.resized_size[0]
        sy = self.original_size[1] / self.resized_size[1]
        left, top, right, bottom = self.box
        return (left * sx, top * sy, right * sx, bottom * sy)

    def to_dict(self):
        """Plain lists, for JSON manifests."""
        return {"original_size": list(self.original_size), "resized_size": list(self.resized_size),
                "box": list(self.box)}


def _target_size(size):
    """(W, H) from an int or a pair."""
    if isinstance(size, int):
        width = height = size
    else:
        width, height = (int(s) for s in size)
    if width < 1 or height < 1:
        raise VaekitError(f"Crop size must be positive, got {size}.")
    return width, height


def prepare_image(img, size, crop="center", rng=None, small_images="upscale", min_size=0,
                  background=(255, 255, 255)):
    """Resize and crop `img` to `size` (int or (W, H)) by crop mode and small-image policy -> (img, Crop).

    crop: "center" (resize to cover, centre crop), "resize_random" (resize to cover, random crop),
    "random" (random crop at native resolution, resizing only images smaller than the crop).
    small_images, for images smaller than the crop on either side: "upscale" (default) resizes
    them up, "pad" keeps them at native size centred on `background`, "skip" raises ImageError.
    An image whose short side is below `min_size` is always skipped ("smaller than min_size").
    """
    if crop not in CROP_MODES:
        raise VaekitError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
    if small_images not in SMALL_IMAGE_POLICIES:
        raise VaekitError(f"small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}, got {small_images!r}.")
    if crop != "center" and rng is None:
        raise ValueError(f"crop={crop!r} needs an rng (numpy.random.Generator)")
    width, height = img.size
    target_w, target_h = _target_size(size)
    if min(width, height) < min_size:
        raise ImageError("smaller than min_size", None, f"{width}x{height}, min_size {min_size}")
    cover = max(target_w / width, target_h / height)  # the scale at which the image just covers the crop
    if cover > 1 and small_images == "skip":
        raise ImageError("smaller than crop size", None, f"{width}x{height} < {target_w}x{target_h}")
    scale = max(cover, 1.0) if crop == "random" else cover
    if small_images == "pad":
        scale = min(scale, 1.0)
    resized_w, resized_h = max(1, round(width * scale)), max(1, round(height * scale))
    if small_images != "pad":  # float rounding must never leave the resized image short of the crop
        resized_w, resized_h = max(resized_w, target_w), max(resized_h, target_h)
    left = _offset(resized_w - target_w, crop, rng)
    top = _offset(resized_h - target_h, crop, rng)
    box = (left, top, left + target_w, top + target_h)
    out = _render(img, (resized_w, resized_h), box, background)
    return out, Crop((width, height), (resized_w, resized_h), box)


def _offset(slack, crop, rng):
    """Crop offset along one axis: centred, or uniform over the slack; negative slack centres padding."""
    if slack <= 0 or crop == "center":
        return slack // 2 if slack >= 0 else -((-slack) // 2)
    return int(rng.integers(0, slack + 1))


def _render(img, resized_size, box, background):
    """Cut `box` out of `img` resized to `resized_size`, resampling only the part inside the box."""
    resized_w, resized_h = resized_size
    width, height = img.size
    left, top, right, bottom = box
    # The visible part of the box, in resized pixels.
    v_left, v_top, v_right, v_bottom = max(left, 0), max(top, 0), min(right, resized_w), min(bottom, resized_h)
    if (resized_w, resized_h) == (width, height):
        part = img.crop((v_left, v_top, v_right, v_bottom))
    else:
        sx, sy = width / resized_w, height / resized_h
        # Resizing just the source region equals resize-then-crop (Pillow's filter still reads the
        # pixels around the region) at a fraction of the cost for large photos.
        part = img.resize((v_right - v_left, v_bottom - v_top), RESAMPLE,
                          box=(v_left * sx, v_top * sy, v_right * sx, v_bottom * sy))
    if (v_left, v_top, v_right, v_bottom) == box:
        return part
    canvas = Image.new("RGB", (right - left, bottom - top), tuple(int(c) for c in background))
    canvas.paste(part, (v_left - left, v_top - top))
    return canvas


def resize_center_crop(img, size, small_images="upscale", background=(255, 255, 255)):
    """Resize to cover `size` (int or (W, H)), centre crop -> (img, Crop)."""
    return prepare_image(img, size, "center", small_images=small_images, background=background)


def random_crop(img, size, rng, small_images="upscale", background=(255, 255, 255)):
    """Random crop at native resolution (images smaller than the crop follow `small_images`) -> (img, Crop)."""
    return prepare_image(img, size, "random", rng, small_images=small_images, background=background)


def resize_random_crop(img, size, rng, small_images="upscale", background=(255, 255, 255)):
    """Resize to cover `size` (short side fits), random crop along the long side -> (img, Crop)."""
    return prepare_image(img, size, "resize_random", rng, small_images=small_images, background=background)


def make_buckets(target_area=512 * 512, min_aspect=0.5, max_aspect=2.0, step=64):
    """Aspect-ratio buckets [(W, H)]: sides multiples of `step`, area nearest `target_area`, sorted by W/H.

    For each portrait width w (a multiple of step) the height is the multiple of step nearest
    target_area / w; landscape buckets are their transposes, so the set is symmetric; buckets with
    W/H outside [min_aspect, max_aspect] are dropped.
    """
    if step < 1 or target_area < step * step:
        raise VaekitError(f"Buckets need step >= 1 and target_area >= step^2; got {step} and {target_area}.")
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise VaekitError(f"Buckets need 0 < min_aspect <= 1 <= max_aspect, got {min_aspect} and {max_aspect}.")
    portrait = []
    width = step
    while True:
        height = max(step, round(target_area / width / step) * step)
        if width > height:
            break
        portrait.append((width, height))
        width += step
    buckets = {b for w, h in portrait for b in ((w, h), (h, w))}
    buckets = sorted((b for b in buckets if min_aspect <= b[0] / b[1] <= max_aspect), key=lambda b: b[0] / b[1])
    if not buckets:
        raise VaekitError(f"No bucket fits aspect ratios {min_aspect}..{max_aspect} at step {step}; widen the range.")
    return buckets


def nearest_bucket(width, height, buckets):
    """The bucket whose aspect ratio is nearest the image's in log space (first one on a tie)."""
    if not buckets:
        raise VaekitError("No buckets to choose from.")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def resize_crop_to_bucket(img, bucket, small_images="upscale", background=(255, 255, 255)):
    """Resize to cover the bucket (W, H) and centre crop -> (img, Crop)."""
    return prepare_image(img, tuple(bucket), "center", small_images=small_images, background=background)


# ----------------------------------------------------------------------------------------------
# Tensors


def to_tensor(img):
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def to_pil(tensor):
    """Tensor (3, H, W) (or (1, 3, H, W)) in [-1, 1] -> RGB PIL image, clamped and rounded."""
    if tensor.dim() == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 3 or tensor.shape[0] != 3:
        raise VaekitError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(tensor.shape)}.")
    values = ((tensor.detach().float().cpu() + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(values.permute(1, 2, 0).numpy())  # (H, W, 3)


# ----------------------------------------------------------------------------------------------
# Training dataset


class TrainImageDataset(torch.utils.data.Dataset):
    """Crops of a Source as {"pixels": (3, H, W) in [-1, 1], "key"}, or {"error": reason, "key"} for a bad image.

    Randomness (crop offset, flip) comes from numpy's generator seeded with (seed, epoch, index),
    never from global RNG: item i of epoch e is the same in any worker, with any number of workers,
    and after a resume. Call `set_epoch` before each epoch (DataLoader workers copy the dataset when
    an epoch's iterator starts, so do not combine it with persistent_workers=True), or index with
    (index, epoch) pairs from your sampler.
    """

    def __init__(self, source, size=256, crop="resize_random", flip=True, small_images="upscale", min_size=16,
                 background=(255, 255, 255), max_pixels=DEFAULT_MAX_PIXELS, seed=0):
        if crop not in CROP_MODES:
            raise VaekitError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
        if small_images not in SMALL_IMAGE_POLICIES:
            raise VaekitError(f"small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}, got {small_images!r}.")
        self.source = source
        self.size = size
        self.crop = crop
        self.flip = flip
        self.small_images = small_images
        self.min_size = min_size
        self.background = tuple(int(c) for c in background)
        self.max_pixels = max_pixels
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch whose crops and flips the next items get."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        index, epoch = (int(i) for i in index) if isinstance(index, (tuple, list)) else (int(index), self.epoch)
        record = self.source[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            img = record.decode(background=self.background, max_pixels=self.max_pixels)
            img, _ = prepare_image(img, self.size, self.crop, rng, self.small_images, self.min_size, self.background)
        except ImageError as e:
            return {"error": e.reason, "key": record.key}
        pixels = to_tensor(img)
        if self.flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)  # (3, H, W), mirrored left-right
        return {"pixels": pixels, "key": record.key}


def collate_images(batch):
    """Stack the good items -> {"pixels": (B, 3, H, W), "keys": [...], "errors": [{"key", "error"}]}.

    B may be smaller than the batch (even 0) when some images were bad.
    """
    good = [item for item in batch if "pixels" in item]
    errors = [{"key": item["key"], "error": item["error"]} for item in batch if "pixels" not in item]
    pixels = torch.stack([item["pixels"] for item in good]) if good else torch.empty(0, 3, 0, 0)
    return {"pixels": pixels, "keys": [item["key"] for item in good], "errors": errors}


@dataclasses.dataclass
class DataConfig:
    """Where training images come from and how they become crops."""

    path: str = "builtin:photos"  # image folder, HF data set, WebDataset shards or builtin:photos
    source: typing.Literal["auto", "folder", "hf", "webdataset", "builtin"] = "auto"
    image_column: str | None = None  # HF column or WebDataset field holding the image; None: detect
    key_column: str | None = None  # HF column with unique ids for keys; None: "{split}/{index}"
    split: str | None = None  # HF split; None: train, or the only one
    size: int = 256  # square crop side in pixels
    crop: CropMode = "resize_random"
    flip: bool = True  # random horizontal flips
    small_images: SmallImagePolicy = "upscale"
    min_size: int = 16  # images with a shorter side are skipped as junk (icons, tracking pixels)
    background: list[int] = dataclasses.field(default_factory=lambda: [255, 255, 255])  # behind transparency
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb limit; None: Pillow's only
    holdout: float = 0.05  # validation images: a fraction (< 1) or a count (>= 1), chosen by key hash
    num_workers: int = 2  # DataLoader worker processes
    seed: int = 0

    def __post_init__(self):
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values 0-255, got {self.background}")
        if self.size < 1 or self.min_size < 0 or self.num_workers < 0:
            raise ValueError("size must be >= 1, min_size and num_workers >= 0")


def build_train_val(config):
    """(train dataset, held-out dataset or None) from a DataConfig; held-out crops are centred, unflipped."""
    source = open_source(config.path, config.source, config.split, config.image_column, config.key_column)
    train_source, val_source = split_holdout(source, config.holdout, config.seed)
    common = dict(size=config.size, small_images=config.small_images, min_size=config.min_size,
                  background=config.background, max_pixels=config.max_pixels, seed=config.seed)
    train = TrainImageDataset(train_source, crop=config.crop, flip=config.flip, **common)
    val = TrainImageDataset(val_source, crop="center", flip=False, **common) if len(val_source) else None
    return train, val
