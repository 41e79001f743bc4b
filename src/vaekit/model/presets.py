"""Named AutoencoderKL architectures, as plain config dicts (no torch, so the command line can list them)."""

_SD_SHAPE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "mid_block_add_attention": True,
}

# Scaling and shift factors are the published ones for each family (diffusers' configs of
# stabilityai/sd-vae-ft-mse, sdxl-vae, stable-diffusion-3-medium and black-forest-labs/FLUX.1-dev).
PRESETS = {
    "sd": {**_SD_SHAPE, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
    "sdxl": {**_SD_SHAPE, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
    "sd3": {
        **_SD_SHAPE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
        "use_quant_conv": False, "use_post_quant_conv": False,
    },
    "flux": {
        **_SD_SHAPE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "use_quant_conv": False, "use_post_quant_conv": False,
    },
    # 16x downsampling with 32 latent channels: the same compression in floats per pixel as f8c8.
    # Its normalisation is unknown until measured: run `vaekit stats` and write it back.
    "f16c32": {
        **_SD_SHAPE, "block_out_channels": [128, 256, 512, 512, 512], "latent_channels": 32, "sample_size": 512,
        "scaling_factor": 1.0, "shift_factor": 0.0, "use_quant_conv": False, "use_post_quant_conv": False,
    },
    # About a million parameters, f8 like the real ones: for tests and the CPU demo. Groups stay 32
    # (every released VAE uses 32) so a single file without metadata still loads it exactly.
    "tiny": {
        **_SD_SHAPE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
        "sample_size": 64, "scaling_factor": 1.0, "shift_factor": 0.0,
    },
}

# diffusers' AutoencoderTiny with the TAESD architecture (madebyollin/taesd): 64 channels at every level,
# (1, 3, 3, 3) blocks down and (3, 3, 3, 1) up, 8x downsampling, about 2.4M parameters. Its encoder
# maps images straight to a teacher's *normalised* latents, hence scaling_factor 1.0 and shift 0.0
# (diffusers' convention for every TAESD); latent_magnitude 3 matches the decoder's tanh(z / 3) * 3
# input clamp. A distillation student takes its latent channels from the teacher (vaekit.train.distill).
TINY_PRESETS = {
    "taesd": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "relu", "upsample_fn": "nearest",
        "encoder_block_out_channels": [64, 64, 64, 64], "decoder_block_out_channels": [64, 64, 64, 64],
        "num_encoder_blocks": [1, 3, 3, 3], "num_decoder_blocks": [3, 3, 3, 1], "upsampling_scaling_factor": 2,
        "latent_magnitude": 3, "latent_shift": 0.5, "scaling_factor": 1.0, "shift_factor": 0.0, "force_upcast": False,
    },
}
