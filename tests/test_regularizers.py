"""The diffusability regularisers: transforms, EQ-VAE, scale equivariance, VA-VAE alignment and its frozen feature model."""

import dataclasses

import pytest
import torch

from vaekit.errors import VaekitError
from vaekit.pretrained.features import load_feature_model
from vaekit.train import regularizers
from vaekit.model.latents import LatentTransform
from vaekit.train.regularizers import Plan, alignment_losses, transform_rng

pytestmark = pytest.mark.usefixtures("one_thread")  # tests share a small machine


def train_config(**loss):
    from vaekit.train import TrainConfig

    config = TrainConfig()
    config.loss = dataclasses.replace(config.loss, **loss)
    return config


def prepared(config, seed=0, decoder_mode=False):
    """(accelerator, prepared model, vae, regularizer) for preset:tiny under `config`."""
    from accelerate import Accelerator

    from vaekit.model import load_vae
    from vaekit.train import AutoencoderForTraining

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    vae = load_vae("preset:tiny")
    regularizer = regularizers.build_regularizer(config, vae)
    model = AutoencoderForTraining(vae, freeze_encoder=decoder_mode,
                                   projection=regularizer.projection if regularizer is not None else None)
    return accelerator, accelerator.prepare(model), vae, regularizer


@pytest.fixture(autouse=True)
def clean_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def step(accelerator, model, regularizer, x, config, plan=None, kl_weight=1e-3):
    """One generator step; `plan` forces the regulariser's transforms. Returns (real, recon, logs)."""
    from vaekit.train import generator_step

    if plan is not None:
        regularizer.plan = lambda rng, grid: plan
    return generator_step(accelerator, model, x, loss_cfg=config.loss, disc_cfg=config.disc, kl_weight=kl_weight,
                          generator=torch.Generator().manual_seed(0), regularizer=regularizer, rng=transform_rng(0, 0, 0))


def grads(module):
    return [p.grad for p in module.parameters()]


# ---------------------------------------------------------------------------------------------------
# Transforms and their random draws


def test_a_transform_acts_alike_on_latents_and_images():
    x = images(size=16)
    for transform in (LatentTransform(size=(8, 8)), LatentTransform(rotation=1), LatentTransform((5, 7), 3)):
        # An autoencoder that is the identity (factor 1) is exactly equivariant: both sides agree bit for bit.
        assert torch.equal(transform.latents(x), transform.images(x, 1))
    z = torch.randn(2, 4, 4, 6)
    transform = LatentTransform(size=(2, 3), rotation=1)
    assert transform.latents(z).shape == (2, 4, 3, 2)  # resized, then a quarter turn swaps the sides
    assert transform.images(torch.randn(2, 3, 32, 48), 8).shape == (2, 3, 24, 16)  # (3 x 8, 2 x 8)
    assert LatentTransform().identity and LatentTransform().latents(z) is z
    assert torch.equal(LatentTransform(rotation=4).latents(z), z)
    rotated = LatentTransform(rotation=1).latents(z)
    assert torch.equal(torch.rot90(rotated, 3, dims=(-2, -1)), z)  # four quarter turns are the identity
    # Downscaling averages (antialiased): a constant stays constant and white noise loses variance.
    noise = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    assert LatentTransform(size=(16, 16)).latents(noise).std() < 0.5 * noise.std()
    assert torch.allclose(LatentTransform(size=(3, 5)).latents(torch.full((1, 2, 8, 8), 0.7)), torch.tensor(0.7))


def test_draws_follow_eq_vae_and_depend_only_on_seed_step_and_slot():
    grid = (32, 32)
    drawn = [regularizers.draw_equivariance(transform_rng(0, step, 0), grid, 0.5, 0.25, True) for step in range(400)]
    used = [t for t in drawn if t is not None]
    assert 0.4 < len(used) / len(drawn) < 0.6  # probability 0.5
    sides = {t.size[0] for t in used}
    assert min(sides) == 8 and max(sides) == 31  # s in {8/32, ..., 31/32} of a 32-grid
    assert {t.rotation for t in used} == {1, 2, 3}
    assert all(t.size[0] == t.size[1] for t in used)  # isotropic, as EQ-VAE's default
    again = [regularizers.draw_equivariance(transform_rng(0, step, 0), grid, 0.5, 0.25, True) for step in range(400)]
    assert drawn == again
    other_slot = [regularizers.draw_equivariance(transform_rng(0, step, 1), grid, 0.5, 0.25, True) for step in range(400)]
    assert drawn != other_slot
    assert all(t is None for t in (regularizers.draw_equivariance(transform_rng(0, s, 0), grid, 0.0, 0.25, True)
                                   for s in range(50)))
    # Floored at a minimum side (LPIPS and the PatchGAN need 32 px decodes), never above the grid.
    floored = [regularizers.draw_equivariance(transform_rng(0, s, 0), (8, 8), 1.0, 0.25, False, min_side=4)
               for s in range(50)]
    assert {t.size[0] for t in floored} <= {4, 5, 6, 7} and {t.rotation for t in floored} == {0}
    factors = {regularizers.draw_scale(transform_rng(0, s, 0), (32, 32), [2, 4]).size for s in range(50)}
    assert factors == {(16, 16), (8, 8)}


