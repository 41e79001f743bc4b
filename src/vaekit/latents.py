"""Reading latent caches written by `vaekit encode`, latent statistics, and `vaekit stats`.

- `LatentDataset(cache_dir)`: a torch Dataset over a cache, reading memory-mapped shards lazily in
  each process, returning normalised latents (sampled from the stored posterior, or its mean) with
  their metadata; `BucketBatchSampler` batches same-shape items; `collate_latents` stacks them.
- `decode_samples(cache_dir, vae, keys or n)`: decode a few cached latents to images for spot checks.
- `latent_statistics(...)` / `suggest_normalization(stats)`: per-channel and global mean and std of
  latents, and the scaling_factor / shift_factor they imply; `write_normalization` exports a VAE
  with them in its config.
"""

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from vaekit.errors import VaekitError

FLIP_MODES = ("random", "none", "all")


# ----------------------------------------------------------------------------------------------
# Card and manifests


def read_card(cache_dir):
    """The cache's card.json as a dict; a clear error when `cache_dir` is no cache."""
    path = Path(cache_dir) / "card.json"
    if not path.is_file():
        raise VaekitError(f"{cache_dir} is not a latent cache (no card.json). Create one with `vaekit encode`.")
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VaekitError(f"{path} is unreadable ({e}); re-create the cache with `vaekit encode --overwrite`.") \
            from None
    return card


def parse_manifest(path):
    """(entries, torn line count) of one manifest file; a line without its newline was cut by a kill."""
    entries, torn = [], 0
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                torn += 1
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                torn += 1
    return entries, torn


def read_manifests(cache_dir):
    """Every manifest entry of a cache, all ranks and runs, in file order (torn lines skipped)."""
    entries = []
    for path in sorted(Path(cache_dir).glob("manifest-*.jsonl")):
        entries.extend(parse_manifest(path)[0])
    return entries


def current_entries(entries):
    """The newest entry per (key, flip), sorted by key then flip: an image encoded again supersedes the old one."""
    newest = {}
    for entry in entries:
        slot = (entry["key"], bool(entry["flip"]))
        if slot not in newest or int(entry.get("run", 0)) >= int(newest[slot].get("run", 0)):
            newest[slot] = entry
    return [newest[slot] for slot in sorted(newest)]


class ShardReader:
    """Memory-mapped safetensors shards, opened on first use in each process (open handles are not pickled)."""

    def __init__(self, root):
        self.root = Path(root)
        self.handles = {}

    def __getstate__(self):
        return {"root": self.root, "handles": {}}

    def handle(self, shard):
        """The open safe_open handle of a shard (relative path)."""
        if shard not in self.handles:
            from safetensors import safe_open

            path = self.root / shard
            try:
                self.handles[shard] = safe_open(str(path), framework="pt")
            except Exception as e:  # missing file or corrupt header
                raise VaekitError(f"Cannot read shard {path} ({e}); re-run `vaekit encode` to repair the cache.") \
                    from None
        return self.handles[shard]

    def row(self, entry, kind="mean"):
        """One sample's stored tensor (C, h, w) in the storage dtype."""
        offset = int(entry["offset"])
        return self.handle(entry["shard"]).get_slice(f"{kind}/{entry['group']}")[offset:offset + 1][0]

    def rows(self, shard, group, offsets, kind="mean"):
        """Several samples of one group of one shard, (N, C, h, w)."""
        return self.handle(shard).get_tensor(f"{kind}/{group}")[list(offsets)]


# ----------------------------------------------------------------------------------------------
# Dataset


def item_seed(seed, epoch, index):
    """A 63-bit seed for one item of one epoch, the same in every worker and process."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0] >> 1)


class LatentDataset(torch.utils.data.Dataset):
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

    def set_epoch(self, epoch):
        """Select the epoch whose samples and flips the next items get."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        index, epoch = (int(i) for i in index) if isinstance(index, (tuple, list)) else (int(index), self.epoch)
        variants = self.items[index]
        generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
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


class BucketBatchSampler(torch.utils.data.Sampler):
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

    def set_epoch(self, epoch):
        """Select the epoch whose shuffle the next iteration uses."""
        self.epoch = int(epoch)

    def _all_batches(self):
        rng = np.random.default_rng([self.seed, self.epoch])
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
    from vaekit.data import to_pil
    from vaekit.model import fingerprint

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


# ----------------------------------------------------------------------------------------------
# Statistics


