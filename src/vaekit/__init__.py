"""vaekit: train, fine-tune, export, bulk-encode and evaluate the AutoencoderKL of latent diffusion."""

__version__ = "0.1.0"
