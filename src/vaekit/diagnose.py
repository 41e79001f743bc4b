"""The latent space of a VAE: `vaekit inspect` (diagnostics), `vaekit sample` and `vaekit interpolate`.

(Named diagnose, not inspect, so that running a file of this package as a script can never shadow
the standard library's `inspect`, which torch imports.)

inspect reports, per latent channel:
- KL(q(z|x) || N(0, I)) in closed form, per latent element (nats), averaged over the data;
- mean and std of the posterior means E[z|x] over images and positions;
- activity Cov_x(E[z|x]) (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
  Autoencoders", section 5.2): the variance across images of each unit's posterior mean, a unit
  being (channel, position) of the latent grid, averaged over positions; a channel whose
  activity is at most 0.01 is inactive. Inactive channels or a total KL near zero mean posterior
  collapse: the decoder gets no information about the image through them;
- histograms of the latents as a diffusion model sees them (normalised by the config's scale/shift);
- suggested scaling and shift factors measured on the data (vaekit.latents, as `vaekit stats`).

inspect --precision reports instead, per layer, the largest absolute activation of an fp32 encode and
decode of the images against float16's largest finite value: a layer above it overflows in fp16
(the SDXL VAE's black images), while bfloat16 has float32's range and only loses mantissa.
"""

import dataclasses
import math
import typing
from pathlib import Path

import torch

from vaekit.errors import VaekitError
from vaekit.latents import LatentMoments, suggest_normalization

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2016: a unit is active when Cov_x(E[z|x]) > 0.01
KL_COLLAPSE_NATS = 0.01  # mean KL per latent element below this: the posterior is (nearly) the prior
HISTOGRAM_VALUES = 1 << 16  # about this many latent values per channel are kept for the histograms
HISTOGRAM_BINS = 60
FP16_MAX = torch.finfo(torch.float16).max  # 65504
# An activation above this fraction of FP16_MAX on the sample images may overflow on other images.
FP16_MARGIN = 0.25


@dataclasses.dataclass
class InspectConfig:
    """One `vaekit inspect` run."""

    vae: str = ""
    data: str = ""
    out: str | None = None  # folder for inspect.json and histograms.png; None: print only
    limit: int | None = None  # first N images
    size: int = 256  # short side + centre crop, so every image gives the same latent grid
    batch_size: int = 4
    seed: int = 0  # posterior samples drawn for the histograms
    device: str = "auto"
    override: list[str] = dataclasses.field(default_factory=list)
    weights: typing.Literal["ema", "raw"] = "ema"
    precision: bool = False  # report per-layer activation ranges against fp16 instead of latent statistics

    def __post_init__(self):
        if not self.vae or not self.data:
            raise ValueError("name the model with --vae MODEL and the images with --data SRC")
        if self.size < 8 or self.batch_size < 1 or (self.limit is not None and self.limit < 2):
            raise ValueError("size must be >= 8, batch_size >= 1 and limit >= 2")


# ---------------------------------------------------------------------------------------------------
# Maths


