"""`vaekit inspect`: diagnostics of a VAE's latent space and of its fp16 safety.

inspect reports, per latent channel:
- KL(q(z|x) || N(0, I)) in closed form, per latent element (nats), averaged over the data;
- mean and std of the posterior means E[z|x] over images and positions;
- activity Cov_x(E[z|x]) (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
  Autoencoders", section 5.2): the variance across images of each unit's posterior mean, a unit
  being (channel, position) of the latent grid, averaged over positions; a channel whose
  activity is at most 0.01 is inactive. Inactive channels or a total KL near zero mean posterior
  collapse: the decoder gets no information about the image through them;
- histograms of the latents as a diffusion model sees them (normalised by the config's scale/shift);
- suggested scaling and shift factors measured on the data (vaekit.cache.stats, as `vaekit stats`).

- diffusability (vaekit.eval.diffusability): the latents' radially averaged power spectrum against
  the images', the share of energy above half the Nyquist frequency, the equivariance error
  (decode of a 2x-downscaled or rotated latent against the same transform of the image, PSNR) and
  a one-line verdict; with several models, side by side.

inspect --precision reports instead, per layer, the largest absolute activation of an fp32 encode and
decode of the images against float16's largest finite value: a layer above it overflows in fp16
(the SDXL VAE's black images), while bfloat16 has float32's range and only loses mantissa.
"""

import dataclasses
import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaekit.cache.stats import LatentMoments, suggest_normalization
from vaekit.codec.inference import decode, encode
from vaekit.data.batching import decoded_batches
from vaekit.data.crops import resize_center_crop, to_tensor
from vaekit.data.sources import open_source
from vaekit.device import resolve_device
from vaekit.errors import VaekitError
from vaekit.eval import report
from vaekit.eval.config import unique_labels
from vaekit.eval.diffusability import DiffusabilityStatistics, spectrum_figure
from vaekit.io import write_json
from vaekit.model.activations import FP16_MAX, ActivationPeaks
from vaekit.model.architecture import downsample_factor, is_tiny
from vaekit.model.latents import kl_divergence
from vaekit.model.load import load_vae
from vaekit.model.normalization import normalize_latents, scale_shift
from vaekit.moments import RunningMoments


ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Cov_x(E[z|x]) > 0.01


KL_COLLAPSE_NATS = 0.01  # mean KL per latent element below this: the posterior is (nearly) the prior


HISTOGRAM_VALUES = 1 << 16  # about this many latent values per channel are kept for the histograms


HISTOGRAM_BINS = 60


# An activation above this fraction of FP16_MAX on the sample images may overflow on other images.
FP16_MARGIN = 0.25


