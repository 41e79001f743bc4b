"""How diffusion-friendly a latent space is: its power spectrum against the images', and its equivariance error.

- **Spectrum.** Per image and channel: remove the mean, apply a separable Hann window (the grids
  are not periodic; without it their edges add broadband energy), take |FFT|^2, and average it
  over rings of radial frequency r = sqrt(fx^2 + fy^2) / Nyquist, so a 32 x 32 latent and its
  256 x 256 image share one axis from 0 to 1 (r reaches sqrt(2) in the corners). The
  **high-frequency share** is the energy at r > 1/2 over all energy except DC: 0.80 for white
  noise (1 - pi/16, the area outside the half-Nyquist disc) and a few percent for photos.
  Skorokhodov et al. (ICML 2025, arXiv 2502.14831, section 3) show that latents with a flatter
  spectrum than their images' (more high-frequency energy) slow diffusion training down; their
  analysis uses a DCT, this one the windowed FFT, which gives the same picture.
- **Equivariance error.** PSNR of decode(T(z)) against T(x) for T = 2x downscale (antialiased
  bilinear on latent and image alike) and T = a 90-degree rotation, next to the plain
  reconstruction's PSNR: a latent space a diffusion model finds easy behaves like an image under
  these transforms (EQ-VAE, Kouzelis et al., ICML 2025, arXiv 2502.09509, section 3.1).
- **Verdict.** One sentence from both numbers.
- **High-frequency retention** (`hf_retention`): the same spectrum of reconstructions over that of
  their originals, above half Nyquist per image and per band: how sharp a decoder is.
"""

import torch

from vaekit.eval import metrics, report
from vaekit.model.latents import LatentTransform

RADIAL_BINS = 32  # rings over 0 <= r <= 1 for the plotted spectrum

HALF_NYQUIST = 0.5

# Latents with this many times the images' high-frequency share (or more) are called out as slowing diffusion.
EXCESS_RATIO = 1.5

# Below this reconstruction PSNR a decode is too far from its image for equivariance errors to mean anything.
POOR_RECONSTRUCTION_DB = 15.0

# An equivariance PSNR this many dB below the plain decode's: the latent space does not transform like images.
EQUIVARIANCE_GAP_DB = 3.0


def radial_frequency(height, width, device=None):
    """(H, W) radial frequency of each FFT bin in units of the Nyquist frequency (0 at DC, 1 at Nyquist on an axis)."""
    fy = torch.fft.fftfreq(height, device=device, dtype=torch.float64) * 2  # cycles per sample / 0.5
    fx = torch.fft.fftfreq(width, device=device, dtype=torch.float64) * 2
    return (fy[:, None].square() + fx[None, :].square()).sqrt()  # (H, W)


def power_spectrum(x):
    """|FFT|^2 of mean-removed, Hann-windowed grids: (B, C, H, W) -> (B, C, H, W) float64."""
    x = x.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    height, width = x.shape[-2:]
    window = (torch.hann_window(height, periodic=False, dtype=torch.float64, device=x.device)[:, None]
              * torch.hann_window(width, periodic=False, dtype=torch.float64, device=x.device)[None, :])  # (H, W)
    return torch.fft.fft2(x * window).abs().square()


class SpectrumStatistics:
    """Radially averaged power spectrum and high-frequency energy of grids, accumulated over batches of any size."""

    def __init__(self, bins=RADIAL_BINS):
        self.bins = bins
        self.ring_power = torch.zeros(bins, dtype=torch.float64)  # summed power per ring, over r <= 1
        self.ring_count = torch.zeros(bins, dtype=torch.float64)  # FFT bins summed into each ring
        self.high = 0.0  # energy at r > 1/2
        self.total = 0.0  # energy at r > 0
        self.total_bins = 0.0  # FFT bins at r > 0, over every grid and channel

    def update(self, x):
        """Add grids (B, C, H, W): images or latents; returns each grid's energy above half Nyquist, (B,) float64.

        Grids smaller than 4 x 4 carry no spectrum: they are skipped and their energy is NaN.
        """
        if min(x.shape[-2:]) < 4:
            return torch.full((x.shape[0],), float("nan"), dtype=torch.float64)
        per_grid = power_spectrum(x).sum(dim=1).cpu()  # (B, H, W), summed over channels
        radius = radial_frequency(*x.shape[-2:])
        high = per_grid[:, radius > HALF_NYQUIST].sum(dim=-1)  # (B,)
        power = per_grid.sum(dim=0)  # (H, W), summed over grids
        self.high += float(high.sum())
        self.total += float(power[radius > 0].sum())
        self.total_bins += float((radius > 0).sum()) * x.shape[0] * x.shape[1]
        inside = (radius <= 1) & (radius > 0)
        ring = (radius[inside] * self.bins).long().clamp(max=self.bins - 1)
        self.ring_power.index_add_(0, ring, power[inside])
        self.ring_count.index_add_(0, ring, torch.full_like(power[inside], float(x.shape[0] * x.shape[1])))
        return high

    def high_frequency_share(self):
        """Energy above half the Nyquist frequency over all non-DC energy (None before any update)."""
        return self.high / self.total if self.total > 0 else None

    def result(self):
        """{"high_frequency_share", "radius", "power"}: ring centres and the mean power per FFT bin of each ring.

        Power is relative to white noise of the same energy (the mean power of a non-DC bin), so white
        noise is 1 at every frequency whatever the grid size, and grids of different sizes compare.
        A ring without FFT bins (small grids) is None.
        """
        mean = self.ring_power / self.ring_count.clamp(min=1)
        mean = mean / (self.total / self.total_bins) if self.total > 0 else mean
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins
        power = [float(p) if n > 0 else None for p, n in zip(mean, self.ring_count)]
        return {"high_frequency_share": self.high_frequency_share(), "radius": centres.tolist(), "power": power}


