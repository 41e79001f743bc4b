"""Test images written on the fly: good photos-like images, one file of each bad kind and each odd mode.

Shared by the data, encoder and evaluator tests. Typical use:

    bad = write_bad_images(folder)    # {filename: expected ImageError.reason prefix}
    odd = write_odd_images(folder)    # {filename: OddImage(size, probes)} that must decode correctly
    good = write_photos(folder, 4)    # [filenames] of plain RGB images

Everything is deterministic (fixed seeds) and small (at most 64 px, a few KB on disk; the
decompression bomb is a 100,000 x 100,000 PNG header in under 100 bytes).
"""

import dataclasses
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

# The reasons vaekit.data.ImageError gives for each bad file (ImageError.reason starts with these).
BAD_REASONS = {
    "empty.jpg": "zero-byte file",
    "truncated.jpg": "truncated image",
    "truncated.png": "truncated image",
    "truncated.webp": "truncated image",
    "random_bytes.jpg": "not an image",
    "text.png": "not an image",
    "corrupt.png": "corrupt image",
    "bomb.png": "too many pixels",
}


@dataclasses.dataclass
class OddImage:
    """What an odd file must decode to: RGB of `size` (W, H) with these pixels (x, y) -> colour, within `tol`."""

    size: tuple[int, int]
    probes: dict
    tol: int = 0


def make_photo(width, height, seed=0):
    """A smooth, colourful RGB image (gradients plus a few discs), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.02, 0.15), rng.uniform(0.02, 0.15), rng.uniform(0, 6.28)
        channels.append(0.5 + 0.5 * np.sin(fx * x + fy * y + phase))
    img = np.stack(channels, -1)  # (H, W, 3)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, max(4, min(width, height) / 3))
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    return Image.fromarray((img * 255).round().astype(np.uint8), "RGB")


def write_photos(folder, count, size=(48, 40), seed=0, ext=".png"):
    """Write `count` photo-like images named photo_000.png ...; returns the file names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"photo_{i:03d}{ext}"
        make_photo(*size, seed=seed + i).save(folder / name)
        names.append(name)
    return names


def encode(img, fmt, **params):
    """Bytes of `img` saved in format `fmt`."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bytes(width, height, bit_depth, colour_type, rows):
    """A PNG written chunk by chunk (for bit depths and sizes Pillow will not write); `rows` is raw scanlines."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def bomb_png_bytes(width=100_000, height=100_000):
    """A PNG whose header claims width x height pixels (RGB) but whose data is a few bytes."""
    return png_bytes(width, height, 8, 2, b"\x00" * 64)


def write_bad_images(folder):
    """Write one file of each bad kind; returns {filename: expected reason} (BAD_REASONS)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photo = make_photo(64, 48, seed=99)
    jpeg, png, webp = encode(photo, "JPEG", quality=90), encode(photo, "PNG"), encode(photo, "WEBP", quality=80)
    corrupt = bytearray(png)
    start = corrupt.index(b"IDAT") + 40
    corrupt[start:start + 16] = bytes(b ^ 0xFF for b in corrupt[start:start + 16])
    files = {
        "empty.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "truncated.png": png[: len(png) // 2],
        "truncated.webp": webp[: len(webp) // 2],
        "random_bytes.jpg": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text.png": b"This is a text file with an image's name.\n" * 20,
        "corrupt.png": bytes(corrupt),
        "bomb.png": bomb_png_bytes(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return dict(BAD_REASONS)


def _halves(width, height, left, right, mode="RGB"):
    """An image whose left half is `left` and right half `right`."""
    img = Image.new(mode, (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def write_odd_images(folder, background=WHITE):
    """Write one file of each odd mode or format; returns {filename: OddImage} for `background`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = 40, 24
    left, right = (5, 12), (35, 12)  # probe points inside each half
    half_alpha = tuple(round(0.5 * c + 0.5 * b) for c, b in zip((0, 0, 0), background))
    expected = {}

    def save(name, img, odd, **params):
        img.save(folder / name, **params)
        expected[name] = odd

    save("grey.png", Image.new("L", (w, h), 100), OddImage((w, h), {left: (100, 100, 100)}))
    save("bilevel.png", _halves(w, h, 1, 0, "1"), OddImage((w, h), {left: WHITE, right: BLACK}))
    save("grey_alpha.png", _halves(w, h, (0, 0), (0, 255), "LA"), OddImage((w, h), {left: background, right: BLACK}))
    palette = Image.new("P", (w, h), 0)
    palette.putpalette([*RED, *GREEN] + [0] * 762)
    palette.paste(1, (w // 2, 0, w, h))
    save("palette.png", palette, OddImage((w, h), {left: RED, right: GREEN}))
    save("palette_transparent.png", palette, OddImage((w, h), {left: RED, right: background}), transparency=1)
    rgba = _halves(w, h, (255, 0, 0, 0), (0, 0, 255, 255), "RGBA")  # left: red but fully transparent
    rgba.paste((0, 0, 0, 128), (0, 0, 8, 8))  # black at about 50 % over the background
    save("rgba.png", rgba, OddImage((w, h), {left: background, right: BLUE, (2, 2): half_alpha}, tol=1))
    save("cmyk.jpg", _halves(w, h, (0, 255, 255, 0), (0, 0, 0, 255), "CMYK"),  # red | black in CMYK
         OddImage((w, h), {left: RED, right: BLACK}, tol=6), quality=95)
    grey16 = np.zeros((h, w), np.uint16)
    grey16[:, : w // 3], grey16[:, w // 3: 2 * w // 3] = 65535, 32768
    grey16_probes = {(2, 5): WHITE, (20, 5): (128, 128, 128), (36, 5): BLACK}
    save("grey16.png", Image.fromarray(grey16), OddImage((w, h), grey16_probes))
    row = b"\x00" + struct.pack(">HHH", 65535, 0, 0) * (w // 2) + struct.pack(">HHH", 32768, 32768, 32768) * (w // 2)
    (folder / "rgb16.png").write_bytes(png_bytes(w, h, 16, 2, row * h))
    expected["rgb16.png"] = OddImage((w, h), {left: RED, right: (128, 128, 128)})
    frames = [Image.new("RGB", (w, h), RED), Image.new("RGB", (w, h), BLUE)]
    animated = dict(save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("animated.gif", frames[0], OddImage((w, h), {left: RED, right: RED}), **animated)
    save("animated.webp", frames[0], OddImage((w, h), {left: RED, right: RED}), lossless=True, **animated)
    save("animated_apng.png", frames[0], OddImage((w, h), {left: RED, right: RED}), **animated)
    # Stored 40 x 24 with a red corner top-left; EXIF orientation 6 means "rotate 90 degrees clockwise
    # to display", so the decoded image is 24 x 40 with the red corner top-right.
    stored = Image.new("RGB", (w, h), BLACK)
    stored.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", stored, OddImage((h, w), {(h - 3, 3): RED, (3, 3): BLACK, (3, w - 3): BLACK}, tol=12),
         quality=95, exif=exif)
    save("UPPER_CASE.JPG", Image.new("RGB", (w, h), GREEN), OddImage((w, h), {left: GREEN}, tol=6), quality=95)
    save("float.tif", Image.fromarray(np.full((h, w), 0.5, np.float32), "F"), OddImage((w, h), {left: (128, 128, 128)}))
    save("bitmap.bmp", _halves(w, h, BLUE, GREEN), OddImage((w, h), {left: BLUE, right: GREEN}))
    save("tiff.tiff", _halves(w, h, BLUE, GREEN), OddImage((w, h), {left: BLUE, right: GREEN}))
    return expected