class LatentMoments:
    """Running per-channel mean and variance of latents, merged batch by batch in float64.

    Batches are combined with the pairwise update of Chan, Golub & LeVeque (1979), which stays exact
    where a running sum of squares would cancel. With logvar, the posterior's variance adds E[sigma^2]
    (law of total variance): the statistics of z ~ N(mean, sigma^2) without drawing samples.
    """

    def __init__(self):
        self.count = 0  # elements per channel
        self.mean = None  # (C,)
        self.m2 = None  # (C,) sum of squared deviations from the mean
        self.sigma2 = None  # (C,) sum of exp(logvar)
        self.posterior = True  # every batch came with its logvar

    def update(self, mean, logvar=None):
        """Add a batch of latents (N, C, h, w) (or (C, h, w)), with the posterior's logvar when known."""
        if mean.dim() == 3:
            mean = mean[None]
            logvar = logvar[None] if logvar is not None else None
        channels = mean.shape[1]
        x = mean.detach().to("cpu", torch.float64).transpose(0, 1).reshape(channels, -1)  # (C, N*h*w)
        n = x.shape[1]
        if n == 0:
            return self
        batch_mean = x.mean(1)
        batch_m2 = ((x - batch_mean[:, None]) ** 2).sum(1)
        if self.mean is None:
            self.mean, self.m2 = batch_mean, batch_m2
            self.sigma2 = torch.zeros(channels, dtype=torch.float64)
        else:
            if channels != self.mean.shape[0]:
                raise VaekitError(f"Latents with {channels} channels mixed with {self.mean.shape[0]}-channel ones.")
            total = self.count + n
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
        self.count += n
        if logvar is None:
            self.posterior = False
        else:
            sigma2 = logvar.detach().to("cpu", torch.float64).exp().transpose(0, 1).reshape(channels, -1)
            self.sigma2 += sigma2.sum(1)
        return self

    def result(self, of="auto"):
        """Statistics as a dict: of ("posterior" or "mean"), channels, count, mean, std, global_mean, global_std."""
        if self.mean is None:
            raise VaekitError("No latents to compute statistics from.")
        if of == "auto":
            of = "posterior" if self.posterior else "mean"
        if of == "posterior" and not self.posterior:
            raise VaekitError("Posterior statistics need the logvar of every latent; use of='mean'.")
        var = self.m2 / self.count
        if of == "posterior":
            var = var + self.sigma2 / self.count
        # Every channel has the same count, so the global mean is the mean of channel means, and the
        # global variance adds the spread of channel means to the mean channel variance.
        global_mean = self.mean.mean()
        global_var = (var + (self.mean - global_mean) ** 2).mean()
        return {
            "of": of,
            "channels": int(self.mean.shape[0]),
            "count": int(self.count),
            "mean": self.mean.tolist(),
            "std": var.sqrt().tolist(),
            "global_mean": float(global_mean),
            "global_std": float(global_var.sqrt()),
        }


def latent_statistics(latents, logvar=None, of="auto"):
    """Per-channel and global mean/std of latents.

    `latents`: a tensor (N, C, h, w), or an iterable of such tensors or of (mean, logvar) pairs
    (shapes may differ between batches). of: "posterior" (z ~ N(mean, exp(logvar)), as Stable
    Diffusion measured its scaling factor on sampled latents), "mean", or "auto" (posterior when
    logvar is given). Returns the dict of `LatentMoments.result`.
    """
    moments = LatentMoments()
    if torch.is_tensor(latents):
        moments.update(latents, logvar)
    else:
        for batch in latents:
            if isinstance(batch, (tuple, list)):
                moments.update(batch[0], batch[1] if len(batch) > 1 else None)
            else:
                moments.update(batch)
    return moments.result(of)


def suggest_normalization(stats):
    """scaling_factor = 1 / global std and shift_factor = global mean (with per-channel latents_mean/std)."""
    return {
        "scaling_factor": 1.0 / stats["global_std"],
        "shift_factor": stats["global_mean"],
        "latents_mean": list(stats["mean"]),
        "latents_std": list(stats["std"]),
    }


def cache_statistics(cache_dir, of="auto"):
    """Statistics of the current latents of a cache (every stored variant, flips included)."""
    store = read_card(cache_dir)["key"]["store"]
    reader = ShardReader(cache_dir)
    groups = {}
    for entry in current_entries(read_manifests(cache_dir)):
        groups.setdefault((entry["shard"], entry["group"]), []).append(int(entry["offset"]))
    if not groups:
        raise VaekitError(f"The cache {cache_dir} holds no latents yet.")
    moments = LatentMoments()
    for (shard, group), offsets in sorted(groups.items()):
        mean = reader.rows(shard, group, offsets, "mean")
        logvar = reader.rows(shard, group, offsets, "logvar") if store == "mean_logvar" else None
        moments.update(mean, logvar)
    return moments.result(of)


def data_statistics(vae, config, of="auto", progress=True):
    """Statistics of `vae`'s latents of the images of an EncodeConfig (encoded on the fly, nothing written)."""
    from tqdm.auto import tqdm

    from vaekit.encode import (Encoder, PreparedImages, make_loader, open_data, resolve_compute_dtype, size_policy,
                               stream_latents)
    from vaekit.model import downsample_factor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = size_policy(config, downsample_factor(vae))
    source = open_data(config)
    dataset = PreparedImages(source, policy, config.background, config.max_pixels)
    encoder = Encoder(vae, device, resolve_compute_dtype(config.compute_dtype, device), config.channels_last,
                      config.compile, config.tile)
    counters = {"encoded": 0, "skipped": 0, "errors": 0}
    moments = LatentMoments()
    chunks = iter(make_loader(dataset, config.batch_size, config.num_workers, device.type == "cuda"))
    with tqdm(total=len(source), unit="img", desc="stats", disable=not progress) as bar:
        for item in stream_latents(encoder, chunks, config, counters, bar):
            if item[0] == "latents":
                _, _, mean, logvar = item
                finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(logvar).flatten(1).all(1)
                moments.update(mean[finite], logvar[finite])
    result = moments.result(of)
    result["images"] = counters["encoded"]
    result["errors"] = counters["errors"]
    return result