def kl_to_standard_normal(mean, logvar):
    """Elementwise KL(N(mean, exp(logvar)) || N(0, 1)) in nats (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def slerp(a, b, t):
    """Spherical interpolation between batches a and b (B, ...) at fraction t, per sample; lerp when parallel.

    Shoemake 1985: sin((1 - t) W) / sin W * a + sin(t W) / sin W * b, with W the angle between a and b.
    For Gaussian latents it keeps the norm near that of a typical sample, where lerp shrinks it.
    """
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()  # (B, N)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp(min=1e-12)
    omega = cos.clamp(-1, 1).acos()  # (B,)
    sin = omega.sin()
    parallel = sin.abs() < 1e-6
    safe_sin = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, 1 - t, ((1 - t) * omega).sin() / safe_sin)  # (B,)
    wb = torch.where(parallel, t, (t * omega).sin() / safe_sin)  # (B,)
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


def lerp(a, b, t):
    """Linear interpolation (1 - t) a + t b."""
    return (1 - t) * a + t * b


class LatentStatistics:
    """Streaming per-channel statistics of posteriors over a data set (all latent grids the same shape)."""

    def __init__(self, keep_per_image):
        self.images = 0
        self.keep_per_image = keep_per_image  # latent values per channel and image kept for histograms
        self.kl = None  # (C,) sum of elementwise KL
        self.mean_sum = self.mean_sq = None  # (C,) sums of E[z|x] and its square
        self.std_sum = None  # (C,) sum of posterior std
        self.moments = LatentMoments()  # posterior statistics for the suggested normalisation (vaekit stats')
        self.unit_mean = self.unit_m2 = None  # (C, h, w) running mean and sum of squared deviations (Chan et al.)
        self.kept = []  # [(C, k)] sampled latent values for the histograms
        self.shape = None

    def update(self, mean, logvar, generator):
        """Add a batch of posteriors, mean and logvar (B, C, h, w)."""
        mean, logvar = mean.double().cpu(), logvar.double().cpu()
        if self.shape is None:
            self.shape = tuple(mean.shape[1:])
            channels = self.shape[0]
            zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
            self.kl, self.mean_sum, self.mean_sq = zeros(channels), zeros(channels), zeros(channels)
            self.std_sum = zeros(channels)
            self.unit_mean, self.unit_m2 = zeros(*self.shape), zeros(*self.shape)
        elif tuple(mean.shape[1:]) != self.shape:
            raise VaekitError(f"Latent grids differ in shape ({tuple(mean.shape[1:])} vs {self.shape}); "
                              "inspect needs images of one size (--size).")
        batch = mean.shape[0]
        dims = (0, 2, 3)
        self.kl += kl_to_standard_normal(mean, logvar).sum(dims)
        self.mean_sum += mean.sum(dims)
        self.mean_sq += mean.square().sum(dims)
        std = (0.5 * logvar).exp()
        self.std_sum += std.sum(dims)
        self.moments.update(mean, logvar)
        # Chan, Golub & LeVeque 1979: merge the batch's mean and squared deviations into the running ones,
        # stable where E[x^2] - E[x]^2 would cancel.
        batch_mean = mean.mean(0)  # (C, h, w)
        batch_m2 = (mean - batch_mean).square().sum(0)  # (C, h, w)
        total = self.images + batch
        delta = batch_mean - self.unit_mean
        self.unit_mean += delta * batch / total
        self.unit_m2 += batch_m2 + delta.square() * self.images * batch / total
        self.images = total
        # A random subset of latent samples z ~ q(z|x) for the histograms.
        flat_mean = mean.permute(1, 0, 2, 3).flatten(1)  # (C, B * h * w)
        flat_std = std.permute(1, 0, 2, 3).flatten(1)  # (C, B * h * w)
        keep = min(flat_mean.shape[1], self.keep_per_image * batch)
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
        mean = self.mean_sum / count
        std = (self.mean_sq / count - mean.square()).clamp(min=0).sqrt()
        activity = (self.unit_m2 / (self.images - 1)).mean(dim=(1, 2))  # (C,) Cov_x(E[z|x]) averaged over positions
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
# Encoding and decoding


def posterior_moments(vae, x):
    """(mean, logvar) of q(z|x) for images (B, 3, H, W) in [-1, 1], float32.

    The one place inspect runs the encoder: precision handling (issue 6's --precision) belongs here.
    """
    from vaekit import tiling

    with torch.no_grad():
        return tiling.encode(vae, x)


def decode_latents(vae, z, size=None):
    """Images in [-1, 1] (float32) from raw latents (B, C, h, w), cropped to `size` (H, W) when given."""
    from vaekit import tiling

    with torch.no_grad():
        return tiling.decode(vae, z, size=size).clamp(-1, 1)


def load_images(source, indices, size, skipped):
    """Yield (3, size, size) tensors of the records at `indices`; undecodable ones go to `skipped`."""
    from vaekit.data import ImageError, resize_center_crop, to_tensor

    for index in indices:
        record = source[index]
        try:
            img, _ = resize_center_crop(record.decode(), size)
        except ImageError as e:
            skipped.append({"key": record.key, "reason": e.reason})
            continue
        yield to_tensor(img)


def batched(iterable, size):
    """Lists of up to `size` items."""
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def image_batches(config, source, device, skipped, desc, progress=True):
    """Batches (B, 3, size, size) on `device` of the first config.limit images, with a progress bar.

    Images that cannot be decoded are appended to `skipped`.
    """
    from tqdm.auto import tqdm

    indices = range(image_count(config, source))
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batched(load_images(source, indices, config.size, skipped), config.batch_size):
            yield torch.stack(batch).to(device)
            bar.update(len(batch))


def image_count(config, source):
    """How many images of the source a run looks at."""
    return min(len(source), config.limit or len(source))


def inspect_latents(config, vae=None, progress=True):
    """Run the diagnostics; writes inspect.json and histograms.png to config.out when set; returns the result."""
    from vaekit.data import open_source
    from vaekit.evaluate import resolve_device
    from vaekit.model import normalize_latents, scale_shift

    device = resolve_device(config.device)
    if vae is None:
        vae = load_model(config.vae, config.override, config.weights, device)
    source = open_source(config.data)
    stats = LatentStatistics(keep_per_image=max(1, math.ceil(HISTOGRAM_VALUES / max(image_count(config, source), 1))))
    generator = torch.Generator().manual_seed(config.seed)
    skipped = []
    for x in image_batches(config, source, device, skipped, "inspect", progress):
        mean, logvar = posterior_moments(vae, x)
        stats.update(mean, logvar, generator)
    result = stats.result()
    scale, shift = scale_shift(vae)
    # The same computation as `vaekit stats`: statistics of z ~ q(z|x), from the posterior moments.
    suggested = suggest_normalization(result["posterior_statistics"])
    normalised_std = result["posterior_statistics"]["global_std"] * abs(scale)
    normalised_mean = (result["posterior_statistics"]["global_mean"] - shift) * scale
    result.update({
        "model": config.vae,
        "data": source.description,
        "skipped": skipped,
        "active_threshold": ACTIVE_THRESHOLD,
        "active_units": sum(c["active"] for c in result["channels"]),
        "current": {"scaling_factor": scale, "shift_factor": shift,
                    "normalised_mean": normalised_mean, "normalised_std": normalised_std},
        "suggested": suggested,
    })
    notes = collapse_warnings(result)
    if abs(normalised_std - 1) > 0.25 or abs(normalised_mean) > 0.25:
        notes.append(
            f"with the config's scaling_factor {scale:g} and shift_factor {shift:g} the latents have mean "
            f"{normalised_mean:.3g} and std {normalised_std:.3g}, not about 0 and 1; measured: "
            f"-o scaling_factor={suggested['scaling_factor']:.5g} -o shift_factor={suggested['shift_factor']:.5g}"
        )
    if skipped:
        notes.append(f"{len(skipped)} image(s) skipped as undecodable.")
    result["collapsed"] = bool(collapse_warnings(result))
    result["warnings"] = notes
    if config.out:
        from vaekit import report
        from vaekit.io import write_json

        out = Path(config.out)
        write_json(out / "inspect.json", result)
        values = normalize_latents(vae, stats.values().double())  # (C, K), as a diffusion model sees them
        report.save_png(histogram_figure(values, result), out / "histograms.png")
    return result


# ---------------------------------------------------------------------------------------------------
# Precision: activation ranges against float16


class ActivationRanges:
    """Forward hooks recording the largest |output| of every module of a VAE, by qualified name."""

    def __init__(self, vae):
        self.vae = vae
        self.maxima = {}
        self.handles = []

    def __enter__(self):
        for name, module in self.vae.named_modules():
            if name and not isinstance(module, (torch.nn.ModuleList, torch.nn.Dropout, torch.nn.Identity)):
                self.handles.append(module.register_forward_hook(self.make_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def make_hook(self, name):
        """A hook folding the module's tensor outputs into self.maxima[name]."""

        def hook(module, inputs, output):
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            for t in tensors:
                if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                    value = float(t.detach().abs().amax())
                    self.maxima[name] = max(self.maxima.get(name, 0.0), value)

        return hook


def inspect_precision(config, vae=None, progress=True):
    """Largest |activation| per layer over fp32 encode + decode of the images, against the fp16 limit."""
    from vaekit.data import open_source
    from vaekit.evaluate import resolve_device

    device = resolve_device(config.device)
    if vae is None:
        vae = load_model(config.vae, config.override, config.weights, device)
    vae = vae.float()
    source = open_source(config.data)
    skipped = []
    with ActivationRanges(vae) as ranges:
        for x in image_batches(config, source, device, skipped, "precision", progress):
            decode_latents(vae, posterior_moments(vae, x)[0])
    # Layers in the order they first ran (dict order is hook order), which reads better than alphabetical.
    layers = [{"layer": name, "max_abs": value, "fp16_fraction": value / FP16_MAX} for name, value in ranges.maxima.items()]
    overflow = [row["layer"] for row in layers if row["max_abs"] > FP16_MAX]
    close = [row["layer"] for row in layers if FP16_MARGIN * FP16_MAX < row["max_abs"] <= FP16_MAX]
    largest = max(layers, key=lambda row: row["max_abs"]) if layers else None
    if overflow:
        verdict = (f"NOT fp16-safe: {len(overflow)} layer(s) exceed float16's {FP16_MAX:.0f}, first {overflow[0]}. "
                   "Run it in bf16 or fp32 (vaekit redoes an overflowing fp16 batch in fp32, at fp32's cost).")
    elif close:
        verdict = (f"fp16-risky: {len(close)} layer(s) above {FP16_MARGIN:.0%} of float16's range on these images "
                   f"(largest {largest['layer']}, {largest['max_abs']:.4g}); other images may overflow.")
    else:
        verdict = f"fp16-safe on these images: the largest activation is {largest['fp16_fraction']:.2%} of float16's range."
    result = {
        "model": config.vae, "data": source.description, "images": image_count(config, source) - len(skipped),
        "size": config.size, "fp16_max": FP16_MAX, "margin": FP16_MARGIN, "skipped": skipped,
        "overflow": overflow, "close": close, "fp16_safe": not overflow and not close, "verdict": verdict,
        "layers": layers,
    }
    if config.out:
        from vaekit.io import write_json

        write_json(Path(config.out) / "precision.json", result)
    return result


def print_precision(result, top=15):
    """The layers nearest the fp16 limit, then the verdict."""
    rows = sorted(result["layers"], key=lambda row: -row["max_abs"])
    shown = [r for r in rows if r["layer"] in result["overflow"] or r["layer"] in result["close"]] or rows[:top]
    print(f"{result['images']} images at {result['size']} px; largest |activation| per layer (fp32 run), "
          f"float16 limit {result['fp16_max']:.0f}:")
    print(f"{'max |act|':>12} {'of fp16':>8}  layer")
    for row in shown[: max(top, len(result["overflow"]))]:
        flag = "  OVERFLOW" if row["layer"] in result["overflow"] else ""
        print(f"{row['max_abs']:>12.4g} {row['fp16_fraction']:>8.2%}  {row['layer']}{flag}")
    print(result["verdict"])


def histogram_figure(values, result):
    """Histograms of normalised latent values per channel, with the N(0, 1) density for reference."""
    from vaekit import report

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


def load_model(spec, override, weights, device):
    """load_vae with `-o` overrides, in fp32 on `device`."""
    from vaekit.commands import parse_model_overrides
    from vaekit.model import load_vae

    # Moved here rather than by load_vae(device=...), whose .to(dtype=None) makes diffusers warn.
    return load_vae(spec, parse_model_overrides(override), weights=weights).to(device)


def print_inspection(result):
    """The diagnostics as a table on stdout."""
    c, h, w = result["latent_shape"]
    print(f"{result['images']} images, latents {c}x{h}x{w}; KL to N(0, I): {result['kl_per_element']:.4g} nats per "
          f"element, {result['kl_per_image']:.4g} per image; active units {result['active_units']}/{c}")
    print(f"{'ch':>3} {'KL':>9} {'mean':>9} {'std':>9} {'post.std':>9} {'activity':>10}  active")
    for row in result["channels"]:
        print(f"{row['channel']:>3} {row['kl']:>9.4f} {row['mean']:>9.4f} {row['std']:>9.4f} "
              f"{row['posterior_std']:>9.4f} {row['activity']:>10.4g}  {'yes' if row['active'] else 'NO'}")
    s, cur = result["suggested"], result["current"]
    print(f"normalisation: config scaling_factor {cur['scaling_factor']:g} shift_factor {cur['shift_factor']:g} "
          f"-> latents mean {cur['normalised_mean']:.3g} std {cur['normalised_std']:.3g}")
    print(f"suggested: scaling_factor {s['scaling_factor']:.5g} shift_factor {s['shift_factor']:.5g} "
          f"(1 / std and mean of z ~ q(z|x), as `vaekit stats` computes them)")
    for note in result["warnings"]:
        print(f"warning: {note}")


def run_inspect(args):
    """`vaekit inspect`."""
    from vaekit.config import from_dict

    config = from_dict(InspectConfig, {k: v for k, v in vars(args).items()
                                       if k in {f.name for f in dataclasses.fields(InspectConfig)} and v is not None})
    if config.precision:
        result = inspect_precision(config, progress=not args.quiet)
        print_precision(result)
        if config.out:
            print(f"wrote {Path(config.out) / 'precision.json'}")
        return 0
    result = inspect_latents(config, progress=not args.quiet)
    print_inspection(result)
    if config.out:
        print(f"wrote {Path(config.out) / 'inspect.json'} and histograms.png")
    return 0


# ---------------------------------------------------------------------------------------------------
# Sampling and interpolation


def sample_images(vae, n, size, seed=0, batch_size=8):
    """Decode z ~ N(0, I) drawn in the normalised latent space: (n, 3, size, size) in [-1, 1]."""
    from vaekit.model import denormalize_latents, downsample_factor, latent_channels

    f = downsample_factor(vae)
    side = math.ceil(size / f)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, latent_channels(vae), side, side, generator=generator)  # (n, C, h, w)
    device = next(vae.parameters()).device
    images = [decode_latents(vae, denormalize_latents(vae, z).to(device), size=(size, size)).cpu()
              for z in noise.split(batch_size)]
    return torch.cat(images)