class LatentStatistics:
    """Streaming per-channel statistics of posteriors over a data set (all latent grids the same shape)."""

    def __init__(self, keep_per_image):
        self.images = 0
        self.keep_per_image = keep_per_image  # latent values per channel and image kept for histograms
        self.kl = None  # (C,) sum of elementwise KL
        self.std_sum = None  # (C,) sum of posterior std
        self.moments = LatentMoments()  # per-channel statistics of the means and of z ~ q(z|x) (as `vaekit stats`)
        self.units = RunningMoments()  # (C, h, w) statistics of E[z|x] across images: the activity
        self.kept = []  # [(C, k)] sampled latent values for the histograms
        self.shape = None

    def update(self, mean, logvar, generator):
        """Add a batch of posteriors, mean and logvar (B, C, h, w)."""
        mean, logvar = mean.double().cpu(), logvar.double().cpu()
        if self.shape is None:
            self.shape = tuple(mean.shape[1:])
            self.kl = torch.zeros(self.shape[0], dtype=torch.float64)
            self.std_sum = torch.zeros(self.shape[0], dtype=torch.float64)
        elif tuple(mean.shape[1:]) != self.shape:
            raise VaekitError(f"Latent grids differ in shape ({tuple(mean.shape[1:])} vs {self.shape}); "
                              "inspect needs images of one size (--size).")
        dims = (0, 2, 3)
        self.kl += kl_divergence(mean, logvar).sum(dims)
        std = (0.5 * logvar).exp()
        self.std_sum += std.sum(dims)
        self.moments.update(mean, logvar)
        self.units.add(mean, dim=0)
        self.images += mean.shape[0]
        # A random subset of latent samples z ~ q(z|x) for the histograms.
        flat_mean = mean.permute(1, 0, 2, 3).flatten(1)  # (C, B * h * w)
        flat_std = std.permute(1, 0, 2, 3).flatten(1)  # (C, B * h * w)
        keep = min(flat_mean.shape[1], self.keep_per_image * mean.shape[0])
        pick = torch.randperm(flat_mean.shape[1], generator=generator)[:keep]
        noise = torch.randn(flat_mean.shape[0], keep, generator=generator, dtype=torch.float64)
        self.kept.append((flat_mean[:, pick] + flat_std[:, pick] * noise).float())

    def result(self):
        """Per-channel and overall numbers (see the module docstring) as a dict of lists and floats."""
        if self.images < 2:
            raise VaekitError("inspect needs at least 2 decodable images to measure how latents vary across data.")
        channels, height, width = self.shape
        count = self.images * height * width  # values per channel
        kl = self.kl / count
        of_means = self.moments.result("mean")
        mean, std = of_means["mean"], of_means["std"]
        activity = self.units.variance(correction=1).mean(dim=(1, 2))  # (C,) Cov_x(E[z|x]) averaged over positions
        return {
            "images": self.images,
            "latent_shape": [channels, height, width],
            "kl_per_element": float(kl.mean()),
            "kl_per_image": float(self.kl.sum() / self.images),
            "channels": [
                {
                    "channel": c,
                    "kl": float(kl[c]),
                    "mean": float(mean[c]),
                    "std": float(std[c]),
                    "posterior_std": float(self.std_sum[c] / count),
                    "activity": float(activity[c]),
                    "active": bool(activity[c] > ACTIVE_THRESHOLD),
                }
                for c in range(channels)
            ],
            "posterior_statistics": self.moments.result("posterior"),
        }

    def values(self):
        """The kept latent samples, (C, K)."""
        return torch.cat(self.kept, dim=1)


def collapse_warnings(result):
    """Sentences naming posterior collapse when channels are inactive or the KL is near zero."""
    notes = []
    inactive = [c["channel"] for c in result["channels"] if not c["active"]]
    if inactive:
        notes.append(
            f"posterior collapse: {len(inactive)} of {len(result['channels'])} channels are inactive "
            f"(Cov_x(E[z|x]) <= {ACTIVE_THRESHOLD}): channels {inactive}. Their posterior mean does not depend "
            "on the image, so they carry no information to the decoder."
        )
    if result["kl_per_element"] < KL_COLLAPSE_NATS:
        notes.append(
            f"posterior collapse: the KL to N(0, I) is near zero ({result['kl_per_element']:.2g} nats per latent "
            "element): the posterior equals the prior and the latents carry no information."
        )
    return notes


# ---------------------------------------------------------------------------------------------------
# Images


def center_crop_loader(size):
    """A record -> (3, size, size) tensor function: short side to `size`, centre crop, so latent grids agree."""
    return lambda record: to_tensor(resize_center_crop(record.decode(), size)[0])


def image_batches(config, source, device, skipped, desc, progress=True):
    """Batches (B, 3, size, size) on `device` of the first config.limit images, with a progress bar.

    Images that cannot be decoded are appended to `skipped`.
    """
    indices = range(image_count(config, source))
    batches = decoded_batches(source, indices, center_crop_loader(config.size), config.batch_size, skipped)
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for _, keys, x in batches:
            yield x.to(device)
            bar.update(len(keys))


def unlisted(source):
    """The files a source left out when it was listed, as skipped entries {"key", "reason"}."""
    return [{"key": s["key"], "reason": s["reason"]} for s in source.skipped]


def image_count(config, source):
    """How many images of the source a run looks at."""
    return min(len(source), config.limit or len(source))


# ---------------------------------------------------------------------------------------------------
# Latent diagnostics