def high_frequency_share(x):
    """The high-frequency share of one batch of grids (B, C, H, W), as SpectrumStatistics measures it."""
    stats = SpectrumStatistics()
    stats.update(x)
    return stats.high_frequency_share()


class RetentionStatistics:
    """How much of the originals' high-frequency energy reconstructions keep: `hf_retention`, per image and per band.

    The reconstructions' power over the originals', both measured as SpectrumStatistics measures
    images (mean removed, Hann window, |FFT|^2 summed over channels): per image over every frequency
    above half Nyquist, and per ring of radial frequency over all images for the curve. 1.0 is as
    sharp as the input, below 1 blurrier (a Gaussian blur's response falls with frequency), above 1
    ringing, noise or invented texture. Unlike PSNR, which rewards a blurry average, and LPIPS,
    which mixes sharpness with everything else, it measures only the detail a decoder puts back.
    """

    def __init__(self, bins=RADIAL_BINS):
        self.originals = SpectrumStatistics(bins)
        self.reconstructions = SpectrumStatistics(bins)

    def update(self, x, y):
        """Add originals x and their reconstructions y (B, 3, H, W); returns each image's hf_retention, (B,) float64.

        NaN for an image without energy above half Nyquist (a flat image), where the ratio means nothing.
        """
        high_x = self.originals.update(x)
        high_y = self.reconstructions.update(y)
        return torch.where(high_x > 0, high_y / high_x.clamp(min=1e-300), torch.full_like(high_x, float("nan")))

    def bands(self):
        """{"radius": ring centres, "ratio": the reconstructions' power over the originals' per ring (None where unknown)}."""
        centres = (torch.arange(self.originals.bins, dtype=torch.float64) + 0.5) / self.originals.bins
        ratio = [float(r) / float(o) if o > 0 else None
                 for r, o in zip(self.reconstructions.ring_power, self.originals.ring_power)]
        return {"radius": centres.tolist(), "ratio": ratio}


def hf_retention(x, y):
    """Per-image hf_retention (B,) of reconstructions y against originals x, as RetentionStatistics measures it."""
    return RetentionStatistics().update(x, y)


