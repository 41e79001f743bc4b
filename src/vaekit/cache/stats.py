"""Latent statistics: per-channel and global mean and std, and the scaling/shift factors they imply (`vaekit stats`)."""

import torch
from tqdm.auto import tqdm

from vaekit.cache.encode import open_data, stream_latents
from vaekit.cache.format import size_policy
from vaekit.cache.reader import CacheUnits, map_part
from vaekit.cache.units import Preparer, UnitStream
from vaekit.codec.inference import BulkEncoder
from vaekit.device import resolve_compute_dtype, resolve_device
from vaekit.errors import VaekitError
from vaekit.model.architecture import copy_vae, downsample_factor, is_tiny
from vaekit.model.load import save_diffusers
from vaekit.moments import RunningMoments


class LatentMoments:
    """Running per-channel mean and variance of latents, merged batch by batch in float64.

    With logvar, the posterior's variance adds E[sigma^2]
    (law of total variance): the statistics of z ~ N(mean, sigma^2) without drawing samples.
    """

    def __init__(self):
        self.moments = RunningMoments()  # (C,) over images and positions
        self.sigma2 = None  # (C,) sum of exp(logvar)
        self.posterior = True  # every batch came with its logvar

    @property
    def count(self):
        """Values per channel seen so far."""
        return self.moments.count

    def update(self, mean, logvar=None):
        """Add a batch of latents (N, C, h, w) (or (C, h, w)), with the posterior's logvar when known."""
        if mean.dim() == 3:
            mean = mean[None]
            logvar = logvar[None] if logvar is not None else None
        channels = mean.shape[1]
        if self.moments.mean is not None and channels != self.moments.mean.shape[0]:
            raise VaekitError(f"Latents with {channels} channels mixed with {self.moments.mean.shape[0]}-channel ones.")
        if mean.numel() == 0:
            return self
        self.moments.add(mean.detach().cpu().transpose(0, 1).reshape(channels, -1), dim=1)  # (C, N*h*w)
        if self.sigma2 is None:
            self.sigma2 = torch.zeros(channels, dtype=torch.float64)
        if logvar is None:
            self.posterior = False
        else:
            self.sigma2 += logvar.detach().to("cpu", torch.float64).exp().transpose(0, 1).reshape(channels, -1).sum(1)
        return self

    def result(self, of="auto"):
        """Statistics as a dict: of ("posterior" or "mean"), channels, count, mean, std, global_mean, global_std."""
        if self.moments.mean is None:
            raise VaekitError("No latents to compute statistics from.")
        if of == "auto":
            of = "posterior" if self.posterior else "mean"
        if of == "posterior" and not self.posterior:
            raise VaekitError("Posterior statistics need the logvar of every latent; use of='mean'.")
        mean, var = self.moments.mean, self.moments.variance()
        if of == "posterior":
            var = var + self.sigma2 / self.count
        # Every channel has the same count, so the global mean is the mean of channel means, and the
        # global variance adds the spread of channel means to the mean channel variance.
        global_mean = mean.mean()
        global_var = (var + (mean - global_mean) ** 2).mean()
        return {
            "of": of,
            "channels": int(mean.shape[0]),
            "count": int(self.count),
            "mean": mean.tolist(),
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
    """Statistics of the latents of a cache (every stored variant, flips included), read part by part.

    Through the checked reader (vaekit.cache.reader), as every other reader: a damaged unit is one
    error naming it. Every row of a part is a current latent, so whole tensors are read.
    """
    units = CacheUnits(cache_dir, rebuild=False)
    moments = LatentMoments()
    for slot in range(len(units.units)):
        index = units.index(slot)
        for part in index.parts:
            tensors = map_part(units.root, index.unit, part, units.card, index.records.get(part))
            for name, mean in sorted(tensors.items()):
                if name.startswith("mean/"):
                    moments.update(mean, tensors.get("logvar/" + name[5:]))
    if moments.moments.mean is None:
        raise VaekitError(f"The cache {cache_dir} holds no latents yet.")
    return moments.result(of)


def data_statistics(vae, config, of="auto", progress=True):
    """Statistics of `vae`'s latents of the images of an EncodeConfig (encoded on the fly, nothing written)."""
    device = resolve_device("auto")
    policy = size_policy(config, downsample_factor(vae))
    plan = open_data(config)
    stream = UnitStream(plan, range(plan.count), Preparer(policy, config.background, config.max_pixels),
                        config.batch_size)
    encoder = BulkEncoder(vae, device, resolve_compute_dtype(config.compute_dtype, device), config.channels_last,
                          config.compile, config.tile)
    counters = {"encoded": 0, "errors": 0}
    moments = LatentMoments()
    workers = config.num_workers if plan.kind == "indexed" else min(config.num_workers, plan.count)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    total = len(plan.source) if plan.kind == "indexed" else None
    with tqdm(total=total, unit="img", desc="stats", disable=not progress) as bar:
        for item in stream_latents(encoder, iter(loader), config, counters, bar):
            if item[0] == "latents":
                mean, logvar = item[3], item[4]
                finite = torch.isfinite(mean).flatten(1).all(1)
                if logvar is not None:
                    finite &= torch.isfinite(logvar).flatten(1).all(1)
                moments.update(mean[finite], logvar[finite] if logvar is not None else None)
    result = moments.result(of)
    result["images"] = counters["encoded"]
    result["errors"] = counters["errors"]
    return result


def write_normalization(vae, suggestion, out_dir):
    """Export `vae` as a diffusers folder whose config holds the suggested normalisation; returns the path."""
    if is_tiny(vae):
        raise VaekitError("An AutoencoderTiny's latents are its teacher's normalised latents (scaling_factor 1.0 by "
                          "diffusers' TAESD convention): normalise the teacher instead (vaekit export TEACHER -o "
                          "scaling_factor=... -o shift_factor=...), and distil the tiny model from it.")
    keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
    return save_diffusers(copy_vae(vae, {k: suggestion[k] for k in keys}), out_dir)