def inspect_latents(config, vae=None, progress=True):
    """Diagnose the first model of config.vae; returns the result, also as inspect.json in config.out.

    With config.out set, histograms.png and (with diffusability) spectrum.png are written beside it.
    """
    device = resolve_device(config.device)
    spec = config.vae[0]
    if vae is None:
        vae = load_vae(spec, config.override, weights=config.weights, device=device)
    source = open_source(config.data)
    stats = LatentStatistics(keep_per_image=max(1, math.ceil(HISTOGRAM_VALUES / max(image_count(config, source), 1))))
    diffusion = DiffusabilityStatistics() if config.diffusability else None
    factor = downsample_factor(vae)
    generator = torch.Generator().manual_seed(config.seed)
    skipped = unlisted(source)
    for x in image_batches(config, source, device, skipped, "inspect", progress):
        mean, logvar = encode(vae, x)
        stats.update(mean, logvar, generator)
        if diffusion is not None:
            diffusion.update(x, mean, lambda z: decode(vae, z), factor)
    result = stats.result()
    scale, shift = scale_shift(vae)
    # The same computation as `vaekit stats`: statistics of z ~ q(z|x), from the posterior moments.
    suggested = suggest_normalization(result["posterior_statistics"])
    normalised_std = result["posterior_statistics"]["global_std"] * abs(scale)
    normalised_mean = (result["posterior_statistics"]["global_mean"] - shift) * scale
    result.update({
        "model": spec,
        "data": source.description,
        "skipped": skipped,
        "active_threshold": ACTIVE_THRESHOLD,
        "active_units": sum(c["active"] for c in result["channels"]),
        "current": {"scaling_factor": scale, "shift_factor": shift,
                    "normalised_mean": normalised_mean, "normalised_std": normalised_std},
        "suggested": suggested,
    })
    notes = collapse_warnings(result)
    if is_tiny(vae) and (abs(normalised_std - 1) > 0.25 or abs(normalised_mean) > 0.25):
        notes.append(f"the latents have mean {normalised_mean:.3g} and std {normalised_std:.3g}, not about 0 and 1; an "
                     "AutoencoderTiny's latents are its teacher's normalised latents, so normalise the teacher (the "
                     "scaling_factor and shift_factor vaekit stats suggests, written with vaekit export -o) and "
                     "distil the tiny model from it")
    elif abs(normalised_std - 1) > 0.25 or abs(normalised_mean) > 0.25:
        notes.append(
            f"with the config's scaling_factor {scale:g} and shift_factor {shift:g} the latents have mean "
            f"{normalised_mean:.3g} and std {normalised_std:.3g}, not about 0 and 1; measured: "
            f"-o scaling_factor={suggested['scaling_factor']:.5g} -o shift_factor={suggested['shift_factor']:.5g}"
        )
    if skipped:
        notes.append(f"{len(skipped)} image(s) skipped as undecodable.")
    result["collapsed"] = bool(collapse_warnings(result))
    result["warnings"] = notes
    if diffusion is not None:
        result["diffusability"] = diffusion.result()
    if config.out:
        out = Path(config.out)
        write_json(out / "inspect.json", result)
        values = normalize_latents(vae, stats.values().double())  # (C, K), as a diffusion model sees them
        report.save_png(histogram_figure(values, result), out / "histograms.png")
        if diffusion is not None:
            report.save_png(spectrum_figure([(spec, result["diffusability"])]), out / "spectrum.png")
    return result


def inspect_models(config, progress=True):
    """`inspect_latents` for every model of config.vae, each with its "label"; returns the results in order.

    One model writes into config.out itself. Several write each model's files into
    config.out/N-LABEL/ and, side by side, diffusability.json and spectrum.png into config.out.
    """
    labels = list(config.label) or unique_labels(config.vae)
    if len(config.vae) == 1:
        return [{"label": labels[0], **inspect_latents(config, progress=progress)}]
    results = []
    for index, (spec, label) in enumerate(zip(config.vae, labels)):
        folder = str(Path(config.out) / model_folder(index, label)) if config.out else None
        one = dataclasses.replace(config, vae=spec, label=[], out=folder)
        results.append({"label": label, **inspect_latents(one, progress=progress)})
    if config.out and config.diffusability:
        out = Path(config.out)
        write_json(out / "diffusability.json", {"data": results[0]["data"], "models": [
            {"label": r["label"], "model": r["model"], "latent_shape": r["latent_shape"], **r["diffusability"]}
            for r in results]})
        report.save_png(spectrum_figure([(r["label"], r["diffusability"]) for r in results]), out / "spectrum.png")
    return results


def model_folder(index, label):
    """A folder name for the index-th model: its number and its label's letters, digits, dots and dashes."""
    return f"{index + 1}-{re.sub(r'[^A-Za-z0-9.-]+', '_', label).strip('_')[:60] or 'model'}"