EQUIVARIANCE_TRANSFORMS = {
    "downscale_x2": lambda h, w: LatentTransform(size=(max(1, h // 2), max(1, w // 2))),
    "rotate_90": lambda h, w: LatentTransform(rotation=1),
}


@torch.no_grad()
def equivariance_psnr(decode, x, z, factor):
    """PSNR (dB, per image) of decode(T(z)) against T(x) for each EQUIVARIANCE_TRANSFORMS entry, and of decode(z).

    `decode`: latents -> images in [-1, 1]; `x` (B, 3, H, W) and its latents `z` (B, C, h, w), cropped
    here to the whole latent cells (h' = H // factor) so that image and latent transform alike.
    """
    h, w = min(z.shape[-2], x.shape[-2] // factor), min(z.shape[-1], x.shape[-1] // factor)
    z, x = z[..., :h, :w], x[..., :h * factor, :w * factor].float()
    result = {"reconstruction": metrics.psnr(x, metrics.quantize(decode(z)).to(x.device)).cpu()}
    for name, make in EQUIVARIANCE_TRANSFORMS.items():
        transform = make(h, w)
        target = transform.images(x, factor)
        result[name] = metrics.psnr(target, metrics.quantize(decode(transform.latents(z))).to(x.device)).cpu()
    return result


class DiffusabilityStatistics:
    """Everything a diffusability report needs, accumulated over batches: both spectra and the PSNRs."""

    def __init__(self):
        self.images = SpectrumStatistics()
        self.latents = SpectrumStatistics()
        self.psnr = {}  # name -> list of per-image values

    def update(self, x, z, decode=None, factor=None):
        """Add images (B, 3, H, W) and their latents (B, C, h, w); with `decode`, also the equivariance PSNRs."""
        self.images.update(x)
        self.latents.update(z)
        if decode is not None:
            for name, values in equivariance_psnr(decode, x, z, factor).items():
                self.psnr.setdefault(name, []).extend(float(v) for v in values)

    def result(self):
        """JSON-safe numbers and the verdict."""
        images, latents = self.images.result(), self.latents.result()
        psnr = {name: sum(v) / len(v) for name, v in self.psnr.items() if v}
        share_images, share_latents = images["high_frequency_share"], latents["high_frequency_share"]
        ratio = share_latents / share_images if share_images and share_latents is not None else None
        result = {
            "high_frequency_share": {"images": share_images, "latents": share_latents, "ratio": ratio},
            "equivariance_psnr": psnr,
            "spectrum": {"radius": latents["radius"], "images": images["power"], "latents": latents["power"]},
        }
        result["verdict"] = verdict(result)
        return result


def verdict(result):
    """One sentence a user reads first: what the spectrum and the equivariance error predict for diffusion training."""
    ratio = result["high_frequency_share"]["ratio"]
    psnr = result["equivariance_psnr"]
    if ratio is None:
        sentence = "latent grids too small to measure a spectrum"
    elif ratio >= EXCESS_RATIO:
        sentence = (f"latents carry {ratio:.1f}x the high-frequency energy of the images: "
                    "expect slower diffusion training")
    elif ratio <= 1 / EXCESS_RATIO:
        sentence = (f"latents carry {ratio:.2f}x the high-frequency energy of the images: smoother than the images, "
                    "easy for diffusion (check that reconstructions keep their detail)")
    else:
        sentence = f"latents carry {ratio:.1f}x the high-frequency energy of the images: a spectrum like the images'"
    if psnr.get("reconstruction") is not None and psnr["reconstruction"] < POOR_RECONSTRUCTION_DB:
        sentence += (f"; reconstructions are too poor ({psnr['reconstruction']:.1f} dB) to judge equivariance")
    elif "reconstruction" in psnr and "downscale_x2" in psnr:
        gaps = {name: psnr["reconstruction"] - psnr[name] for name in EQUIVARIANCE_TRANSFORMS if name in psnr}
        worst = max(gaps, key=gaps.get)
        what = {"downscale_x2": "a 2x-downscaled", "rotate_90": "a rotated"}[worst]
        if gaps[worst] > EQUIVARIANCE_GAP_DB:
            sentence += (f"; {what} latent decodes {gaps[worst]:.1f} dB worse than a plain one "
                         f"({psnr[worst]:.1f} vs {psnr['reconstruction']:.1f} dB): not equivariant")
        else:
            sentence += (f"; transformed latents decode within {max(gaps[worst], 0):.1f} dB of plain ones: "
                         "equivariant")
    return sentence


def retention_figure(entries):
    """PNG of hf_retention per frequency band: one line per model, (label, bands) pairs; 1.0 is the input's sharpness."""
    series = [{"label": label, "x": bands["radius"], "y": bands["ratio"]} for label, bands in entries]
    if entries:
        radius = entries[0][1]["radius"]
        series.insert(0, {"label": "as sharp as the input", "x": radius, "y": [1.0] * len(radius), "dashed": True})
    return report.line_plot(series, title="high-frequency retention per band (reconstructions' power / originals')",
                            x_label="frequency / Nyquist", y_label="power ratio (log)", log_y=True,
                            vline=(HALF_NYQUIST, "half Nyquist"), x_range=(0.0, 1.0))


def spectrum_figure(entries):
    """PNG of radially averaged spectra: the images' (once, grey) and each model's latents, log power against r."""
    series = []
    for i, (label, result) in enumerate(entries):
        spectrum = result["spectrum"]
        if i == 0:
            series.append({"label": "images", "x": spectrum["radius"], "y": spectrum["images"], "dashed": True})
        series.append({"label": f"{label} latents", "x": spectrum["radius"], "y": spectrum["latents"]})
    return report.line_plot(series, title="radially averaged power spectrum",
                            x_label="frequency / Nyquist", y_label="power per bin / white noise's (log)", log_y=True,
                            vline=(HALF_NYQUIST, "half Nyquist"), x_range=(0.0, 1.0))
