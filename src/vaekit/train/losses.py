"""Training losses for the KL autoencoder: reconstruction, perceptual, KL, adversarial, adaptive weight.

Reduction convention (one number per term, all means, so weights do not change with image size):

- reconstruction: mean over every pixel value (B, 3, H, W);
- perceptual: LPIPS per image, mean over the batch;
- KL: mean over every latent element (B, C, h, w);
- adversarial: mean over the discriminator's patch logits.

latent-diffusion (ldm/modules/losses/contperceptual.py) instead *sums* the reconstruction (+ LPIPS,
broadcast per pixel) over pixels and the KL over latent elements, then divides both by the batch size.
Dividing its whole loss by the pixel count 3*H*W gives this module's terms, with

    kl_weight = ldm_kl_weight * (C * h * w) / (3 * H * W) = ldm_kl_weight * C / (3 * f**2)

for an f-times downsampling VAE with C latent channels: `kl_weight: 1e-6` of the SD recipe (f=8, C=4)
is 1e-6 * 4 / 192 = 2.08e-8 here, and 8.33e-8 for C=16. The perceptual weight carries over unchanged,
and so does the adaptive adversarial weight, because it is a ratio of gradient norms (see
`adaptive_weight`). latent-diffusion's learned `logvar` is not in its optimizer, so it stays 0 and
drops out.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.model.latents import kl_divergence
from vaekit.pretrained import backbones


def reconstruction_loss(x, y, kind="l1"):
    """Per-pixel mean L1 or L2 (MSE) distance between two image batches."""
    if kind == "l1":
        return (x - y).abs().mean()
    if kind == "l2":
        return (x - y).square().mean()
    raise ValueError(f"reconstruction loss kind must be 'l1' or 'l2', got {kind!r}")


def kl_loss(mean, logvar, free_bits=0.0):
    """KL to N(0, I) as a mean over latent elements, with optional free bits per channel.

    `mean`, `logvar`: (B, C, h, w) posterior parameters. With `free_bits` > 0 each channel's KL, averaged
    over batch and positions (nats per latent element), is clamped from below at `free_bits` before the
    mean over channels, so the optimizer stops squeezing a channel once it is under that budget
    (the "free bits" of Kingma et al. 2016, "Improved Variational Inference with Inverse Autoregressive
    Flow", appendix C, with channels as the groups). The returned value keeps the clamp, so its gradient is
    zero for channels below the budget. See the module docstring for the mapping to latent-diffusion.
    """
    kl = kl_divergence(mean.float(), logvar.float())  # (B, C, h, w)
    if free_bits <= 0:
        return kl.mean()
    per_channel = kl.transpose(0, 1).flatten(1).mean(dim=1)  # (C,)
    return per_channel.clamp(min=free_bits).mean()


def kl_weight_at(step, weight, warmup_steps=0):
    """KL weight after linear annealing from 0 to `weight` over `warmup_steps` optimizer steps."""
    # KL annealing (Bowman et al. 2016, "Generating Sentences from a Continuous Space") keeps the
    # posterior from collapsing onto the prior before the decoder learns to use the latents.
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)


def disc_loss(real_logits, fake_logits, kind="hinge"):
    """Discriminator loss on real and (detached) fake patch logits: 'hinge' or 'non_saturating'."""
    # Both halves carry the 0.5 of taming-transformers' hinge_d_loss / vanilla_d_loss.
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    if kind == "non_saturating":
        # -log sigmoid(real) - log(1 - sigmoid(fake)), written with softplus for stability.
        return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    raise ValueError(f"discriminator loss kind must be 'hinge' or 'non_saturating', got {kind!r}")


def generator_loss(fake_logits, kind="hinge"):
    """Generator (VAE) adversarial loss on the discriminator's logits for reconstructions."""
    if kind == "hinge":
        # Geometric-GAN generator loss, as in taming-transformers' VQLPIPSWithDiscriminator.
        return -fake_logits.mean()
    if kind == "non_saturating":
        # -log sigmoid(fake) (Goodfellow et al. 2014, section 3).
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"generator loss kind must be 'hinge' or 'non_saturating', got {kind!r}")


def adaptive_weight(rec_loss, g_loss, last_layer_weight, max_weight=1e4, eps=1e-4):
    """Adversarial weight ||grad rec|| / (||grad g|| + eps) at the decoder's last layer, detached.

    From taming-transformers (Esser et al. 2021, eq. 7, `calculate_adaptive_weight`): the adversarial
    gradient reaching the output layer is scaled to the size of the reconstruction gradient. The ratio
    is independent of how the reconstruction is reduced: latent-diffusion's summed loss divided by
    3*H*W gives exactly this module's mean loss with this weight (its clamp at 1e4 then corresponds
    to 1e4 / (3*H*W) here). Both graphs are kept for the backward pass that follows.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (g_grad.float().norm() + eps)
    # A non-finite gradient (fp16 overflow) must not poison the total loss through this factor.
    weight = torch.nan_to_num(weight, nan=0.0, posinf=max_weight)
    return weight.clamp(0.0, max_weight).detach()


def r1_penalty(real_logits, real_images):
    """R1 gradient penalty: batch mean of ||d D(x) / d x||^2 on real images (Mescheder et al. 2018, section 4.1).

    `real_images` must have `requires_grad` set before the discriminator forward; the graph is
    created so the penalty trains the discriminator. Multiply by gamma / 2 for the paper's term.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.float().square().flatten(1).sum(dim=1).mean()  # (B, 3*H*W) -> (B,) -> scalar


class PerceptualLoss(nn.Module):
    """LPIPS distance with gradients to its inputs; the network itself is frozen and stays in eval mode.

    Inputs are image batches in [-1, 1]; the result is the mean LPIPS over the batch. The `lpips`
    package computes the distance; this wrapper only pins the frozen state and the reduction.
    """

    def __init__(self, net="vgg", path=None, model=None):
        super().__init__()
        if model is None:
            model = backbones.load_lpips(net=net, path=path)
        model.eval()
        model.requires_grad_(False)
        self.lpips = model

    def train(self, mode=True):
        """Ignore train(): LPIPS dropout and batch statistics must not change during training."""
        return super().train(False)

    def forward(self, x, y):
        """Mean LPIPS between batches `x` and `y`, both (B, 3, H, W) in [-1, 1]."""
        return self.lpips(x, y, normalize=False).mean()  # (B, 1, 1, 1) -> scalar