def histogram_figure(values, result):
    """Histograms of normalised latent values per channel, with the N(0, 1) density for reference."""
    limit = max(4.0, float(values.abs().flatten().quantile(0.999)) if values.numel() <= 1 << 24 else 4.0)
    edges = torch.linspace(-limit, limit, HISTOGRAM_BINS + 1, dtype=torch.float64)
    normal = lambda v: math.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)  # noqa: E731
    panels = []
    for channel, row in zip(values, result["channels"]):
        counts = torch.histc(channel.double().clamp(-limit, limit), bins=HISTOGRAM_BINS, min=-limit, max=limit)
        state = "active" if row["active"] else "INACTIVE"
        panels.append({
            "title": f"ch {row['channel']}  m {float(channel.mean()):.2f} s {float(channel.std()):.2f}  {state}",
            "counts": counts, "edges": edges, "pdf": normal,
        })
    return report.histogram_panels(panels, columns=4)


# ---------------------------------------------------------------------------------------------------
# Precision: activation ranges against float16


# What makes a VAE fp16-safe: the fine-tune `vaekit train` runs with this config.
FP16_FIX = "vaekit train --config configs/train/ft_fp16_safe.yaml model.source=MODEL data.path=DIR"


@torch.no_grad()
def measure_activations(vae, batches, group_variance=False):
    """`ActivationPeaks` over an encode and decode (of the posterior mean) of every batch of images.

    The one measuring pass of `inspect --precision`, of the exact rescaling and of the fp16-safe
    fine-tune's checks; `batches` yields (B, 3, H, W) images on the model's device, in its dtype.
    It runs diffusers' own forward, so every module (the encoder and decoder as wholes too) runs
    as a pipeline runs it, whatever the block types.
    """
    with ActivationPeaks(vae, group_variance=group_variance) as peaks:
        for x in batches:
            encoded = vae.encode(x)  # an AutoencoderTiny's output is its latents; a KL one's, a posterior
            vae.decode(encoded.latents if is_tiny(vae) else encoded.latent_dist.mean)
    return peaks


def precision_summary(maxima):
    """The per-layer rows, the layers that overflow or come close, and the verdict, from {layer: max |activation|}."""
    # Layers in the order they first ran (dict order is hook order), which reads better than alphabetical.
    layers = [{"layer": name, "max_abs": value, "fp16_fraction": value / FP16_MAX} for name, value in maxima.items()]
    overflow = [row["layer"] for row in layers if not row["max_abs"] <= FP16_MAX]  # inf and NaN overflow too
    close = [row["layer"] for row in layers if FP16_MARGIN * FP16_MAX < row["max_abs"] <= FP16_MAX]
    largest = max(layers, key=lambda row: row["max_abs"]) if layers else None
    if overflow:
        verdict = (f"NOT fp16-safe: {len(overflow)} layer(s) exceed float16's {FP16_MAX:.0f}, first {overflow[0]}. "
                   "Run it in bf16 or fp32 (vaekit redoes an overflowing fp16 batch in fp32, at fp32's cost), or make "
                   f"it fp16-safe: {FP16_FIX}")
    elif close:
        verdict = (f"fp16-risky: {len(close)} layer(s) above {FP16_MARGIN:.0%} of float16's range on these images "
                   f"(largest {largest['layer']}, {largest['max_abs']:.4g}); other images may overflow. Give it "
                   f"headroom: {FP16_FIX}")
    else:
        fraction = largest["fp16_fraction"] if largest else 0.0
        verdict = f"fp16-safe on these images: the largest activation is {fraction:.2%} of float16's range."
    return {"overflow": overflow, "close": close, "fp16_safe": not overflow and not close, "verdict": verdict,
            "layers": layers}


def inspect_precision(config, vae=None, progress=True):
    """Largest |activation| per layer over fp32 encode + decode of the images, against the fp16 limit."""
    device = resolve_device(config.device)
    if vae is None:
        vae = load_vae(config.vae[0], config.override, weights=config.weights, device=device)
    vae = vae.float()
    source = open_source(config.data)
    skipped, images = unlisted(source), []

    def counted():
        for x in image_batches(config, source, device, skipped, "precision", progress):
            images.append(len(x))
            yield x

    peaks = measure_activations(vae, counted())
    result = {
        "model": config.vae[0], "data": source.description, "images": sum(images),
        "size": config.size, "fp16_max": FP16_MAX, "margin": FP16_MARGIN, "skipped": skipped,
        **precision_summary(peaks.maxima),
    }
    if config.out:
        write_json(Path(config.out) / "precision.json", result)
    return result