def interpolate_images(vae, a, b, steps, spherical=False):
    """Decode `steps` latents between the posterior means of images a and b (1, 3, H, W): (steps, 3, H, W)."""
    from vaekit.model import denormalize_latents, normalize_latents

    if steps < 2:
        raise VaekitError(f"--steps must be at least 2 (both ends), got {steps}.")
    device = next(vae.parameters()).device
    means = posterior_moments(vae, torch.cat([a, b]).to(device))[0]  # (2, C, h, w)
    # Interpolate in the normalised space, where the prior is N(0, I) and slerp's geometry applies.
    za, zb = normalize_latents(vae, means[:1]), normalize_latents(vae, means[1:])
    mix = slerp if spherical else lerp
    frames = []
    for t in torch.linspace(0, 1, steps).tolist():
        z = denormalize_latents(vae, mix(za, zb, t))
        frames.append(decode_latents(vae, z, size=tuple(a.shape[-2:])).cpu())
    return torch.cat(frames)


def grid_png(images, columns, path):
    """Save images (N, 3, H, W) in [-1, 1] as one PNG grid, atomically."""
    from vaekit import report
    from vaekit.data import to_pil

    report.save_png(report.make_grid_image([to_pil(t) for t in images], columns), path)
    return path


def read_image(path, size):
    """One image file, resized and centre-cropped to `size`, as (1, 3, size, size) in [-1, 1]."""
    from vaekit.data import decode_image, resize_center_crop, to_tensor

    if not Path(path).is_file():
        raise VaekitError(f"Image not found: {path}. Pass an existing image file.")
    img, _ = resize_center_crop(decode_image(path), size)
    return to_tensor(img)[None]


