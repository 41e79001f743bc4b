"""Latent regularisers for diffusability: equivariance (EQ-VAE), scale equivariance, foundation-model alignment (VA-VAE).

- **EQ-VAE** (Kouzelis et al., ICML 2025, arXiv 2502.09509, section 3.2; the authors' training code):
  with probability p per micro-batch the latent is downscaled by s drawn uniformly from
  {8/32, ..., 31/32} and rotated by k quarter turns, k in {1, 2, 3}, before decoding, and the
  reconstruction, perceptual and adversarial terms score the decode against the same transform of
  the image. That micro-batch has no plain reconstruction: the transformed one replaces it.
- **Scale equivariance** (Skorokhodov et al., ICML 2025, arXiv 2502.14831, section 4): the latent
  and the image are both downsampled (by 2 or 4) and the decode of the small latent must match the
  small image: a term added to the usual loss, with the reconstruction and perceptual distances.
- **VA-VAE** (Yao et al., CVPR 2025, arXiv 2501.01423, section 3.2): a 1x1 projection z' of the
  latent is aligned with a frozen foundation model's patch features f by the marginal cosine
  similarity loss (eq. 3) and the marginal distance-matrix similarity loss (eq. 4), with margins
  m1 and m2, weighted adaptively by the gradient-norm ratio at the encoder's last layer (eq. 5).
  The projection trains with the VAE, is saved in checkpoints (align.safetensors) and is not part
  of the exported VAE, like the discriminator.

Both resamplings use antialiased bilinear interpolation on latents and images alike (EQ-VAE's code
uses plain bilinear, which aliases the image target at 4x). Every random choice comes from
`transform_rng(seed, step, slot)`, so a resumed run and a run on any number of processes draw the
same transforms for the same images.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.model.architecture import downsample_factor
from vaekit.model.latents import LatentTransform
from vaekit.pretrained.features import load_feature_model
from vaekit.seeds import numpy_rng
from vaekit.train import losses

TRANSFORM_STREAM = 0x45515641  # a fourth key part: these draws never coincide with the posterior noise of a slot

EQ_SCALE_STEPS = 32  # EQ-VAE draws s from {k / 32 : 8 <= k < 32}


# A decode smaller than this cannot pass through LPIPS or the PatchGAN; scales are floored here when either is on.
MIN_DECODED_SIDE = 32


def transform_rng(seed, step, slot):
    """The numpy Generator of one micro-batch's random transforms, keyed like its posterior noise."""
    return numpy_rng(seed, step, slot, TRANSFORM_STREAM)


class Plan(NamedTuple):
    """What one micro-batch applies: EQ-VAE's transform (replacing the plain decode) and scale equivariance's."""

    replace: LatentTransform | None = None
    extra: tuple = ()


def draw_equivariance(rng, grid, prob, min_scale, rotate, min_side=1):
    """EQ-VAE's transform for a latent grid (h, w) with probability `prob`, else None."""
    use = rng.random()
    k = rng.integers(math.ceil(min_scale * EQ_SCALE_STEPS), EQ_SCALE_STEPS)
    turns = rng.integers(1, 4)
    if use >= prob:
        return None
    scale = k / EQ_SCALE_STEPS
    size = tuple(min(side, max(min_side, math.floor(side * scale))) for side in grid)
    return LatentTransform(size=size, rotation=int(turns) if rotate else 0)


