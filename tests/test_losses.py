"""Unit tests for vaekit.train.losses and vaekit.train.discriminator: values, reductions and gradient flow."""

import math

import pytest
import torch
from torch import nn

from vaekit.train import losses
from vaekit.train.discriminator import DiscriminatorConfig, PatchDiscriminator

torch.set_num_threads(1)


def test_reconstruction_loss_is_per_pixel_mean():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full((2, 3, 4, 4), 0.5)
    y[0, 0, 0, 0] = 2.5  # one outlier: L1 and L2 weigh it differently
    n = x.numel()
    assert losses.reconstruction_loss(x, y, "l1").item() == pytest.approx((0.5 * (n - 1) + 2.5) / n)
    assert losses.reconstruction_loss(x, y, "l2").item() == pytest.approx((0.25 * (n - 1) + 6.25) / n)
    with pytest.raises(ValueError):
        losses.reconstruction_loss(x, y, "l3")


def test_kl_divergence_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p)
    assert torch.allclose(losses.kl_divergence(mean, logvar), expected, atol=1e-5)
    assert losses.kl_divergence(torch.zeros(3), torch.zeros(3)).abs().max() == 0


def test_kl_loss_convention_against_diffusers_posterior():
    """kl_loss is diffusers' per-sample summed KL divided by the latent element count (the documented mapping)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    moments = torch.randn(3, 8, 5, 5)  # (B, 2C, h, w): mean and logvar stacked on channels
    posterior = DiagonalGaussianDistribution(moments)
    summed = posterior.kl().mean()  # latent-diffusion: sum over (C, h, w), mean over batch
    ours = losses.kl_loss(posterior.mean, posterior.logvar)
    assert ours.item() == pytest.approx(summed.item() / (4 * 5 * 5), rel=1e-5)


def test_free_bits_clamp_channels_below_budget_and_stop_their_gradient():
    mean = torch.zeros(2, 3, 4, 4)
    mean[:, 0] = 2.0  # channel 0 carries 0.5 * 4 = 2 nats per element; channels 1, 2 carry none
    mean.requires_grad_(True)
    logvar = torch.zeros(2, 3, 4, 4, requires_grad=True)
    value = losses.kl_loss(mean, logvar, free_bits=0.5)
    assert value.item() == pytest.approx((2.0 + 0.5 + 0.5) / 3)
    value.backward()
    assert mean.grad[:, 0].abs().sum() > 0
    assert mean.grad[:, 1:].abs().sum() == 0 and logvar.grad[:, 1:].abs().sum() == 0
    # Without free bits it is the plain mean over every element.
    assert losses.kl_loss(mean, logvar).item() == pytest.approx(2.0 / 3)


def test_kl_weight_warmup_is_linear():
    assert losses.kl_weight_at(0, 1e-6, 100) == 0.0
    assert losses.kl_weight_at(50, 1e-6, 100) == pytest.approx(5e-7)
    assert losses.kl_weight_at(500, 1e-6, 100) == pytest.approx(1e-6)
    assert losses.kl_weight_at(0, 1e-6, 0) == 1e-6


def test_gan_losses():
    confident_real, confident_fake = torch.full((2, 1, 3, 3), 3.0), torch.full((2, 1, 3, 3), -3.0)
    assert losses.disc_loss(confident_real, confident_fake, "hinge").item() == 0.0
    assert losses.disc_loss(-confident_real, -confident_fake, "hinge").item() == pytest.approx(4.0)
    real, fake = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = 0.5 * (bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake)))
    assert losses.disc_loss(real, fake, "non_saturating").item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.generator_loss(fake, "hinge").item() == pytest.approx(-fake.mean().item())
    expected_g = bce(fake, torch.ones_like(fake))
    assert losses.generator_loss(fake, "non_saturating").item() == pytest.approx(expected_g.item(), rel=1e-5)
    with pytest.raises(ValueError):
        losses.disc_loss(real, fake, "wgan")


def test_adaptive_weight_is_ratio_of_last_layer_gradient_norms():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    out = layer(torch.randn(8, 4))
    rec = out.square().mean()
    g = 4.0 * rec  # four times the gradient at the last layer -> weight 1/4
    w = losses.adaptive_weight(rec, g, layer.weight, eps=0.0)
    assert w.item() == pytest.approx(0.25, rel=1e-5)
    assert not w.requires_grad
    (rec + w * g).backward()  # the graphs were retained for this backward
    assert layer.weight.grad is not None
    out = layer(torch.randn(8, 4))
    assert losses.adaptive_weight(out.mean(), 1e-9 * out.mean(), layer.weight, max_weight=10.0).item() == 10.0


def test_r1_penalty_is_squared_input_gradient_and_trains_the_discriminator():
    a = torch.randn(1, 3, 2, 2, requires_grad=True)
    x = torch.randn(5, 3, 2, 2, requires_grad=True)
    logits = (a * x).flatten(1).sum(1)  # D(x) = <a, x>: gradient wrt x is a for every sample
    penalty = losses.r1_penalty(logits, x)
    assert penalty.item() == pytest.approx(a.square().sum().item(), rel=1e-5)
    penalty.backward()
    assert torch.allclose(a.grad, 2 * a.detach())  # d ||a||^2 / da


def random_lpips(net="alex"):
    """The lpips package's learned linear heads on a randomly initialised backbone: no download."""
    import warnings

    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's notice about the `pretrained` argument lpips uses
        return lpips.LPIPS(pretrained=True, pnet_rand=True, net=net, verbose=False)


