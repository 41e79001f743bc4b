"""`vaekit sample` and `vaekit interpolate`: decoding the prior, and paths between two images' latents."""

import math
from pathlib import Path

import torch

from vaekit.codec.inference import decode, encode
from vaekit.data.crops import resize_center_crop, to_pil, to_tensor
from vaekit.data.decode import decode_image
from vaekit.errors import VaekitError
from vaekit.eval import report
from vaekit.model.architecture import downsample_factor, latent_channels
from vaekit.model.normalization import denormalize_latents, normalize_latents


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


def sample_images(vae, n, size, seed=0, batch_size=8):
    """Decode z ~ N(0, I) drawn in the normalised latent space: (n, 3, size, size) in [-1, 1]."""
    f = downsample_factor(vae)
    side = math.ceil(size / f)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, latent_channels(vae), side, side, generator=generator)  # (n, C, h, w)
    device = next(vae.parameters()).device
    images = [decode(vae, denormalize_latents(vae, z).to(device), size=(size, size)).clamp(-1, 1).cpu()
              for z in noise.split(batch_size)]
    return torch.cat(images)


def interpolate_images(vae, a, b, steps, spherical=False):
    """Decode `steps` latents between the posterior means of images a and b (1, 3, H, W): (steps, 3, H, W)."""
    if steps < 2:
        raise VaekitError(f"--steps must be at least 2 (both ends), got {steps}.")
    device = next(vae.parameters()).device
    means = encode(vae, torch.cat([a, b]).to(device))[0]  # (2, C, h, w)
    # Interpolate in the normalised space, where the prior is N(0, I) and slerp's geometry applies.
    za, zb = normalize_latents(vae, means[:1]), normalize_latents(vae, means[1:])
    mix = slerp if spherical else lerp
    frames = []
    for t in torch.linspace(0, 1, steps).tolist():
        z = denormalize_latents(vae, mix(za, zb, t))
        frames.append(decode(vae, z, size=tuple(a.shape[-2:])).clamp(-1, 1).cpu())
    return torch.cat(frames)


def grid_png(images, columns, path):
    """Save images (N, 3, H, W) in [-1, 1] as one PNG grid, atomically."""
    report.save_png(report.make_grid_image([to_pil(t) for t in images], columns), path)
    return path


def read_image(path, size):
    """One image file, resized and centre-cropped to `size`, as (1, 3, size, size) in [-1, 1]."""
    if not Path(path).is_file():
        raise VaekitError(f"Image not found: {path}. Pass an existing image file.")
    img, _ = resize_center_crop(decode_image(path), size)
    return to_tensor(img)[None]
