"""Reading a latent cache for diffusion training: `LatentDataset` (random access), `LatentStream`
(iterable, unit-shuffled), same-shape batching and spot-check decodes.

Opening a cache reads its catalog (one small file) or, for a cache still being written, the schema
of each unit index: time and memory grow with the number of units, not of images. Unit indices are
memory-mapped Arrow files and latents memory-mapped safetensors parts, both opened on first use in
each process (DataLoader workers included) and kept in small LRU caches, so a data set of 10^8
images costs what the pages touched cost. Every file goes through vaekit.cache.reader, whose checks
turn any damage into one VaekitError naming the unit (never a wrong tensor).
"""

import warnings

from pathlib import Path

import numpy as np
import torch

from vaekit.cache.format import bucket_codes, bucket_name
from vaekit.cache.reader import CacheUnits, PartReader, open_card
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
    the plain ones only, "all" makes every variant its own item. keys: only these images, in this
    order. Randomness is seeded by (seed, epoch, index): call `set_epoch`, or index with (index,
    epoch) pairs (BucketBatchSampler does). verify: hash each part when a process first maps it (every
    byte read once; for small caches or a copied cache's first pass): without it, reads check sizes,
    headers and indices, and a flipped bit inside latent data is `vaekit cache verify`'s to find.
    """

    def __init__(self, cache_dir, sample=None, normalize=True, seed=0, flips="random", keys=None, verify=False):
        if flips not in FLIP_MODES:
            raise VaekitError(f"flips must be one of {', '.join(FLIP_MODES)}, got {flips!r}.")
        self.cache_dir = Path(cache_dir)
        info = self.info = open_card(cache_dir)
        self.card = info.card
        self.store = info.store
        if sample is None:
            sample = self.store == "mean_logvar"
        if sample and self.store != "mean_logvar":
            raise VaekitError(f"{cache_dir} stores only the posterior's mode (--store mode); pass sample=False.")
        self.sample, self.normalize, self.seed, self.epoch = bool(sample), bool(normalize), int(seed), 0
        self.scaling_factor, self.shift_factor = info.scaling_factor, info.shift_factor
        self.flips = flips
        self.variants = 2 if flips == "all" and info.flip else 1
        self.index = CacheUnits(cache_dir, info)
        self.selection = None if keys is None else self.positions_of(list(keys))
        self.reader = PartReader(self.cache_dir, info, verify=verify)

    def __len__(self):
        images = len(self.index) if self.selection is None else len(self.selection)
        return images * self.variants

    def positions_of(self, wanted):
        """Global image positions of `wanted` keys, in that order (reads the key columns once)."""
        import pyarrow as pa  # loaded only when selecting by key
        import pyarrow.compute as pc

        lookup = pa.array(wanted, pa.string())
        found = {}
        for slot in range(len(self.index.units)):
            _, table, _ = self.index.unit(slot)
            hits = pc.index_in(table.column("key"), value_set=lookup).fill_null(-1).to_numpy()
            for row in np.flatnonzero(hits >= 0):
                found.setdefault(wanted[int(hits[row])], int(self.index.starts[slot] + row))
        missing = [k for k in wanted if k not in found]
        if missing:
            raise VaekitError(f"Key '{missing[0]}' is not in the cache {self.cache_dir} ({len(missing)} missing).")
        return np.array([found[k] for k in wanted], dtype=np.int64)

    def locate(self, index):
        """(unit slot, row, variant) of item `index`."""
        image, variant = divmod(index, self.variants)
        position = image if self.selection is None else int(self.selection[image])
        return (*self.index.locate(position), variant)

    @property
    def keys(self):
        """Every item's key, in item order (O(items) memory: for small caches and checks)."""
        return [self.field(i, "key") for i in range(len(self))]

    @property
    def buckets(self):
        """(items, 2) int array of each item's bucket (W, H), for BucketBatchSampler."""
        parts = []
        for slot in range(len(self.index.units)):
            columns, _, _ = self.index.unit(slot)
            parts.append(np.stack([columns["bucket_w"], columns["bucket_h"]], axis=1))
        every = np.concatenate(parts) if parts else np.zeros((0, 2), np.int32)
        if self.selection is not None:
            every = every[self.selection]
        return np.repeat(every, self.variants, axis=0)

    def read(self, slot, part, group, offset, kind="mean"):
        """One stored tensor (C, h, w) of the unit in `slot`, through the checked part reader."""
        index = self.index.index(slot)
        name = index.parts[part]
        return self.reader.row(index.unit, name, group, offset, kind, index.records.get(name))

    def stored(self, index, flip=False):
        """The stored (mean, logvar or None) of item `index` (or its mirror), float32 (C, h, w), not normalised."""
        slot, row, _ = self.locate(index)
        columns, table, meta = self.index.unit(slot)
        offset = int(columns["flip_offset"][row] if flip else columns["offset"][row])
        if offset < 0:
            raise VaekitError(f"'{columns['key'][row]}' has no mirrored latents in {self.cache_dir}: "
                              "it was encoded without --flip.")
        part = int(columns["part"][row])
        group = bucket_name(int(columns["bucket_w"][row]), int(columns["bucket_h"][row]))
        mean = self.read(slot, part, group, offset, "mean").float()
        logvar = self.read(slot, part, group, offset, "logvar").float() if self.store == "mean_logvar" else None
        return mean, logvar

    def field(self, index, name):
        """One index column of item `index` (key, path, ...)."""
        slot, row, _ = self.locate(index)
        columns, _, _ = self.index.unit(slot)
        value = columns[name][row]
        return value.item() if isinstance(value, np.generic) else value

    def __getitem__(self, index):
        index, epoch = self.index_and_epoch(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside this cache's {len(self)} items")
        slot, row, variant = self.locate(index)
        columns, _, _ = self.index.unit(slot)
        part, width, height, offset, flip_offset, *sizes = columns.record(row)
        random_flip = self.variants == 1 and self.flips == "random" and flip_offset >= 0
        # Only items that draw something pay for a generator (seeded by (seed, epoch, index) either way).
        generator = torch_generator(self.seed, epoch, index) if random_flip or self.sample else None
        if self.variants == 2:
            flip = variant == 1
        elif random_flip:
            flip = bool(torch.randint(2, (1,), generator=generator))
        else:
            flip = False
        offset = flip_offset if flip else offset
        bucket = (width, height)
        group = bucket_name(*bucket)
        z = self.read(slot, part, group, offset, "mean").float()  # (C, h, w)
        if self.sample:
            std = self.read(slot, part, group, offset, "logvar").float().mul(0.5).exp()
            z = z + std * torch.randn(z.shape, generator=generator)
        if self.normalize:
            z = (z - self.shift_factor) * self.scaling_factor
        return {"latents": z, "key": columns["key"][row], "flip": flip, "bucket": bucket,
                "original_size": tuple(sizes[:2]), "crop_box": tuple(sizes[2:]), "path": columns["path"][row]}


def distributed_rank_world(rank=None, world=None):
    """(rank, world) given, else from torch.distributed when it is initialised, else (0, 1)."""
    if rank is not None and world is not None:
        return rank, world
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class LatentStream(EpochSeeded, torch.utils.data.IterableDataset):
    """A cache read unit by unit: units shuffled per epoch, split by rank and DataLoader worker.

    Each (rank, worker) reads whole units, its rows shuffled within the unit, so reads stay local
    to one index and a few parts. With `batch_size`, yields same-bucket batches (collate_latents)
    formed within each unit; else single items as LatentDataset gives them. Every item is read by
    exactly one (rank, worker) per epoch; ranks may get different item counts (units differ in size),
    so under DDP bound the steps per epoch, or use LatentDataset with BucketBatchSampler.
    """

    def __init__(self, cache_dir, batch_size=None, shuffle=True, seed=0, rank=None, world=None, drop_last=False,
                 **dataset_options):
        self.dataset = LatentDataset(cache_dir, seed=seed, **dataset_options)
        if self.dataset.selection is not None:
            raise VaekitError("LatentStream reads whole units; select keys with LatentDataset instead.")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, int(seed), drop_last
        self.rank, self.world = distributed_rank_world(rank, world)

    def units_of(self, rank, worker=0, workers=1):
        """The unit slots (rank, worker) reads this epoch."""
        slots = np.arange(len(self.dataset.index.units))
        if self.shuffle:
            slots = slots[numpy_rng(self.seed, self.epoch).permutation(len(slots))]
        return slots[rank::self.world][worker::workers]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        variants, index = self.dataset.variants, self.dataset.index
        for slot in self.units_of(self.rank, worker, workers):
            start, stop = int(index.starts[slot]) * variants, int(index.starts[slot + 1]) * variants
            items = np.arange(start, stop)
            if self.shuffle:
                items = items[numpy_rng(self.seed, self.epoch, int(slot)).permutation(len(items))]
            if not self.batch_size:
                for i in items:
                    yield self.dataset[(int(i), self.epoch)]
                continue
            columns, _, _ = index.unit(slot)
            codes = bucket_codes(np.stack([columns["bucket_w"], columns["bucket_h"]], axis=1))
            codes = codes[(items - start) // variants]
            for code in np.unique(codes):
                same = items[codes == code]
                for b in range(0, len(same), self.batch_size):
                    batch = same[b:b + self.batch_size]
                    if len(batch) == self.batch_size or not self.drop_last:
                        yield collate_latents([self.dataset[(int(i), self.epoch)] for i in batch])


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

    `buckets` is a LatentDataset (its `.buckets`) or one (W, H) bucket per index. Under DDP pass
    num_replicas and rank: every process gets the same number of batches, disjoint from the others.
    Indices live in numpy arrays (8 bytes per item), not Python lists.
    """

    def __init__(self, buckets, batch_size, shuffle=True, drop_last=False, seed=0, num_replicas=1, rank=0):
        buckets = getattr(buckets, "buckets", buckets)
        if batch_size < 1:
            raise VaekitError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise VaekitError(f"rank {rank} is outside 0..{num_replicas - 1}.")
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        codes = bucket_codes(buckets) if len(buckets) else np.zeros(0, np.int64)
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        self.groups = np.split(order, bounds) if len(order) else []  # indices per bucket, ascending bucket code

    def _all_batches(self):
        rng = numpy_rng(self.seed, self.epoch)
        batches = []
        for indices in self.groups:
            if self.shuffle:
                indices = indices[rng.permutation(len(indices))]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.num_replicas  # equal batch counts keep DDP in step
        return batches[:usable]

    def __iter__(self):
        for batch in self._all_batches()[self.rank::self.num_replicas]:
            yield batch.tolist()

    def __len__(self):
        return len(self._all_batches()) // self.num_replicas


def load_latents(cache_dir, key, flip=False):
    """The stored (mean, logvar or None) of one image, float32 (C, h, w), not normalised."""
    return LatentDataset(cache_dir, sample=False, normalize=False, flips="none", keys=[key]).stored(0, flip)


@torch.inference_mode()
def decode_samples(cache_dir, vae, keys=None, n=4, device=None):
    """Decode the stored means of `keys` (or the first `n` images) -> {key: RGB PIL image}, for spot checks."""
    dataset = LatentDataset(cache_dir, sample=False, normalize=False, flips="none", keys=keys)
    channels = dataset.info.channels
    if channels is not None and channels != vae.config.latent_channels:
        raise VaekitError(f"The cache holds {channels}-channel latents but this VAE decodes "
                          f"{vae.config.latent_channels}; pass the VAE the cache was encoded with.")
    if fingerprint(vae) != dataset.card["key"].get("vae_fingerprint"):
        warnings.warn("Decoding with a VAE other than the one that encoded the cache (fine for a fine-tuned "
                      "decoder; otherwise the images will be wrong).", stacklevel=2)
    count = len(dataset) if keys is not None else min(n, len(dataset))
    device = device or next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    images = {}
    for index in range(count):
        item = dataset[index]
        decoded = vae.decode(item["latents"][None].to(device, dtype)).sample  # (1, 3, H, W)
        images[item["key"]] = to_pil(decoded[0])
    return images
