"""Robust image decoding: `decode_image(source)` gives an RGB PIL image or raises `ImageError`.

`ImageError.reason` is a short, stable string ("zero-byte file", "truncated image", "not an image",
"corrupt image", "too many pixels (N > limit)", "too many bytes (N > limit)", ...) that runs count
and list skipped images by. Sizes are checked before bytes are read: a file's size (stat) against
`max_bytes`, an image header's pixel count against `max_pixels`.
"""

import errno
import functools
import io
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vaekit.data.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from vaekit.errors import VaekitError, describe_exception, plain_text


# Magic numbers of the formats above: a file that starts like one but does not open is corrupt,
# anything else is not an image at all.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


class ImageError(VaekitError):
    """An image that cannot be used; `reason` is short and stable enough to count by."""

    def __init__(self, reason, where=None, detail=None):
        self.reason = reason
        self.where = where
        self.detail = plain_text(detail) if detail else detail  # a library's message, as one line of words
        text = f"{where}: {reason}" if where else reason
        if self.detail:
            text += f" ({self.detail})"
        super().__init__(plain_text(f"{text}. Fix or remove the file; runs skip and list such images."))

    def __reduce__(self):  # keep reason/where/detail when sent between processes
        return (type(self), (self.reason, self.where, self.detail))


def decode_image(source, background=(255, 255, 255), max_pixels=DEFAULT_MAX_PIXELS,
                 max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """Decode a path, bytes, file object or PIL image to an RGB PIL image, or raise ImageError.

    EXIF orientation is applied; transparency is composited on `background`; animations give their
    first frame; `max_pixels` (None: no limit of ours) is checked from the header before decoding,
    `max_bytes` (None: no limit) from a file's size before it is read.
    """
    where = str(source) if isinstance(source, (str, os.PathLike)) else None
    data = b""
    if not isinstance(source, Image.Image):
        data = _read_all(source, where, max_bytes)
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
        raise ImageError(reason, where, describe_exception(e)) from None


def read_image_file(path, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The bytes of the regular file at `path`, or ImageError; never blocks and never follows a symlink loop.

    The file is opened non-blocking and checked before reading: a FIFO named like an image would
    otherwise block the reader forever, a device file would stream without end, a folder cannot be
    read. O_NONBLOCK changes nothing for regular files. A file over `max_bytes` is refused by its
    size and never read; one that grows past it while being read stops at max_bytes + 1 bytes.
    """
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError("file not found", where) from None
    except OSError as e:
        raise ImageError(OPEN_ERRORS.get(e.errno, "unreadable file"), where, describe_exception(e)) from None
    try:
        info = os.fstat(fd)  # before wrapping the descriptor in a file object, which refuses folders with a raw error
        kind = file_kind(info.st_mode)
        if kind != "regular file":
            raise ImageError("not a regular file", where, kind)
        check_size(info.st_size, max_bytes, where)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = read_at_most(f, max_bytes, info.st_size)
    except OSError as e:
        raise ImageError("unreadable file", where, describe_exception(e)) from None
    finally:
        os.close(fd)
    check_size(len(data), max_bytes, where)
    return data


def read_at_most(f, max_bytes, expected=None):
    """The rest of binary file `f`, stopping after max_bytes + 1 bytes (None: no limit).

    Reads the `expected` size (a stat's) in one call and only then in pieces, so no buffer is ever
    sized by the limit instead of the file.
    """
    want = (expected if expected is not None else 1 << 20) + 1
    if max_bytes is not None:
        want = min(want, max_bytes + 1)
    data = f.read(want)
    if len(data) < want or (max_bytes is not None and len(data) > max_bytes):
        return data
    pieces = [data]
    total = len(data)
    while max_bytes is None or total <= max_bytes:  # the file grew, or its size was unknown
        piece = f.read(1 << 20 if max_bytes is None else min(1 << 20, max_bytes + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def check_size(size, max_bytes, where=None):
    """Raise ImageError when an image file of `size` bytes is over `max_bytes` (None: no limit)."""
    if max_bytes is not None and size > max_bytes:
        raise ImageError(f"too many bytes ({size} > {max_bytes})", where,
                         "over the per-image byte limit, max_image_bytes; raise it to read such files")


# Why a file could not be opened, by errno; the reason strings runs list skipped images by.
OPEN_ERRORS = {errno.ELOOP: "symlink loop", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EISDIR: "not a regular file", errno.ENXIO: "not a regular file"}


def file_kind(mode):
    """'regular file', 'directory', 'fifo', 'socket', 'device' or 'special file' for an st_mode."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _read_all(source, where, max_bytes):
    """Bytes of a path, bytes-like or file object, at most `max_bytes`; a missing or unreadable file is an ImageError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        check_size(len(source), max_bytes, where)
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return read_image_file(source, max_bytes)
    if hasattr(source, "read"):
        data = read_at_most(source, max_bytes)
        check_size(len(data), max_bytes, where)
        return data
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
