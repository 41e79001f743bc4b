"""The latent normalisation, kept in the model config and never as a constant in code.

Diffusion models see `normalize_latents(vae, z) = (z - shift_factor) * scaling_factor`.
"""


def scale_shift(vae):
    """(scaling_factor, shift_factor) from the model config; shift defaults to 0."""
    return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


def normalize_latents(vae, z):
    """Latents as a diffusion model sees them: (z - shift) * scale."""
    scale, shift = scale_shift(vae)
    return (z - shift) * scale


def denormalize_latents(vae, z):
    """Undo normalize_latents: z / scale + shift."""
    scale, shift = scale_shift(vae)
    return z / scale + shift
