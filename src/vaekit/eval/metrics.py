"""Per-image image-quality metrics on batches of images in [-1, 1], and set-level rFID.

Every per-image function takes (x, y) batches (B, 3, H, W) in [-1, 1] (x the original, y the
reconstruction) and returns a (B,) tensor or (B, 3) for per-channel values.
"""

import functools
import math

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

# MS-SSIM's five scale weights (Wang, Simoncelli & Bovik 2003, Table 1), torchmetrics' default.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_KERNEL = 11


def to_unit(x):
    """[-1, 1] -> [0, 1], clamped (the range every metric here is defined on)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def quantize(x):
    """Round images in [-1, 1] to the 256 levels an 8-bit PNG keeps (clamped), still in [-1, 1]."""
    return (to_unit(x) * 255).round() / 127.5 - 1


def psnr(x, y, max_db=None):
    """PSNR in dB per image, (B,); identical images give inf, or `max_db` when given."""
    values = peak_signal_noise_ratio(
        to_unit(x), to_unit(y), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    if max_db is not None:
        values = values.clamp(max=max_db)
    return values


def ssim(x, y):
    """SSIM per image, (B,): 11x11 Gaussian window, sigma 1.5 (Wang et al. 2004), data range 1.

    The mean of the SSIM map over the windows that lie inside the image, as Wang et al.'s reference
    code (filter2 'valid') and scikit-image do. torchmetrics 1.9 also averages the border windows it
    computes on reflect-padded images, which moves SSIM by up to 0.01 on 64 px images, so its full
    map is taken and cropped here.
    """
    # float64: in float32, E[x^2] - E[x]^2 cancels enough to put identical images at 0.9999.
    _, full = structural_similarity_index_measure(
        to_unit(x).double(), to_unit(y).double(), data_range=1.0, reduction="none", gaussian_kernel=True, sigma=1.5, kernel_size=11,
        return_full_image=True,
    )
    border = SSIM_KERNEL // 2  # windows centred nearer the edge reach outside the image
    return full[..., border:-border, border:-border].mean(dim=(1, 2, 3)).float()  # (B, C, H, W) -> (B,)


def ms_ssim_scales(height, width, kernel_size=SSIM_KERNEL):
    """How many MS-SSIM scales (at most 5) an image of this size allows; 0 when it is too small for one."""
    side = min(height, width)

    def fits(scales):
        # The coarsest scale (side / 2^(scales - 1)) must exceed the window, and torchmetrics 1.9 checks
        # side // (scales - 1)^2 > kernel_size - 1 and side >= 2^scales (its stricter rule for 4 scales).
        return (side // 2 ** (scales - 1) > kernel_size - 1 and side // max(1, scales - 1) ** 2 > kernel_size - 1
                and side >= 2**scales)

    return max((s for s in range(1, len(MS_SSIM_BETAS) + 1) if fits(s)), default=0)


def ms_ssim(x, y):
    """MS-SSIM per image, (B,) (Wang et al. 2003; torchmetrics), data range 1, Gaussian 11x11, sigma 1.5.

    Images under 176 px cannot hold five scales; they use the first scales that fit with the
    weights renormalised to sum to 1 (`ms_ssim_scales` says how many). Below 11 px the value is NaN.
    """
    scales = ms_ssim_scales(*x.shape[-2:])
    if scales == 0:
        return torch.full((x.shape[0],), float("nan"), device=x.device)
    betas = MS_SSIM_BETAS[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    return multiscale_structural_similarity_index_measure(
        to_unit(x).double(), to_unit(y).double(), data_range=1.0, reduction="none", gaussian_kernel=True, sigma=1.5,
        kernel_size=SSIM_KERNEL, betas=betas,
    ).float()


@torch.no_grad()
def lpips_distance(model, x, y):
    """LPIPS per image, (B,), with a `lpips.LPIPS` module (vaekit.weights.load_lpips); inputs clamped to [-1, 1]."""
    return model(x.float().clamp(-1, 1), y.float().clamp(-1, 1)).flatten()  # (B, 1, 1, 1) -> (B,)


def colour_shift(x, y):
    """Mean per-channel difference y - x in 8-bit levels, (B, 3): a tint the decoder adds (R, G, B)."""
    return (to_unit(y) - to_unit(x)).mean(dim=(-2, -1)) * 255


# ---------------------------------------------------------------------------------------------------
# Periodic artifacts
#
# Written here because no library scores them. Decoders that upsample by 2 (transposed or
# nearest-neighbour convolutions, three times in an f8 VAE) leave checkerboard patterns of period 2
# and grids of period 4 or 8 pixels (Odena et al. 2016, "Deconvolution and Checkerboard
# Artifacts"). Such a pattern in the reconstruction error e = y - x puts its energy into a few
# spectral lines: the harmonics (a H / p, b W / p) of the period p. Broadband error (blur, noise)
# spreads its energy smoothly over the spectrum instead. The score compares the error's power at
# those harmonics with the power in a ring of bins around them, in dB:
#   0 dB: no periodic structure; about +10 dB and up: a visible grid.
# Measuring the error rather than the reconstruction makes it relative to the original, so a grid
# that is already in the input (JPEG's 8x8 blocks) is not blamed on the VAE.


@functools.lru_cache(maxsize=32)
def _harmonic_masks(height, width, period, exclude_period):
    """(peak, ring) boolean masks (H, W) over the FFT bins of the harmonics of `period`."""
    peak = torch.zeros(height, width, dtype=torch.bool)
    near = torch.zeros(height, width, dtype=torch.bool)
    ring = torch.zeros(height, width, dtype=torch.bool)
    rows, cols = torch.arange(height), torch.arange(width)

    def block(u, v, radius):
        # Bins within `radius` of (u, v), wrapping around as the DFT does.
        du = torch.minimum((rows - u) % height, (u - rows) % height) <= radius  # (H,)
        dv = torch.minimum((cols - v) % width, (v - cols) % width) <= radius  # (W,)
        return du[:, None] & dv[None, :]  # (H, W)

    excluded = set()
    if exclude_period:
        excluded = {(round(a * height / exclude_period) % height, round(b * width / exclude_period) % width)
                    for a in range(exclude_period) for b in range(exclude_period)}
    harmonics = {(round(a * height / period) % height, round(b * width / period) % width)
                 for a in range(period) for b in range(period)}
    harmonics.discard((0, 0))
    for u, v in harmonics:
        # The Hann window spreads a line over its bin and the two beside it: a 3x3 block holds it.
        near |= block(u, v, 2)
        if (u, v) not in excluded:
            peak |= block(u, v, 1)
            ring |= block(u, v, 4)
    ring &= ~near  # the ring: bins 3-4 away from this harmonic and at least 3 from any other
    ring &= ~block(0, 0, 4)  # and clear of the DC region, where natural errors hold most power
    return peak, ring


def periodic_artifact_db(x, y, period, exclude_period=None):
    """Power of the error y - x at the harmonics of `period` px over the power around them, in dB, (B,).

    `exclude_period` leaves out the harmonics shared with a shorter period (scored separately).
    NaN when the image is too small for the harmonics to have a ring of their own (side < 8 * period).
    """
    height, width = x.shape[-2:]
    if min(height, width) < 8 * period:
        return torch.full((x.shape[0],), float("nan"), device=x.device)
    error = to_unit(y).double() - to_unit(x).double()  # (B, 3, H, W)
    error = error - error.mean(dim=(-2, -1), keepdim=True)
    # A Hann window stops the image borders (the DFT sees a periodic tiling) leaking power along the axes.
    window = torch.outer(torch.hann_window(height, periodic=False, dtype=torch.float64),
                         torch.hann_window(width, periodic=False, dtype=torch.float64)).to(x.device)  # (H, W)
    power = torch.fft.fft2(error * window).abs().square().mean(dim=1)  # (B, H, W), mean over RGB
    peak, ring = (m.to(x.device) for m in _harmonic_masks(height, width, period, exclude_period))
    peak_power = power[:, peak].mean(dim=1)  # (B,)
    ring_power = power[:, ring].mean(dim=1)  # (B,)
    tiny = 1e-30  # identical images: 0 / 0 reads as 0 dB
    return (10 * torch.log10((peak_power + tiny) / (ring_power + tiny))).float()


def checkerboard_db(x, y):
    """Period-2 (Nyquist) checkerboard score of the error, dB, (B,); see periodic_artifact_db."""
    return periodic_artifact_db(x, y, 2)


def grid_db(x, y, period=8):
    """Grid score at `period` px (the downsampling factor), period-2 lines left to checkerboard_db; dB, (B,)."""
    return periodic_artifact_db(x, y, period, exclude_period=2 if period % 2 == 0 else None)


# ---------------------------------------------------------------------------------------------------
# rFID


def feature_statistics(features):
    """(mean (D,), covariance (D, D)) of features (N, D) in float64; N >= 2."""
    features = features.double()
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)  # (D, D)


def frechet_distance(mean1, cov1, mean2, cov2):
    """Fréchet distance between Gaussians N(mean1, cov1) and N(mean2, cov2) (Heusel et al. 2017, eq. 6).

    d^2 = |m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)), where tr((C1 C2)^(1/2)) is computed as
    tr((C1^(1/2) C2 C1^(1/2))^(1/2)): the same eigenvalues, from a symmetric matrix, so eigh applies
    and a singular covariance (fewer images than feature dimensions) stays exact.
    """
    mean1, mean2, cov1, cov2 = (t.double() for t in (mean1, mean2, cov1, cov2))
    values, vectors = torch.linalg.eigh(cov1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # C1^(1/2)
    middle = root1 @ cov2 @ root1
    middle = (middle + middle.T) / 2  # symmetric up to rounding; eigh wants it exactly
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return max(float(distance), 0.0)


def fid_from_features(features1, features2):
    """rFID between two feature sets (N1, D) and (N2, D); NaN when either has fewer than 2 rows.

    With fewer images than dimensions the D x D eigendecompositions are skipped: for centred
    features A (N1, D) and B (N2, D), C1 C2 = A'A B'B / ((N1-1)(N2-1)) has the same non-zero
    eigenvalues as (A B')(A B')' / ((N1-1)(N2-1)), so tr((C1 C2)^(1/2)) is the sum of the singular
    values of the small matrix A B' (N1, N2) over sqrt((N1-1)(N2-1)). Exact, and far faster.
    """
    n1, n2 = features1.shape[0], features2.shape[0]
    if n1 < 2 or n2 < 2:
        return math.nan
    if n1 * n2 >= features1.shape[1] ** 2:
        return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
    a = features1.double() - features1.double().mean(dim=0)
    b = features2.double() - features2.double().mean(dim=0)
    mean_term = (features1.double().mean(dim=0) - features2.double().mean(dim=0)).square().sum()
    traces = a.square().sum() / (n1 - 1) + b.square().sum() / (n2 - 1)  # tr(C1) + tr(C2)
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    return max(float(mean_term + traces - 2 * trace_sqrt), 0.0)

