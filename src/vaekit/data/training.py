"""The trainer's view of the data: random crops of a Source, seeded per (epoch, index), and the held-out split."""

import torch

from vaekit.data.config import CROP_MODES, DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, SMALL_IMAGE_POLICIES
from vaekit.data.crops import TrainCrop
from vaekit.data.decode import ImageError
from vaekit.data.sources import open_source, split_holdout
from vaekit.data.streaming import is_streamed, open_stream
from vaekit.errors import VaekitError
from vaekit.seeds import EpochSeeded, numpy_rng


class TrainImageDataset(EpochSeeded, torch.utils.data.Dataset):
    """Crops of a Source as {"pixels": (3, H, W) in [-1, 1], "key"}, or {"error": reason, "key"} for a bad image.

    Randomness (crop offset, flip) comes from numpy's generator seeded with (seed, epoch, index),
    never from global RNG: item i of epoch e is the same in any worker, with any number of workers,
    and after a resume. Call `set_epoch` before each epoch (DataLoader workers copy the dataset when
    an epoch's iterator starts, so do not combine it with persistent_workers=True), or index with
    (index, epoch) pairs from your sampler.
    """

    def __init__(self, source, size=256, crop="resize_random", flip=True, small_images="upscale", min_size=16,
                 background=(255, 255, 255), max_pixels=DEFAULT_MAX_PIXELS, seed=0,
                 max_image_bytes=DEFAULT_MAX_IMAGE_BYTES, keep_decoded=0, colour=(0.0, 0.0), short_side=None):
        if crop not in CROP_MODES:
            raise VaekitError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}.")
        if small_images not in SMALL_IMAGE_POLICIES:
            raise VaekitError(f"small_images must be one of {', '.join(SMALL_IMAGE_POLICIES)}, got {small_images!r}.")
        self.source = source
        self.background = tuple(int(c) for c in background)
        self.recipe = TrainCrop(size, crop, flip, small_images, min_size, self.background, tuple(colour),
                                None if short_side is None else tuple(short_side))
        self.max_pixels = max_pixels
        self.max_image_bytes = max_image_bytes
        self.seed = seed
        # The first `keep_decoded` images read stay decoded in memory (in each process or worker that reads
        # them): a small data set is then decoded once instead of once per crop. A PIL image is not changed
        # by the crops taken from it, so a kept image gives the same crops as a fresh decode.
        self.keep_decoded = keep_decoded
        self.decoded = {}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        index, epoch = self.index_and_epoch(index)
        record = self.source[index]
        rng = numpy_rng(self.seed, epoch, index)
        try:
            img = self.decoded.get(index)
            if img is None:
                img = record.decode(background=self.background, max_pixels=self.max_pixels,
                                    max_bytes=self.max_image_bytes)
                if len(self.decoded) < self.keep_decoded:
                    self.decoded[index] = img
            pixels = self.recipe(img, rng)
        except ImageError as e:
            return {"error": e.reason, "key": record.key}
        return {"pixels": pixels, "key": record.key}


def collate_images(batch):
    """Stack the good items -> {"pixels": (B, 3, H, W), "keys": [...], "errors": [{"key", "error"}]}.

    B may be smaller than the batch (even 0) when some images were bad.
    """
    good = [item for item in batch if "pixels" in item]
    errors = [{"key": item["key"], "error": item["error"]} for item in batch if "pixels" not in item]
    pixels = torch.stack([item["pixels"] for item in good]) if good else torch.empty(0, 3, 0, 0)
    return {"pixels": pixels, "keys": [item["key"] for item in good], "errors": errors}


def collate_stream(batch):
    """`collate_images` of streamed items, plus the worker stream the batch came from and the position after it."""
    return {**collate_images(batch), "epochs": [item["position"][0] for item in batch if "pixels" in item],
            "worker": batch[-1]["worker"], "position": list(batch[-1]["position"])}


def build_train_val(config, val_size=None, order_seed=0):
    """(train dataset, held-out dataset or None) from a DataConfig; held-out crops are centred, unflipped.

    `val_size`: the held-out crops' side (default: the training crop size). A convolutional VAE
    trained on small crops reconstructs larger images too; whole-image structure shows at 256 px.
    Shards that `config.streaming` streams give a `StreamingImages` (its shard order seeded by
    `order_seed`) and the first `holdout` samples of the last shard as held-out images.
    """
    common = dict(size=config.size, small_images=config.small_images, min_size=config.min_size,
                  background=config.background, max_pixels=config.max_pixels, max_image_bytes=config.max_image_bytes,
                  seed=config.seed)
    if is_streamed(config.path, config.streaming, config.source):
        train, val_source = open_stream(config, order_seed)
    else:
        source = open_source(config.path, config.source, config.split, config.image_column, config.key_column)
        train_source, val_source = split_holdout(source, config.holdout, config.seed)
        train = TrainImageDataset(train_source, crop=config.crop, flip=config.flip, keep_decoded=config.keep_decoded,
                                  colour=(config.hue_jitter, config.saturation_jitter),
                                  short_side=config.short_side, **common)
    if val_source is None or not len(val_source):
        return train, None
    val_common = {**common, "size": val_size or config.size}
    return train, TrainImageDataset(val_source, crop="center", flip=False, **val_common)
