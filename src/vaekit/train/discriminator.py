"""PatchGAN discriminator: one real/fake logit per overlapping image patch.

The layout is pix2pix's NLayerDiscriminator (Isola et al. 2017, section 3.2.2), the discriminator
taming-transformers and latent-diffusion train their autoencoders against.
"""

from dataclasses import dataclass
from typing import Literal

from torch import nn


@dataclass
class DiscriminatorConfig:
    """Shape of the PatchGAN: `n_layers` stride-2 stages of `base_channels` doubling up to 8x."""

    n_layers: int = 3
    base_channels: int = 64
    norm: Literal["batch", "group", "none"] = "batch"
    in_channels: int = 3


def make_norm(kind, channels):
    """A normalisation layer for `channels` features, or Identity for 'none'."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


def init_weights(module):
    """DCGAN-style init used by pix2pix and taming: conv ~ N(0, 0.02), norm scale ~ N(1, 0.02)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class PatchDiscriminator(nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> (B, 1, h, w) patch logits; the receptive field grows with n_layers."""

    def __init__(self, config=None):
        super().__init__()
        config = config or DiscriminatorConfig()
        if config.n_layers < 1 or config.base_channels < 1:
            raise ValueError("discriminator n_layers and base_channels must be at least 1")
        self.config = config
        c = config.base_channels
        use_bias = config.norm == "none"  # a norm layer's shift makes a conv bias redundant
        layers = [nn.Conv2d(config.in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = c
        for n in range(1, config.n_layers + 1):
            out = c * min(2**n, 8)
            # The last stage keeps the resolution (stride 1), as in pix2pix.
            stride = 2 if n < config.n_layers else 1
            layers += [
                nn.Conv2d(channels, out, 4, stride=stride, padding=1, bias=use_bias),
                make_norm(config.norm, out),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x):
        """Patch logits for a batch of images."""
        return self.main(x)
