"""The model: diffusers' AutoencoderKL (and AutoencoderTiny) built from presets, loaded from any model argument, saved.

- `presets`: the named architectures (sd, sdxl, sd3, flux, f16c32, tiny; taesd), plain data;
- `architecture`: building, checking, copying, describing and fingerprinting an AutoencoderKL;
- `tiny`: AutoencoderTiny (TAESD): config checks, building, TAESD's two-file layout;
- `normalization`: the latent normalisation `(z - shift) * scale` that lives in the model config;
- `latents`: the posterior's KL to the prior, and transforms applied alike to latents and images;
- `single_file`: the original latent-diffusion key layout, one mapping table used both ways;
- `load`: `load_vae(spec)` for every model argument, and saving diffusers folders;
- `pipeline`: plugging a VAE into a diffusers pipeline with the latent-channel and latent-space checks.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "PRESETS": "presets",
    "TINY_PRESETS": "presets",
    "is_tiny": "architecture",
    "save_taesd": "tiny",
    "load_taesd": "tiny",
    "build_preset": "architecture",
    "build_vae": "architecture",
    "cast_vae": "architecture",
    "describe": "architecture",
    "downsample_factor": "architecture",
    "fingerprint": "architecture",
    "encoder_fingerprint": "architecture",
    "latent_channels": "architecture",
    "vae_config": "architecture",
    "normalize_latents": "normalization",
    "denormalize_latents": "normalization",
    "scale_shift": "normalization",
    "kl_divergence": "latents",
    "LatentTransform": "latents",
    "load_single_file": "single_file",
    "save_single_file": "single_file",
    "load_vae": "load",
    "save_diffusers": "load",
    "replace_vae": "pipeline",
    "latent_space_error": "pipeline",
    "check_shared_latent_space": "pipeline",
})
