"""One generator and one discriminator micro-step, and the model wrapper they run through.

Correctness rules kept here (each has a test):
- every forward that needs gradients goes through the module Accelerate prepared, so DDP syncs them;
- the generator step cannot put gradients into the discriminator (its parameters are frozen for the
  step) and the discriminator step cannot put gradients into the VAE (it sees detached images).
"""

import contextlib

import torch
from torch import nn

from vaekit.train import losses


class AutoencoderForTraining(nn.Module):
    """Encode, sample and decode in one forward, so the prepared (DDP) module sees every trainable use.

    diffusers' AutoencoderKL.forward returns only the reconstruction; the KL term also needs the
    posterior, and calling `vae.encode` on the unwrapped model would bypass DDP's gradient sync.
    """

    def __init__(self, vae, freeze_encoder=False, sample_posterior=True):
        super().__init__()
        self.vae = vae
        self.freeze_encoder = freeze_encoder
        self.sample_posterior = sample_posterior
        if freeze_encoder:
            self.encoder_modules().requires_grad_(False)

    def encoder_modules(self):
        """The encoder and quant_conv: what decoder fine-tuning keeps fixed."""
        quant = self.vae.quant_conv if self.vae.quant_conv is not None else nn.Identity()
        return nn.ModuleList([self.vae.encoder, quant])

    def train(self, mode=True):
        """Train mode, except that a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder_modules().eval()
        return self

    def forward(self, x, generator=None):
        """(B, 3, H, W) images -> (reconstruction, posterior mean, posterior logvar)."""
        with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
            posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mean
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


@contextlib.contextmanager
def frozen(module):
    """Turn off gradients of `module`'s parameters for the block, restoring each flag afterwards."""
    if module is None:
        yield
        return
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def generator_step(accelerator, model, x, *, loss_cfg, disc_cfg, kl_weight, perceptual=None, disc=None,
                   last_layer=None, generator=None, scale=1.0):
    """VAE loss on one micro-batch and its backward; returns (detached reconstruction, float logs).

    `model` is the prepared AutoencoderForTraining. `disc`, when given, is the *unwrapped*
    discriminator: its parameters are frozen for this step, so the adversarial term sends gradients
    only to the VAE, and no DDP reducer waits for discriminator gradients. `scale` divides the loss
    for gradient accumulation.
    """
    with accelerator.autocast():
        recon, mean, logvar = model(x, generator=generator)
        rec = losses.reconstruction_loss(recon.float(), x.float(), loss_cfg.reconstruction)
        nll = rec
        logs = {"rec": rec.detach()}
        if perceptual is not None and loss_cfg.perceptual_weight > 0:
            p = perceptual(recon, x)
            nll = nll + loss_cfg.perceptual_weight * p
            logs["lpips"] = p.detach()
        kl = losses.kl_loss(mean, logvar, loss_cfg.free_bits)
        loss = nll + kl_weight * kl
        logs["kl"] = kl.detach()
        if disc is not None:
            with frozen(disc):
                g = losses.generator_loss(disc(recon), disc_cfg.loss)
                if disc_cfg.adaptive:
                    weight = losses.adaptive_weight(nll, g, last_layer, disc_cfg.max_adaptive_weight)
                else:
                    weight = torch.tensor(1.0, device=g.device)
                weight = weight * disc_cfg.weight
                loss = loss + weight * g
            logs["g"], logs["g_weight"] = g.detach(), weight.detach()
        logs["loss"] = loss.detach()
    accelerator.backward(loss * scale)
    return recon.detach(), logs


def discriminator_step(accelerator, disc, x, recon, *, disc_cfg, scale=1.0):
    """Discriminator loss on real images and detached reconstructions, and its backward; returns float logs.

    `disc` is the prepared discriminator. The reconstructions arrive detached, so nothing reaches the VAE.
    """
    real = x.detach().requires_grad_(disc_cfg.r1_weight > 0)
    with accelerator.autocast():
        real_logits = disc(real)
        fake_logits = disc(recon.detach())
        loss = losses.disc_loss(real_logits.float(), fake_logits.float(), disc_cfg.loss)
        logs = {"d": loss.detach(), "logits_real": real_logits.detach().float().mean(),
                "logits_fake": fake_logits.detach().float().mean()}
        if disc_cfg.r1_weight > 0:
            r1 = losses.r1_penalty(real_logits, real)
            loss = loss + 0.5 * disc_cfg.r1_weight * r1
            logs["r1"] = r1.detach()
    accelerator.backward(loss * scale)
    return logs
