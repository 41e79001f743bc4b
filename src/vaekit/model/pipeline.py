"""Plugging a vaekit VAE into a diffusers pipeline, with the checks diffusers does not make.

A diffusers pipeline hands its VAE `latents / vae.config.scaling_factor + vae.config.shift_factor`
of what its denoiser made, so a VAE fits when it decodes the denoiser's *normalised* latent space
(vaekit.model.normalization). The latent channels and downsampling say whether it can; only
measuring says whether it does: two VAEs of the same shape trained apart have unrelated latent
spaces. `replace_vae` therefore encodes a few fixed test images with the pipeline's current VAE
and the new one and compares their normalised latents (`latent_space_error`), which is how a
distilled student (vaekit.train.distill), KL or tiny, proves it keeps its teacher's latent space.
"""

import math

import torch

from vaekit.errors import VaekitError
from vaekit.model.architecture import cast_vae, downsample_factor, is_tiny, latent_channels, model_device, model_dtype
from vaekit.model.normalization import normalize_latents

# Relative RMS distance between normalised latents above which two VAEs do not share a latent space. Unrelated
# VAEs with unit-variance latents sit near sqrt(2) (independent latents) or above; a distilled student well below.
LATENT_SPACE_TOLERANCE = 0.5


def denoiser_latent_channels(pipe):
    """Latent channels the pipeline's UNet or transformer expects, or None when it cannot tell."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if denoiser is None:
        return None
    channels = denoiser.config.in_channels
    # FLUX packs 2x2 latent patches into the transformer's channels.
    if type(denoiser).__name__.startswith("Flux"):
        channels //= 4
    return channels


def check_vae_fits(pipe, vae):
    """Raise a clear error when the VAE's latents do not fit the pipeline's denoiser."""
    expected = denoiser_latent_channels(pipe)
    # Inpainting UNets take latents + masked latents + mask; their *output* channels match the VAE.
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    out = getattr(denoiser.config, "out_channels", None) if denoiser is not None else None
    if expected is not None and latent_channels(vae) not in (expected, out):
        raise VaekitError(
            f"This VAE makes {latent_channels(vae)}-channel latents but the pipeline's "
            f"{type(denoiser).__name__} expects {expected}. Use a VAE of the same family as the diffusion model "
            f"(4 channels for SD 1.x/2.x/SDXL, 16 for SD3 and FLUX)."
        )


def probe_images(size, count=2, seed=0):
    """(count, 3, size, size) fixed photo-like test images in [-1, 1]: smooth colour fields, edges and fine texture."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, size)
    y, x = torch.meshgrid(grid, grid, indexing="ij")  # (size, size) each
    images = []
    for _ in range(count):
        image = torch.zeros(3, size, size)
        for _ in range(6):  # low-frequency colour waves
            fx, fy, phase = (torch.rand(3, generator=generator) * torch.tensor([4.0, 4.0, 2 * math.pi])).tolist()
            colour = torch.rand(3, 1, 1, generator=generator) - 0.5
            image += colour * torch.sin(2 * math.pi * (fx * x + fy * y) + phase)
        for _ in range(4):  # flat discs with sharp edges
            cx, cy, radius = torch.rand(3, generator=generator).tolist()
            inside = ((x - cx) ** 2 + (y - cy) ** 2) < (0.05 + 0.2 * radius) ** 2
            image = torch.where(inside, torch.rand(3, 1, 1, generator=generator) * 2 - 1, image)
        image += 0.08 * torch.randn(3, size, size, generator=generator)  # texture
        images.append(image.clamp(-1, 1))
    return torch.stack(images)


@torch.no_grad()
def normalised_latents(vae, images):
    """The latents a diffusion model sees for `images`: the posterior mean (a tiny model's latents), normalised."""
    x = images.to(model_device(vae), model_dtype(vae))
    z = vae.encode(x).latents if is_tiny(vae) else vae.encode(x).latent_dist.mean
    return normalize_latents(vae, z.float())


def latent_space_error(reference, vae, images=None):
    """RMS distance between the normalised latents of `vae` and `reference` over the RMS of `reference`'s (about
    0 for a shared latent space; about 1.4 or more for unrelated ones). `images` default to `probe_images`."""
    check_same_shape(reference, vae)
    if images is None:
        images = probe_images(8 * downsample_factor(reference))
    expected, got = normalised_latents(reference, images), normalised_latents(vae, images)
    distance = (got - expected.to(got.device)).square().mean().sqrt()
    return float(distance / expected.square().mean().sqrt().clamp_min(1e-12))


def check_same_shape(reference, vae):
    """Raise unless the two VAEs make latents of the same channels and downsampling."""
    for what, a, b in (("latent channels", latent_channels(reference), latent_channels(vae)),
                       ("downsampling factor", downsample_factor(reference), downsample_factor(vae))):
        if a != b:
            raise VaekitError(f"This VAE's {what} is {b} but the pipeline's VAE's is {a}: it cannot share its latent "
                              f"space. Distil a student from that VAE (vaekit train distill.teacher=...).")


def check_shared_latent_space(reference, vae, tolerance=LATENT_SPACE_TOLERANCE, images=None):
    """Raise unless `vae` encodes into `reference`'s normalised latent space (`latent_space_error` <= tolerance)."""
    error = latent_space_error(reference, vae, images)
    if not error <= tolerance:
        raise VaekitError(
            f"This VAE does not share the pipeline's latent space: its normalised latents of test images differ from "
            f"the pipeline VAE's by {error:.2f} of their RMS (at most {tolerance} for a shared space). A denoiser "
            f"trained on the other VAE's latents would decode to garbage. Use a student distilled from that VAE, or "
            f"pass check_latent_space=False to swap it anyway.")
    return error


def replace_vae(pipe, vae, check_latent_space=True, tolerance=LATENT_SPACE_TOLERANCE):
    """Swap `vae` (AutoencoderKL or AutoencoderTiny) into `pipe` after checking it fits; updates the scale factor.

    With `check_latent_space`, a pipeline that already holds a VAE measures that the new one encodes
    into the same normalised latent space (`latent_space_error`); a VAE that does not is refused.
    """
    check_vae_fits(pipe, vae)
    current = getattr(pipe, "vae", None)
    vae = cast_vae(vae, device=pipe.device, dtype=pipe.dtype)
    if check_latent_space and current is not None and current is not vae:
        check_shared_latent_space(current, vae, tolerance)
    pipe.register_modules(vae=vae)
    old, factor = getattr(pipe, "vae_scale_factor", None), downsample_factor(vae)
    if old is not None:
        pipe.vae_scale_factor = factor
    processor = getattr(pipe, "image_processor", None)
    if processor is not None and hasattr(processor.config, "vae_scale_factor"):
        # FLUX's processor works in multiples of 2x the VAE factor (its 2x2 packing); keep that ratio.
        ratio = processor.config.vae_scale_factor // old if old else 1
        processor.register_to_config(vae_scale_factor=factor * ratio)
    return pipe