# ---------------------------------------------------------------------------------------------------
# EQ-VAE and scale equivariance in the generator step


def test_an_identity_transform_changes_nothing_and_a_real_one_changes_the_target():
    plain_config = train_config()
    accelerator, model, vae, _ = prepared(plain_config)
    x = images()
    _, _, plain_logs = step(accelerator, model, None, x, plain_config, kl_weight=0.0)
    plain_grads = [g.clone() for g in grads(vae)]

    config = train_config(equivariance_prob=1.0, scale_equivariance_weight=1.0)
    accelerator, model, vae, regularizer = prepared(config)
    real, recon, logs = step(accelerator, model, regularizer, x, config, Plan(LatentTransform(), (LatentTransform(),)),
                             kl_weight=0.0)
    assert torch.equal(real, x) and logs["rec"] == plain_logs["rec"] and logs["kl"] == plain_logs["kl"]
    assert logs["se"] == logs["rec"]  # the identity's "downsampled" decode is the plain one: no new information
    # With the SE term (weight 1) equal to the reconstruction, every gradient is exactly twice the plain one.
    assert all(torch.allclose(g, 2 * p, rtol=1e-5, atol=1e-9) for g, p in zip(grads(vae), plain_grads))

    vae.zero_grad(set_to_none=True)
    transform = LatentTransform(size=(2, 2), rotation=1)
    real, recon, logs = step(accelerator, model, regularizer, x, config, Plan(transform))
    assert real.shape == recon.shape == (2, 3, 16, 16)  # a 4x4 latent grid downscaled to 2x2, decoded at f8
    assert torch.equal(real, transform.images(x, 8)) and logs["eq"] == 1.0 and "se" not in logs
    # EQ-VAE trains encoder and decoder alike through the transformed decode.
    assert all(g is not None and g.abs().sum() > 0 for g in (vae.encoder.conv_in.weight.grad,
                                                            vae.decoder.conv_out.weight.grad))


def test_in_decoder_mode_the_equivariance_terms_reach_only_the_decoder():
    config = train_config(equivariance_prob=1.0, scale_equivariance_weight=1.0)
    accelerator, model, vae, regularizer = prepared(config, decoder_mode=True)
    step(accelerator, model, regularizer, images(), config,
         Plan(LatentTransform(size=(3, 3), rotation=2), (LatentTransform(size=(2, 2)),)))
    assert all(g is None for g in grads(vae.encoder)) and all(g is None for g in grads(vae.quant_conv))
    assert all(g is not None for g in grads(vae.decoder))


def test_the_scale_equivariance_term_alone_reaches_encoder_and_decoder():
    config = train_config(scale_equivariance_weight=1.0)
    accelerator, model, vae, regularizer = prepared(config)
    x = images()
    transform = LatentTransform(size=(2, 2))
    out = model(x, extra=(transform,))
    logs = {}
    term = regularizer.loss(out, x, Plan(None, (transform,)), torch.zeros(()), None, logs)
    assert term.shape == () and term > 0 and logs["se"] == term
    term.backward()
    assert all(g is not None for g in grads(vae.encoder)) and all(g is not None for g in grads(vae.decoder))
    assert out.extras[0].shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------------------------------
# VA-VAE alignment


