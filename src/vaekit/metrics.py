"""Per-image image-quality metrics on batches of images in [-1, 1]."""

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_unit(x):
    """[-1, 1] -> [0, 1], clamped (the range every metric here is defined on)."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x, y, max_db=None):
    """PSNR in dB per image, (B,); identical images give inf, or `max_db` when given."""
    values = peak_signal_noise_ratio(
        to_unit(x), to_unit(y), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    if max_db is not None:
        values = values.clamp(max=max_db)
    return values


def ssim(x, y):
    """SSIM per image, (B,): 11x11 Gaussian window, sigma 1.5 (Wang et al. 2004), data range 1."""
    return structural_similarity_index_measure(
        to_unit(x), to_unit(y), data_range=1.0, reduction="none", gaussian_kernel=True, sigma=1.5, kernel_size=11
    )


@torch.no_grad()
def reconstruct(vae, x, sample=False, generator=None):
    """Encode and decode a batch (posterior mean unless `sample`); returns images in [-1, 1]."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator) if sample else posterior.mean
    return vae.decode(z).sample
