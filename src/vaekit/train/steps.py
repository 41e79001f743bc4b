"""One generator and one discriminator micro-step, and the model wrapper they run through.

Correctness rules kept here (each has a test):
- every forward that needs gradients goes through the module Accelerate prepared, so DDP syncs them;
- the generator step cannot put gradients into the discriminator (its parameters are frozen for the
  step) and the discriminator step cannot put gradients into the VAE (it sees detached images).
"""

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from vaekit.train import losses
from vaekit.train.regularizers import Plan


class TrainingOutputs(NamedTuple):
    """What one training forward returns."""

    recon: torch.Tensor  # (B, 3, H', W') decode of z, or of the plan's EQ-VAE transform of z
    mean: torch.Tensor  # (B, C, h, w) posterior mean
    logvar: torch.Tensor  # (B, C, h, w) posterior log-variance
    extras: list  # decodes of the extra (scale-equivariance) transforms of z
    projected: torch.Tensor | None  # (B, D, h, w) the alignment projection of z, when the run aligns latents


class AutoencoderForTraining(nn.Module):
    """Encode, sample and decode in one forward, so the prepared (DDP) module sees every trainable use.

    diffusers' AutoencoderKL.forward returns only the reconstruction; the KL term also needs the
    posterior, and calling `vae.encode` on the unwrapped model would bypass DDP's gradient sync. For
    the same reason the decodes of transformed latents and the alignment projection (a submodule,
    `projection`) happen inside this forward.
    """

    def __init__(self, vae, freeze_encoder=False, sample_posterior=True, projection=None):
        super().__init__()
        self.vae = vae
        self.freeze_encoder = freeze_encoder
        self.sample_posterior = sample_posterior
        self.projection = projection
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

    def forward(self, x, generator=None, transform=None, extra=(), latents=None):
        """(B, 3, H, W) images -> TrainingOutputs; `transform` replaces the plain decode, `extra` adds decodes.

        Both are vaekit.model.latents.LatentTransform objects applied to z. `latents`, when
        given, are decoded instead of a sample of the posterior (a teacher's latents); the encoder
        then runs only when it trains, and mean / logvar are None when it does not.
        """
        posterior = None
        if latents is None or not self.freeze_encoder:
            with torch.no_grad() if self.freeze_encoder else contextlib.nullcontext():
                posterior = self.vae.encode(x).latent_dist
        if latents is not None:
            z = latents
        else:
            z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mean
        recon = self.vae.decode(transform.latents(z) if transform is not None else z).sample
        extras = [self.vae.decode(t.latents(z)).sample for t in extra]
        projected = self.projection(z) if self.projection is not None else None
        mean, logvar = (posterior.mean, posterior.logvar) if posterior is not None else (None, None)
        return TrainingOutputs(recon, mean, logvar, extras, projected)


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
                   last_layer=None, generator=None, scale=1.0, regularizer=None, rng=None):
    """VAE loss on one micro-batch and its backward; returns (real images, detached reconstruction, float logs).

    `model` is the prepared AutoencoderForTraining. `disc`, when given, is the *unwrapped*
    discriminator: its parameters are frozen for this step, so the adversarial term sends gradients
    only to the VAE, and no DDP reducer waits for discriminator gradients. `scale` divides the loss
    for gradient accumulation. `regularizer` (vaekit.train.regularizers) draws this micro-batch's
    transforms from `rng` and adds its terms; the real images returned are what the reconstruction
    was scored against (x, or its EQ-VAE transform), for the discriminator.
    """
    plan = regularizer.plan(rng, regularizer.latent_grid(x)) if regularizer is not None else Plan()
    with accelerator.autocast():
        out = model(x, generator=generator, transform=plan.replace, extra=plan.extra)
        real = plan.replace.images(x, regularizer.factor) if plan.replace is not None else x
        recon = out.recon
        logs = {}
        nll = image_loss(recon, real, loss_cfg, perceptual, logs)
        kl = losses.kl_loss(out.mean, out.logvar, loss_cfg.free_bits)
        loss = nll + kl_weight * kl
        logs["kl"] = kl.detach()
        if regularizer is not None:
            logs["eq"] = torch.tensor(float(plan.replace is not None))
            loss = loss + regularizer.loss(out, x, plan, nll, perceptual, logs)
        if disc is not None:
            loss = loss + adversarial_loss(disc, recon, nll, last_layer, disc_cfg, logs)
        logs["loss"] = loss.detach()
    accelerator.backward(loss * scale)
    return real.detach(), recon.detach(), logs


def image_loss(recon, real, loss_cfg, perceptual, logs):
    """Reconstruction + weighted LPIPS of `recon` against `real`, the nll the adaptive GAN weight balances; logged."""
    rec = losses.reconstruction_loss(recon.float(), real.float(), loss_cfg.reconstruction)
    nll = rec
    logs["rec"] = rec.detach()
    if perceptual is not None and loss_cfg.perceptual_weight > 0:
        p = perceptual(recon, real)
        nll = nll + loss_cfg.perceptual_weight * p
        logs["lpips"] = p.detach()
    return nll


def adversarial_loss(disc, recon, nll, last_layer, disc_cfg, logs):
    """The weighted generator term of the *unwrapped* discriminator `disc`, whose parameters stay frozen meanwhile."""
    with frozen(disc):
        g = losses.generator_loss(disc(recon), disc_cfg.loss)
        if disc_cfg.adaptive:
            weight = losses.adaptive_weight(nll, g, last_layer, disc_cfg.max_adaptive_weight)
        else:
            weight = torch.tensor(1.0, device=g.device)
        weight = weight * disc_cfg.weight
    logs["g"], logs["g_weight"] = g.detach(), weight.detach()
    return weight * g


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