def test_alignment_losses_are_zero_for_aligned_features_and_respect_their_margins():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 16, 4, 4, generator=generator)
    scaled = features * torch.rand(2, 1, 4, 4, generator=generator).add(0.5)  # per-position lengths change nothing
    cos, distance = alignment_losses(scaled, features, 0.5, 0.25)
    assert cos.shape == distance.shape == () and cos == 0 and distance < 1e-6
    other = torch.randn(2, 16, 4, 4, generator=generator)
    cos, distance = alignment_losses(other, features, 0.0, 0.0)
    assert cos.item() == pytest.approx(1.0, abs=0.2) and distance > 0.1  # random directions: cosine about 0
    cos_m, distance_m = alignment_losses(other, features, 0.5, 0.25)
    assert 0 <= cos_m < cos and 0 <= distance_m < distance  # the margins forgive small differences
    assert alignment_losses(-features, features, 0.5, 0.25)[0].item() == pytest.approx(1.5)  # ReLU(1 - 0.5 - (-1))


def test_the_alignment_term_trains_encoder_and_projection_only_and_never_the_feature_model(tiny_dinov2):
    config = train_config(align_weight=0.5, align_model=str(tiny_dinov2), align_adaptive=False)
    accelerator, model, vae, regularizer = prepared(config)
    feature_model = regularizer.feature_model
    x = images()
    out = model(x)
    logs = {}
    term = regularizer.loss(out, x, Plan(), torch.zeros(()), None, logs)
    assert out.projected.shape == (2, 16, 4, 4) and logs["align_weight"] == 0.5
    term.backward()
    assert all(g is not None for g in grads(vae.encoder)) and regularizer.projection.weight.grad is not None
    assert all(g is None for g in grads(vae.decoder))  # alignment shapes the latent, not its decoding
    assert all(g is None and not p.requires_grad for p, g in zip(feature_model.parameters(), grads(feature_model)))

    # The whole step (adaptive weight, as VA-VAE) under bf16 autocast: the feature model stays frozen, in eval mode.
    config = train_config(align_weight=0.1, align_model=str(tiny_dinov2), align_dtype="bf16")
    accelerator, model, vae, regularizer = prepared(config)
    model.train()
    feature_model = regularizer.feature_model
    feature_model.train()
    _, _, logs = step(accelerator, model, regularizer, x, config)
    assert not feature_model.training and not feature_model.net.training
    assert {p.dtype for p in feature_model.parameters()} == {torch.bfloat16}
    assert all(p.grad is None for p in feature_model.parameters())
    assert 0 < logs["align_weight"] and torch.isfinite(logs["loss"])
    assert regularizer.projection.weight.grad is not None and regularizer.projection.weight.dtype == torch.float32


def test_feature_models_load_offline_or_say_what_to_do(tiny_dinov2, tmp_path, monkeypatch):
    model = load_feature_model(tiny_dinov2)
    features = model(images(size=48), (3, 5))  # any grid: the image is resized to grid x patch (12 x 20 px)
    assert features.shape == (2, 16, 3, 5) and features.dtype == torch.float32 and model.dim == 16
    assert model.input_size((3, 5)) == (12, 20)
    with pytest.raises(VaekitError, match="not found"):
        load_feature_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VaekitError, match="no config.json"):
        load_feature_model(tmp_path / "empty")
    monkeypatch.setattr("vaekit.model.load.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VaekitError, match="not in the local hub cache"):
        load_feature_model("no-such-owner/no-such-backbone")
    try:
        import timm  # noqa: F401  (installed: the error below does not apply)
    except ImportError:
        with pytest.raises(VaekitError, match="needs the timm package"):
            load_feature_model("timm:vit_small_patch14_dinov2")
    with pytest.raises(VaekitError, match="torchvision:alexnet"):
        load_feature_model("torchvision:resnet50")


def test_config_checks_name_the_key():
    from vaekit.train import check_config

    for loss, key in (({"equivariance_prob": 1.5}, "equivariance_prob"),
                      ({"equivariance_min_scale": 1.0}, "equivariance_min_scale"),
                      ({"scale_equivariance_factors": [1]}, "scale_equivariance_factors"),
                      ({"scale_equivariance_weight": -1.0}, "scale_equivariance_weight"),
                      ({"align_weight": 0.1, "align_model": ""}, "align_model")):
        with pytest.raises(VaekitError, match=key):
            check_config(train_config(**loss))
    config = train_config(align_weight=0.1)
    config.model.mode = "decoder"
    with pytest.raises(VaekitError, match="model.mode=scratch"):
        check_config(config)
    check_config(train_config(equivariance_prob=0.5, scale_equivariance_weight=0.25, align_weight=0.1))
    assert regularizers.build_regularizer(train_config(), None) is None  # all off by default: nothing is built