def draw_scale(rng, grid, factors, min_side=1):
    """Scale equivariance's downsampling of a latent grid (h, w) by one of `factors`, drawn uniformly."""
    factor = int(factors[rng.integers(len(factors))])
    return LatentTransform(size=tuple(min(side, max(min_side, side // factor)) for side in grid))


def alignment_losses(projected, features, margin_cos, margin_distance):
    """VA-VAE's marginal cosine similarity and marginal distance-matrix similarity losses, each a mean.

    `projected` (B, D, h, w): the projected latents z'; `features` (B, D, h, w): the frozen model's.
    L_mcos = mean over positions of ReLU(1 - m1 - cos(z'_ij, f_ij)) (eq. 3); L_mdms = mean over
    position pairs (i, j) of one image of ReLU(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2) (eq. 4), as
    the released code computes both on the projection.
    """
    z = F.normalize(projected.float().flatten(2), dim=1)  # (B, D, N), unit vectors per position
    f = F.normalize(features.float().flatten(2), dim=1)  # (B, D, N)
    cos = F.relu(1 - margin_cos - (z * f).sum(dim=1)).mean()  # (B, N) -> scalar
    similarity_z = z.transpose(1, 2) @ z  # (B, N, N)
    similarity_f = f.transpose(1, 2) @ f  # (B, N, N)
    distance = F.relu((similarity_z - similarity_f).abs() - margin_distance).mean()
    return cos, distance


class Regularizer:
    """The regularisers of one run: random plans, the extra loss terms, the alignment projection and feature model."""

    def __init__(self, loss_cfg, factor, latent_channels, encoder_layer, feature_model=None, min_side=1, device=None):
        self.cfg, self.factor, self.encoder_layer, self.min_side = loss_cfg, factor, encoder_layer, min_side
        self.feature_model = feature_model
        self.projection = None
        if feature_model is not None:
            # VA-VAE's linear projection of the latent to the feature dimension, at every position.
            self.projection = nn.Conv2d(latent_channels, feature_model.dim, kernel_size=1, bias=False).to(device)

    def latent_grid(self, x):
        """The latent grid (h, w) of images (B, 3, H, W)."""
        return math.ceil(x.shape[-2] / self.factor), math.ceil(x.shape[-1] / self.factor)

    def plan(self, rng, grid):
        """This micro-batch's transforms for a latent grid (h, w), all drawn from `rng`."""
        cfg = self.cfg
        replace = draw_equivariance(rng, grid, cfg.equivariance_prob, cfg.equivariance_min_scale,
                                    cfg.equivariance_rotate, self.min_side)
        extra = draw_scale(rng, grid, cfg.scale_equivariance_factors, self.min_side)
        return Plan(replace, (extra,) if cfg.scale_equivariance_weight > 0 else ())

    def loss(self, outputs, x, plan, nll, perceptual, logs):
        """The scale-equivariance and alignment terms of one micro-batch (a scalar tensor), logged into `logs`.

        `outputs`: the TrainingOutputs of the forward that applied `plan`; `nll`: the reconstruction
        (+ perceptual) loss the adaptive alignment weight compares with.
        """
        cfg = self.cfg
        total = nll.new_zeros(())
        for transform, decoded in zip(plan.extra, outputs.extras):
            target = transform.images(x, self.factor)
            term = losses.reconstruction_loss(decoded.float(), target.float(), cfg.reconstruction)
            if perceptual is not None and cfg.perceptual_weight > 0:
                term = term + cfg.perceptual_weight * perceptual(decoded, target)
            total = total + cfg.scale_equivariance_weight * term
            logs["se"] = term.detach()
        if self.projection is not None:
            features = self.feature_model(x, outputs.projected.shape[-2:])
            cos, distance = alignment_losses(outputs.projected, features, cfg.align_margin_cos,
                                             cfg.align_margin_distance)
            align = cos + distance
            weight = torch.tensor(1.0, device=align.device)
            if cfg.align_adaptive:
                weight = losses.adaptive_weight(nll, align, self.encoder_layer, cfg.align_max_adaptive_weight)
            weight = weight * cfg.align_weight
            total = total + weight * align
            logs.update(align_cos=cos.detach(), align_distance=distance.detach(), align_weight=weight.detach())
        return total

    def state_dict(self):
        """The alignment projection's weights (what checkpoints keep of the regularisers), or None."""
        return self.projection.state_dict() if self.projection is not None else None

    def load_state_dict(self, state):
        """Put back what `state_dict` returned."""
        if self.projection is not None and state is not None:
            self.projection.load_state_dict(state)


def regularizers_on(loss_cfg):
    """Whether any regulariser of this module is switched on."""
    return loss_cfg.equivariance_prob > 0 or loss_cfg.scale_equivariance_weight > 0 or loss_cfg.align_weight > 0


def build_regularizer(cfg, vae, device=None):
    """The Regularizer of a TrainConfig for this VAE, or None when every regulariser is off."""
    loss_cfg = cfg.loss
    if not regularizers_on(loss_cfg):
        return None
    factor = downsample_factor(vae)
    scored = loss_cfg.perceptual_weight > 0 or cfg.disc.weight > 0
    min_side = math.ceil(MIN_DECODED_SIDE / factor) if scored else 1
    feature_model = None
    if loss_cfg.align_weight > 0:
        feature_model = load_feature_model(loss_cfg.align_model, device=device, dtype=loss_cfg.align_dtype)
    return Regularizer(loss_cfg, factor, vae.config.latent_channels, vae.encoder.conv_out.weight, feature_model,
                       min_side, device)