def write_normalization(vae, suggestion, out_dir):
    """Export `vae` as a diffusers folder whose config holds the suggested normalisation; returns the path."""
    from diffusers import AutoencoderKL

    from vaekit.model import save_diffusers, vae_config

    config = {**vae_config(vae), **{k: suggestion[k] for k in ("scaling_factor", "shift_factor", "latents_mean",
                                                               "latents_std")}}
    model = AutoencoderKL(**config)
    model.load_state_dict(vae.state_dict())
    return save_diffusers(model, out_dir)


# ----------------------------------------------------------------------------------------------
# Command line


def format_statistics(stats, suggestion, current):
    """The stats table printed by `vaekit stats`."""
    what = "posterior samples z ~ N(mean, exp(logvar))" if stats["of"] == "posterior" else "posterior means"
    lines = [f"latent statistics of {what}: {stats['channels']} channels, {stats['count']:,} values per channel",
             f"{'channel':>8}  {'mean':>10}  {'std':>10}"]
    for c, (m, s) in enumerate(zip(stats["mean"], stats["std"])):
        lines.append(f"{c:>8}  {m:>10.5f}  {s:>10.5f}")
    lines.append(f"{'global':>8}  {stats['global_mean']:>10.5f}  {stats['global_std']:>10.5f}")
    lines.append(f"suggested: scaling_factor = 1/std = {suggestion['scaling_factor']:.6g}, "
                 f"shift_factor = mean = {suggestion['shift_factor']:.6g}")
    if current is not None:
        lines.append(f"current:   scaling_factor = {current[0]:.6g}, shift_factor = {current[1]:.6g}")
    return "\n".join(lines)


def run_stats(args):
    """`vaekit stats`: latent statistics of a cache or of a VAE on images; optionally export the VAE with them."""
    from vaekit.encode import EncodeConfig, config_from_args, load_encoder_vae
    from vaekit.model import fingerprint, scale_shift

    if bool(args.cache) == bool(args.data):
        raise VaekitError("Pass either a cache folder (vaekit stats CACHE) or --vae MODEL --data SRC.")
    vae = None
    if args.cache:
        card = read_card(args.cache)
        stats = cache_statistics(args.cache, args.of)
        current = (card["key"]["scaling_factor"], card["key"]["shift_factor"] or 0.0)
        if args.write:
            if args.vae:
                vae = load_encoder_vae(config_from_args(args))
            else:  # the VAE the card names, loaded as `vaekit encode` loaded it
                source = card.get("vae", {})
                vae = load_encoder_vae(EncodeConfig(vae=source.get("source") or "", override=source.get("override", []),
                                                    weights=source.get("weights", "ema")))
            if fingerprint(vae) != card["key"]["vae_fingerprint"]:
                raise VaekitError(f"This VAE is not the one that encoded {args.cache}; pass that one with --vae.")
    else:
        if not args.vae:
            raise VaekitError("--data needs --vae MODEL: the VAE whose latents to measure.")
        config = config_from_args(args)
        config.dtype = "fp32"
        vae = load_encoder_vae(config)
        current = scale_shift(vae)
        stats = data_statistics(vae, config, args.of, progress=not args.json)
    suggestion = suggest_normalization(stats)
    if args.json:
        print(json.dumps({"statistics": stats, "suggested": suggestion}, indent=2))
    else:
        print(format_statistics(stats, suggestion, current))
    if args.write:
        path = write_normalization(vae.float(), suggestion, args.write)
        if not args.json:
            print(f"wrote the VAE with this normalisation (and per-channel latents_mean/latents_std) to {path}")
    return 0


def add_commands(subparsers):
    """Register `vaekit stats`."""
    from vaekit.commands import add_model_arguments
    from vaekit.encode import add_pipeline_arguments

    p = subparsers.add_parser(
        "stats", help="latent mean/std per channel; suggests scaling_factor and shift_factor",
        description="Per-channel and global mean and standard deviation of latents, from a cache made by "
                    "`vaekit encode` or from --vae MODEL --data SRC, and the normalisation they imply "
                    "(scaling_factor = 1/std, shift_factor = mean). --write DIR exports the VAE with it.",
    )
    p.add_argument("cache", nargs="?", help="a latent cache folder (or give --data)")
    add_model_arguments(p, name="vae", positional=False, required=False,
                        help_text="the VAE (with --data; with a cache, only for --write, default: the cache's)")
    p.add_argument("--data", help="images to encode on the fly instead of a cache")
    add_pipeline_arguments(p)
    p.add_argument("--of", choices=["auto", "posterior", "mean"], default="auto",
                   help="statistics of posterior samples (auto, when logvar is known) or of the means")
    p.add_argument("--write", metavar="DIR",
                   help="export the VAE with the suggested normalisation as a diffusers folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_stats)