def run_sample(args):
    """`vaekit sample`."""
    from vaekit.evaluate import resolve_device

    if args.n < 1 or args.size < 8:
        raise VaekitError("--n must be at least 1 and --size at least 8.")
    vae = load_model(args.vae, args.override, args.weights, resolve_device(args.device))
    images = sample_images(vae, args.n, args.size, args.seed, args.batch_size)
    grid_png(images, math.ceil(math.sqrt(args.n)), args.out)
    print(f"wrote {args.out}: {args.n} samples of z ~ N(0, I) in the normalised latent space, decoded")
    return 0


def run_interpolate(args):
    """`vaekit interpolate`."""
    from vaekit.evaluate import resolve_device

    vae = load_model(args.vae, args.override, args.weights, resolve_device(args.device))
    a, b = read_image(args.a, args.size), read_image(args.b, args.size)
    frames = interpolate_images(vae, a, b, args.steps, spherical=args.slerp)
    strip = torch.cat([a, frames, b])  # A as given | decodes from A to B | B as given
    grid_png(strip, len(strip), args.out)
    kind = "slerp" if args.slerp else "linear"
    print(f"wrote {args.out}: A, {args.steps} decodes ({kind} in the normalised latent space), B")
    return 0


def add_commands(subparsers):
    """Register inspect, sample and interpolate."""
    from vaekit.commands import add_model_arguments

    p = subparsers.add_parser(
        "inspect", help="latent-space diagnostics: per-channel KL, active units, collapse, histograms, scale/shift",
    )
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("--data", required=True, help="image folder, Hugging Face data set, WebDataset shards or builtin:photos")
    p.add_argument("--out", help="folder for inspect.json and histograms.png")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--size", type=int, help="short side + centre crop in px (default 256)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, help="images per batch (default 4)")
    p.add_argument("--seed", type=int, help="seed of the posterior samples (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", action="store_true", default=None,
                   help="instead: per-layer largest activation against float16's limit (is this VAE fp16-safe?)")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser("sample", help="decode z ~ N(0, I) from the normalised latent space to a PNG grid")
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="samples.png", help="PNG path (default samples.png)")
    p.set_defaults(func=run_sample)

    p = subparsers.add_parser("interpolate", help="decode a path between the latents of two images to a PNG strip")
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("a", help="first image")
    p.add_argument("b", help="second image")
    p.add_argument("--steps", type=int, default=8, help="decoded frames, both ends included (default 8)")
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--size", type=int, default=256, help="both images are resized and centre-cropped to this side")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="interpolation.png", help="PNG path (default interpolation.png)")
    p.set_defaults(func=run_interpolate)
