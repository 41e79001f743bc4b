"""Training images paired with their cached latents, for a run that learns from a VAE without running its encoder.

Each image is prepared exactly as `vaekit encode` prepared it (the card's size policy and background,
vaekit.cache.units.prepare_pixels), so its pixels and the stored posterior line up pixel for latent.
A training crop is then cut at a latent-aligned offset: a (size, size) window whose corner is a
multiple of the downsampling factor, with the latents under it. With size equal to the cache's
resolution the crop is the whole image and the latents are exactly the encoder's for it; a smaller
crop keeps, at its borders, latents the encoder computed with the context outside the crop.
"""

import hashlib

import torch

from vaekit.cache.dataset import LatentDataset
from vaekit.cache.reader import open_card
from vaekit.cache.units import prepare_pixels
from vaekit.data.config import DEFAULT_MAX_PIXELS
from vaekit.data.decode import ImageError, decode_image
from vaekit.errors import VaekitError
from vaekit.seeds import EpochSeeded, numpy_rng


class CachedPairs(EpochSeeded, torch.utils.data.Dataset):
    """A Source's images with their cached latents: {"pixels": (3, S, S) in [-1, 1], "mean": (C, S/f, S/f),
    "logvar": the same or None (a mode-only cache), "key"}, or {"error", "key"} for an unusable image.

    Crop offsets and flips derive from (seed, epoch, index), as in TrainImageDataset. An image is
    mirrored (with its mirrored latents) only when the cache stores them (`vaekit encode --flip`).
    """

    def __init__(self, cache_dir, source, size, flip=True, seed=0, max_pixels=DEFAULT_MAX_PIXELS):
        info = open_card(cache_dir)  # checked: a damaged card is one VaekitError naming card.json
        key = info.key
        if key.get("size_policy") is None or not isinstance(key.get("background"), list) or not info.factor:
            raise VaekitError(f"{cache_dir}/card.json lacks the size policy, background or downsampling factor "
                              f"that pair its latents with images; re-create it with `vaekit encode --overwrite`.")
        self.policy, self.background = key["size_policy"], tuple(key["background"])
        self.factor = int(info.factor)
        self.source, self.size, self.seed, self.max_pixels = source, int(size), int(seed), max_pixels
        self.flip = bool(flip and key.get("flip"))
        check_crop(self.policy, self.size, self.factor, cache_dir)
        try:
            self.latents = LatentDataset(cache_dir, sample=False, normalize=False, flips="none", keys=source.keys())
        except VaekitError as e:
            raise VaekitError(f"{e} Every training image must be in the cache: encode them with the teacher (vaekit "
                              f"encode --vae TEACHER --data DATA --out {cache_dir}).") from None
        self.mode_only = self.latents.store != "mean_logvar"

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        index, epoch = self.index_and_epoch(index)
        record = self.source[index]
        rng = numpy_rng(self.seed, epoch, index)
        try:
            data = record.read_bytes()
            if hashlib.sha256(data).digest() != bytes(self.latents.field(index, "sha256")):
                raise ImageError("changed since the cache was encoded", record.path or record.key)
            img = decode_image(data, background=self.background, max_pixels=self.max_pixels)
            pixels, _, _ = prepare_pixels(img, self.policy, background=self.background)  # (3, H, W) uint8
        except ImageError as e:
            return {"error": e.reason, "key": record.key}
        except OSError as e:
            return {"error": f"unreadable file ({type(e).__name__})", "key": record.key}
        flip = self.flip and rng.random() < 0.5
        mean, logvar = self.latents.stored(index, flip)  # (C, h, w) each, float32
        if flip:
            pixels = pixels.flip(-1)  # mirrored left-right, like the stored mirrored latents
        side = self.size // self.factor
        top = int(rng.integers(0, mean.shape[-2] - side + 1))
        left = int(rng.integers(0, mean.shape[-1] - side + 1))
        f = self.factor
        pixels = pixels[:, top * f:(top + side) * f, left * f:(left + side) * f]
        window = (slice(None), slice(top, top + side), slice(left, left + side))
        return {"pixels": pixels.float().div_(127.5).sub_(1.0), "mean": mean[window].clone(),
                "logvar": logvar[window].clone() if logvar is not None else None, "key": record.key}


def check_crop(policy, size, factor, cache_dir):
    """Refuse a crop size that is not a multiple of the factor or does not fit every cached image."""
    if size % factor:
        raise VaekitError(f"data.size {size} must be a multiple of the cache's downsampling factor {factor} to cut "
                          f"latent-aligned crops from {cache_dir}.")
    sides = [policy["resolution"]] if policy["mode"] == "resolution" else [min(b) for b in policy["buckets"]]
    if size > min(sides):
        raise VaekitError(f"data.size {size} is larger than the images of {cache_dir} ({min(sides)} px at the "
                          f"smallest); use data.size={min(sides)} or less, or encode at a larger --resolution.")


def collate_pairs(batch):
    """Stack the good items -> {"pixels": (B, 3, S, S), "mean" / "logvar": (B, C, s, s) (logvar may be None),
    "keys", "errors"}; B may be 0 when every image of the batch was unusable."""
    good = [item for item in batch if "pixels" in item]
    errors = [{"key": item["key"], "error": item["error"]} for item in batch if "pixels" not in item]
    if not good:
        return {"pixels": torch.empty(0, 3, 0, 0), "mean": None, "logvar": None, "keys": [], "errors": errors}
    logvar = torch.stack([item["logvar"] for item in good]) if good[0]["logvar"] is not None else None
    return {"pixels": torch.stack([item["pixels"] for item in good]),
            "mean": torch.stack([item["mean"] for item in good]), "logvar": logvar,
            "keys": [item["key"] for item in good], "errors": errors}
