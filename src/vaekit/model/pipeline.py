"""Plugging a vaekit VAE into a diffusers pipeline, with the shape check diffusers does not make."""

from vaekit.errors import VaekitError
from vaekit.model.architecture import cast_vae, downsample_factor, latent_channels


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


def replace_vae(pipe, vae):
    """Swap `vae` into `pipe` after checking it fits; updates the pipeline's scale factor."""
    check_vae_fits(pipe, vae)
    vae = cast_vae(vae, device=pipe.device, dtype=pipe.dtype)
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
