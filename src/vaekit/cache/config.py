"""What `vaekit encode` reads (`EncodeConfig`): the images, how they are sized, how latents are stored (no torch)."""

import dataclasses
import typing

from vaekit.data.config import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_READ_TIMEOUT, SOURCE_KINDS,
                                check_read_limits)

STORE_MODES = ("mean_logvar", "mode")


@dataclasses.dataclass
class EncodeConfig:
    """What `vaekit encode` reads, how it sizes images, and how it stores latents."""

    data: str = ""  # image folder, Hugging Face data set, WebDataset shards or builtin:photos
    out: str = ""  # cache folder
    vae: str = ""  # model argument (preset:NAME, folder, file, hub id); recorded in the card
    override: list[str] = dataclasses.field(default_factory=list)  # AutoencoderKL config overrides, key=value
    weights: typing.Literal["ema", "raw"] = "ema"  # which weights of a training checkpoint
    source: typing.Literal[SOURCE_KINDS] = "auto"
    split: str | None = None  # Hugging Face split
    image_column: str | None = None  # Hugging Face column or WebDataset field holding the image
    key_column: str | None = None  # Hugging Face column with unique ids
    limit: int | None = None  # encode only the first N images of the source
    resolution: int = 256  # square side; with buckets, the bucket area is resolution^2
    buckets: bool = False  # aspect-ratio buckets instead of square centre crops
    min_aspect: float = 0.5  # narrowest bucket (W/H)
    max_aspect: float = 2.0  # widest bucket (W/H)
    bucket_step: int = 64  # bucket sides are multiples of this
    small_images: typing.Literal["upscale", "skip", "pad"] = "upscale"  # images smaller than their crop
    min_size: int = 0  # images with a shorter side are skipped and listed
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # decompression-bomb limit; None: Pillow's only
    max_image_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES  # larger files are skipped unread; None: no limit
    read_timeout: float | None = DEFAULT_READ_TIMEOUT  # seconds without a byte before a shard is given up
    background: list[int] = dataclasses.field(default_factory=lambda: [255, 255, 255])  # behind transparency
    flip: bool = False  # also store the latents of the mirrored image
    store: typing.Literal["mean_logvar", "mode"] = "mean_logvar"  # posterior, or its mode only
    dtype: typing.Literal["bf16", "fp16", "fp32"] = "fp16"  # storage dtype
    compute_dtype: typing.Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where native, else fp32
    tile: str = "off"  # off, auto or a tile size in pixels (see vaekit.codec.tiling)
    batch_size: int = 16
    num_workers: int = 2  # DataLoader processes decoding and resizing
    shard_size: int = 4096  # samples per part file of a unit (an image and its mirror share a part)
    unit_size: int = 4096  # images per unit of an indexed source (folder, data set); a WebDataset shard is one unit
    lock_timeout: float = 600.0  # seconds without a heartbeat after which another host's unit lock is stale
    channels_last: bool = True  # faster convolutions on GPUs and on oneDNN CPUs
    compile: bool = False  # torch.compile the encoder
    overwrite: bool = False  # replace an existing cache whose key differs instead of refusing

    def __post_init__(self):
        if self.resolution < 8 or min(self.batch_size, self.shard_size, self.unit_size) < 1 or self.num_workers < 0:
            raise ValueError("resolution must be >= 8, batch_size, shard_size and unit_size >= 1, num_workers >= 0")
        if not self.lock_timeout > 0:
            raise ValueError(f"lock_timeout must be a positive number of seconds, got {self.lock_timeout}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if len(self.background) != 3 or not all(0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"background must be three values 0-255, got {self.background}")
        check_read_limits(self.max_image_bytes, self.read_timeout)
