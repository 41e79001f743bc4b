"""The latent space as the model defines it, shared by training and evaluation.

- `kl_divergence`: the diagonal-Gaussian posterior's KL to the N(0, I) prior, element-wise; the
  trainer's KL term (`train.losses.kl_loss`) and the latent diagnostics (`eval.diagnostics`) both
  reduce it their own way.
- `LatentTransform`: a spatial transform applied alike to a latent and to the image it encodes;
  the equivariance regularisers train with it (`train.regularizers`) and the diffusability report
  measures with it (`eval.diffusability`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kl_divergence(mean, logvar):
    """Element-wise KL(N(mean, exp(logvar)) || N(0, 1)) in nats, same shape as `mean`."""
    # Closed form for Gaussians (Kingma & Welling 2014, appendix B): 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2).
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def resize(t, size):
    """(B, C, H, W) -> (B, C, *size) by antialiased bilinear interpolation; `t` itself when the size already matches."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    # In float32: antialiased resampling has no half-precision kernel on every device.
    return F.interpolate(t.float(), size=tuple(size), mode="bilinear", antialias=True, align_corners=False).to(t.dtype)


@dataclass(frozen=True)
class LatentTransform:
    """A spatial transform applied alike to a latent and to its image: resize to a latent grid, then rotate."""

    size: tuple | None = None  # latent (h, w) after resizing; None keeps the size
    rotation: int = 0  # quarter turns of torch.rot90 over the last two dimensions

    @property
    def identity(self):
        return self.size is None and self.rotation % 4 == 0

    def latents(self, z):
        """The transform of latents (B, C, h, w)."""
        if self.size is not None:
            z = resize(z, self.size)
        return torch.rot90(z, self.rotation, dims=(-2, -1)) if self.rotation % 4 else z

    def images(self, x, factor):
        """The same transform of the images (B, 3, h * factor, w * factor) those latents encode."""
        if self.size is not None:
            x = resize(x, (self.size[0] * factor, self.size[1] * factor))
        return torch.rot90(x, self.rotation, dims=(-2, -1)) if self.rotation % 4 else x
