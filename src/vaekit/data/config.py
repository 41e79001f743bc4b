"""How training images are chosen and cropped (`DataConfig`), and the option values shared by the data modules.

No torch or Pillow here: the command line reads these to build its parser.
"""

import dataclasses
import typing


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# About 134 megapixels (an 11,585 px square, 400 MB as 8-bit RGB). It sits below Pillow's own hard
# limit (2 x Image.MAX_IMAGE_PIXELS = 179 MP), so by default this check is the one that fires.
DEFAULT_MAX_PIXELS = 128 * 1024 * 1024

# 1 GiB: a file's size (or a tar member's declared size) is checked against it before a byte is read,
# so one huge file never fills memory. It admits every image under DEFAULT_MAX_PIXELS stored without
# compression at 8 bits with alpha (537 MB) or at 16 bits per RGB channel (805 MB).
DEFAULT_MAX_IMAGE_BYTES = 1024 ** 3

# Seconds a shard read may go without a byte (a stalled `pipe:` command, a hung download) before the
# shard is given up as unreadable.
DEFAULT_READ_TIMEOUT = 300.0

CropMode = typing.Literal["random", "resize_random", "center"]
SmallImagePolicy = typing.Literal["upscale", "skip", "pad"]
CROP_MODES = typing.get_args(CropMode)
SMALL_IMAGE_POLICIES = typing.get_args(SmallImagePolicy)
SOURCE_KINDS = ("auto", "folder", "hf", "webdataset", "builtin")
StreamingMode = typing.Literal["auto", "on", "off"]


@dataclasses.dataclass
class DataConfig:
    """Where training images come from and how they become crops."""

    path: str = "builtin:photos"  # image folder, HF data set, WebDataset shards or builtin:photos
    source: typing.Literal[SOURCE_KINDS] = "auto"
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
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES  # larger files are skipped unread; None: no limit
    read_timeout: float | None = DEFAULT_READ_TIMEOUT  # seconds without a byte before a shard is given up
    holdout: float = 0.05  # validation images: a fraction (< 1) or a count (>= 1), chosen by key hash
    # Read WebDataset shards as a stream (vaekit.data.streaming) instead of indexing them: auto streams
    # what cannot be indexed (pipe:, URLs, .tar.gz / .tgz), on streams any shards, off always indexes.
    # A streamed run holds out the first `holdout` samples (a count) of the last shard.
    streaming: StreamingMode = "auto"
    num_workers: int = 2  # DataLoader worker processes
    # Colour augmentation of training crops: hue turned by up to +-hue_jitter of the colour wheel (0.5: any hue),
    # saturation scaled by a factor in [1 - saturation_jitter, 1 + saturation_jitter]. 0: unchanged colours.
    hue_jitter: float = 0.0
    saturation_jitter: float = 0.0
    # Training images each process (or worker) keeps decoded in memory, the first it reads: a small data set
    # such as builtin:photos is decoded once instead of once per crop. 0: decode for every crop.
    keep_decoded: int = 0
    # `crop: random` at random scales: each crop comes from the image scaled down so that its short side is a
    # random length in [low, high] pixels (never scaled up). null: every crop at the image's own resolution.
    short_side: list[int] | None = None
    seed: int = 0

    def __post_init__(self):
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values 0-255, got {self.background}")
        if self.size < 1 or self.min_size < 0 or self.num_workers < 0 or self.keep_decoded < 0:
            raise ValueError("size must be >= 1, min_size, num_workers and keep_decoded >= 0")
        if not 0 <= self.hue_jitter <= 0.5 or not 0 <= self.saturation_jitter <= 1:
            raise ValueError(f"hue_jitter must be in [0, 0.5] and saturation_jitter in [0, 1], got {self.hue_jitter} "
                             f"and {self.saturation_jitter}")
        if self.short_side is not None:
            if len(self.short_side) != 2 or not 1 <= self.short_side[0] <= self.short_side[1]:
                raise ValueError(f"short_side must be [low, high] pixels with 1 <= low <= high (or null), got "
                                 f"{self.short_side}")
            if self.crop != "random":
                raise ValueError(f"short_side scales the photos that `crop: random` crops from; with crop "
                                 f"{self.crop!r} set it to null or use crop: random")
        check_read_limits(self.max_image_bytes, self.read_timeout)


def check_read_limits(max_image_bytes, read_timeout):
    """Refuse a byte limit or read timeout that is not positive (None switches either off)."""
    if max_image_bytes is not None and max_image_bytes < 1:
        raise ValueError(f"max_image_bytes must be a positive number of bytes (or null: no limit), got {max_image_bytes}")
    if read_timeout is not None and not read_timeout > 0:
        raise ValueError(f"read_timeout must be a positive number of seconds (or null: wait forever), got {read_timeout}")