def test_perceptual_loss_has_gradient_and_stays_frozen():
    loss = losses.PerceptualLoss(model=random_lpips())
    loss.train()
    assert not loss.lpips.training and all(not p.requires_grad for p in loss.parameters())
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    value = loss(x, y)
    assert value.ndim == 0 and value.item() > 0
    value.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_perceptual_term_changes_the_decoder_gradient():
    """The community trainer's failure: LPIPS under no_grad adds to the loss value but not to the update."""
    perceptual = losses.PerceptualLoss(model=random_lpips())
    torch.manual_seed(2)
    decoder = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def decoder_grad(weight):
        decoder.zero_grad()
        y = decoder(x)
        loss = losses.reconstruction_loss(x, y) + weight * perceptual(x, y)
        loss.backward()
        return decoder.weight.grad.clone()

    assert not torch.allclose(decoder_grad(0.0), decoder_grad(1.0))


def test_patch_discriminator_shape_and_init():
    for n_layers, size in [(1, 32), (3, 64)]:
        disc = PatchDiscriminator(DiscriminatorConfig(n_layers=n_layers, base_channels=8))
        out = disc(torch.randn(2, 3, size, size))
        side = size // 2 ** n_layers - 2  # n stride-2 convs, then two stride-1 4x4 convs with padding 1
        assert out.shape == (2, 1, side, side)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert all(abs(m.weight.std().item() - 0.02) < 0.01 for m in convs)
    for norm in ("group", "none"):
        assert PatchDiscriminator(DiscriminatorConfig(n_layers=2, base_channels=8, norm=norm))(
            torch.randn(1, 3, 32, 32)
        ).shape == (1, 1, 6, 6)


def test_patch_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    disc = PatchDiscriminator(DiscriminatorConfig(n_layers=2, base_channels=8, norm="none"))
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=(0.5, 0.9))
    ramp = torch.linspace(-1, 1, 32)
    real = (ramp[None, None, None, :] * torch.ones(8, 3, 32, 1))  # smooth gradients
    first = None
    for _ in range(40):
        fake = torch.rand(8, 3, 32, 32) * 2 - 1  # noise
        loss = losses.disc_loss(disc(real), disc(fake), "hinge")
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.5 and loss.item() < 0.2
    assert math.isfinite(loss.item())
