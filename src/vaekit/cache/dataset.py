"""Reading a latent cache for diffusion training: `LatentDataset`, same-shape batching, spot-check decodes."""

import warnings
from pathlib import Path

import numpy as np
import torch

from vaekit.cache.format import ShardReader, current_entries, read_card, read_manifests
from vaekit.data.crops import to_pil
from vaekit.errors import VaekitError
from vaekit.model.architecture import fingerprint
from vaekit.seeds import EpochSeeded, numpy_rng, torch_generator


FLIP_MODES = ("random", "none", "all")


class LatentDataset(EpochSeeded, torch.utils.data.Dataset):
    """Cached latents as {"latents": (C, h, w) float32, "key", "flip", "bucket", "original_size", "crop_box", "path"}.

    sample: draw z = mean + exp(logvar / 2) * eps from the stored posterior (default when the cache
    stores it), else use the mean. normalize: apply the VAE's latent normalisation recorded in the
    card, (z - shift_factor) * scaling_factor, as diffusion models are trained on. flips, for caches
    encoded with --flip: "random" picks the plain or mirrored latents per item and epoch, "none" uses
    the plain ones only, "all" makes every variant its own item. Randomness is seeded by (seed,
    epoch, index): call `set_epoch`, or index with (index, epoch) pairs.
    """

    def __init__(self, cache_dir, sample=None, normalize=True, seed=0, flips="random", keys=None):
        if flips not in FLIP_MODES:
            raise VaekitError(f"flips must be one of {', '.join(FLIP_MODES)}, got {flips!r}.")
        self.cache_dir = Path(cache_dir)
        self.card = read_card(cache_dir)
        key = self.card["key"]
        self.store = key["store"]
        if sample is None:
            sample = self.store == "mean_logvar"
        if sample and self.store != "mean_logvar":
            raise VaekitError(f"{cache_dir} stores only the posterior's mode (--store mode); pass sample=False.")
        self.sample, self.normalize, self.seed, self.epoch = bool(sample), bool(normalize), int(seed), 0
        self.scaling_factor, self.shift_factor = float(key["scaling_factor"]), float(key["shift_factor"] or 0.0)
        entries = current_entries(read_manifests(cache_dir))
        if flips == "all":
            items = [[e] for e in entries]
        else:
            by_key = {}
            for entry in entries:
                if flips == "random" or not entry["flip"]:
                    by_key.setdefault(entry["key"], []).append(entry)
            items = list(by_key.values())
        if keys is not None:
            wanted = list(keys)
            index = {}
            for item in items:
                index.setdefault(item[0]["key"], []).append(item)
            missing = [k for k in wanted if k not in index]
            if missing:
                raise VaekitError(f"Key '{missing[0]}' is not in the cache {cache_dir} ({len(missing)} missing).")
            items = [item for k in wanted for item in index[k]]
        self.items = items
        self.keys = [item[0]["key"] for item in items]
        self.buckets = [tuple(item[0]["bucket"]) for item in items]
        self.reader = ShardReader(self.cache_dir)


    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        index, epoch = self.index_and_epoch(index)
        variants = self.items[index]
        generator = torch_generator(self.seed, epoch, index)
        entry = variants[int(torch.randint(len(variants), (1,), generator=generator))] if len(variants) > 1 \
            else variants[0]
        z = self.reader.row(entry, "mean").float()  # (C, h, w)
        if self.sample:
            std = self.reader.row(entry, "logvar").float().mul(0.5).exp()
            z = z + std * torch.randn(z.shape, generator=generator)
        if self.normalize:
            z = (z - self.shift_factor) * self.scaling_factor
        return {"latents": z, "key": entry["key"], "flip": bool(entry["flip"]), "bucket": tuple(entry["bucket"]),
                "original_size": tuple(entry["original_size"]), "crop_box": tuple(entry["crop_box"]),
                "path": entry.get("path")}


def collate_latents(items):
    """Stack same-shape items -> {"latents": (B, C, h, w), and each metadata field as a list}."""
    shapes = {tuple(item["latents"].shape) for item in items}
    if len(shapes) > 1:
        raise VaekitError(f"A batch mixes latent shapes {sorted(shapes)}; batch with BucketBatchSampler.")
    batch = {"latents": torch.stack([item["latents"] for item in items])}
    for name in items[0]:
        if name != "latents":
            batch[name + "s" if not name.endswith("s") else name] = [item[name] for item in items]
    return batch


class BucketBatchSampler(EpochSeeded, torch.utils.data.Sampler):
    """Batches of indices whose items share a bucket (latent shape), shuffled per epoch.

    `buckets` is a LatentDataset (its `.buckets`) or a list with one bucket per index. Under DDP pass
    num_replicas and rank: every process gets the same number of batches, disjoint from the others.
    """

    def __init__(self, buckets, batch_size, shuffle=True, drop_last=False, seed=0, num_replicas=1, rank=0):
        self.buckets = list(getattr(buckets, "buckets", buckets))
        if batch_size < 1:
            raise VaekitError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise VaekitError(f"rank {rank} is outside 0..{num_replicas - 1}.")
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        self.groups = {}
        for index, bucket in enumerate(self.buckets):
            self.groups.setdefault(tuple(bucket), []).append(index)


    def _all_batches(self):
        rng = numpy_rng(self.seed, self.epoch)
        batches = []
        for bucket in sorted(self.groups):
            indices = np.array(self.groups[bucket])
            if self.shuffle:
                indices = indices[rng.permutation(len(indices))]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.num_replicas  # equal batch counts keep DDP in step
        return batches[:usable]

    def __iter__(self):
        yield from self._all_batches()[self.rank::self.num_replicas]

    def __len__(self):
        return len(self._all_batches()) // self.num_replicas


def load_latents(cache_dir, key, flip=False):
    """The stored (mean, logvar or None) of one image, float32 (C, h, w), not normalised."""
    entries = [e for e in current_entries(read_manifests(cache_dir)) if e["key"] == key and bool(e["flip"]) == flip]
    if not entries:
        raise VaekitError(f"Key '{key}' (flip={flip}) is not in the cache {cache_dir}.")
    reader = ShardReader(cache_dir)
    mean = reader.row(entries[0], "mean").float()
    logvar = reader.row(entries[0], "logvar").float() if read_card(cache_dir)["key"]["store"] == "mean_logvar" else None
    return mean, logvar


@torch.inference_mode()
def decode_samples(cache_dir, vae, keys=None, n=4, device=None):
    """Decode the stored means of `keys` (or the first `n` keys) -> {key: RGB PIL image}, for spot checks."""
    card = read_card(cache_dir)
    channels = card.get("vae", {}).get("latent_channels")
    if channels is not None and channels != vae.config.latent_channels:
        raise VaekitError(f"The cache holds {channels}-channel latents but this VAE decodes "
                          f"{vae.config.latent_channels}; pass the VAE the cache was encoded with.")
    if fingerprint(vae) != card["key"]["vae_fingerprint"]:
        warnings.warn("Decoding with a VAE other than the one that encoded the cache (fine for a fine-tuned "
                      "decoder; otherwise the images will be wrong).", stacklevel=2)
    dataset = LatentDataset(cache_dir, sample=False, normalize=False, flips="none", keys=keys)
    count = len(dataset) if keys is not None else min(n, len(dataset))
    device = device or next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    images = {}
    for index in range(count):
        item = dataset[index]
        decoded = vae.decode(item["latents"][None].to(device, dtype)).sample  # (1, 3, H, W)
        images[item["key"]] = to_pil(decoded[0])
    return images
