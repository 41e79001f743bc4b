"""Latent diagnostics (KL, active units, collapse, normalisation), sampling and interpolation."""

import json
import math

import pytest
import torch
from PIL import Image

from imagegen import make_photo, write_photos
from vaekit.codec import inference
from vaekit.eval import diagnostics, sampling
from vaekit.model.latents import kl_divergence
from vaekit.cli import main
from vaekit.cache.stats import suggest_normalization
from vaekit.model import build_preset, save_diffusers


pytestmark = pytest.mark.usefixtures("one_thread")  # tests share a small machine


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_photos(folder, 6, size=(64, 64))
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """preset:tiny (random, seed 0) and the same model with its encoder's output convolution zeroed."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vae = build_preset("tiny").eval()
    save_diffusers(vae, root / "tiny")
    with torch.no_grad():
        # conv_out gives the posterior's moments; without weights only its bias is left, the same for
        # every image: an encoder that ignores its input.
        vae.encoder.conv_out.weight.zero_()
    save_diffusers(vae, root / "collapsed")
    return root / "tiny", root / "collapsed"


# ---------------------------------------------------------------------------------------------------
# 4. KL and collapse


def test_closed_form_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) * 1.5
    logvar = torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) - 0.5
    closed = kl_divergence(mean, logvar)

    # KL(q || p) = E_q[log q(z) - log p(z)], estimated with samples, log densities from torch.distributions.
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    z = q.sample((20000,))  # (S, 2, 3, 4, 4)
    estimate = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(estimate, closed, rtol=0.05, atol=0.03)

    # Per channel, the diagnostics average the closed form over images and positions.
    stats = diagnostics.LatentStatistics(keep_per_image=4)
    stats.update(mean, logvar, generator)
    per_channel = torch.tensor([c["kl"] for c in stats.result()["channels"]], dtype=torch.float64)
    torch.testing.assert_close(per_channel, estimate.mean(dim=(0, 2, 3)), rtol=0.02, atol=0.01)


def test_activity_is_variance_across_images_not_across_positions():
    generator = torch.Generator().manual_seed(1)
    images, height, width = 200, 4, 4
    mean = torch.zeros(images, 3, height, width, dtype=torch.float64)
    mean[:, 0] = torch.randn(images, 1, 1, generator=generator, dtype=torch.float64) * 0.5  # varies with x: var 0.25
    mean[:, 1] = torch.arange(height * width, dtype=torch.float64).view(height, width)  # varies only with position
    mean[:, 2] = 0.05 * torch.randn(images, height, width, generator=generator, dtype=torch.float64)  # var 0.0025
    stats = diagnostics.LatentStatistics(keep_per_image=4)
    for chunk, logvar in zip(mean.split(7), torch.zeros_like(mean).split(7)):  # uneven batches: Chan's merge
        stats.update(chunk, logvar, generator)
    channels = stats.result()["channels"]
    assert channels[0]["activity"] == pytest.approx(float(mean[:, 0, 0, 0].var()), rel=1e-9)
    assert [c["active"] for c in channels] == [True, False, False]
    assert channels[1]["std"] > 4  # spread over positions does not make a channel active


def test_a_vae_whose_encoder_ignores_its_input_is_reported_as_collapsed(tiny_dirs, images, tmp_path, capsys):
    tiny, collapsed = tiny_dirs
    out = tmp_path / "collapsed"
    assert main(["inspect", "--vae", str(collapsed), "--data", str(images), "--size", "64", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "inspect.json").read_text())
    assert result["collapsed"] is True and result["active_units"] == 0
    assert all(c["activity"] == 0 for c in result["channels"])
    assert "posterior collapse" in printed and "posterior collapse" in result["warnings"][0]
    with Image.open(out / "histograms.png") as img:
        assert img.width > 400 and img.height > 100

    out = tmp_path / "tiny"
    assert main(["inspect", "--vae", str(tiny), "--data", str(images), "--size", "64", "--out", str(out),
                 "--quiet"]) == 0
    result = json.loads((out / "inspect.json").read_text())
    assert result["collapsed"] is False and result["active_units"] == 4
    assert result["latent_shape"] == [4, 8, 8] and result["images"] == 6


def test_near_zero_kl_is_named_collapse():
    generator = torch.Generator().manual_seed(0)
    stats = diagnostics.LatentStatistics(keep_per_image=4)
    for _ in range(3):
        # Posterior = prior: informative-looking means would still be "active", but carry no KL.
        stats.update(torch.randn(4, 2, 2, 2, generator=generator) * 1e-3, torch.zeros(4, 2, 2, 2), generator)
    notes = diagnostics.collapse_warnings(stats.result())
    assert any("KL to N(0, I) is near zero" in n for n in notes)


def test_suggested_normalisation_standardises_the_latents():
    generator = torch.Generator().manual_seed(0)
    stats = diagnostics.LatentStatistics(keep_per_image=64)
    for _ in range(10):
        mean = 3.0 + 2.0 * torch.randn(8, 4, 4, 4, generator=generator)
        stats.update(mean, torch.full_like(mean, math.log(0.25)), generator)  # posterior std 0.5
    suggested = suggest_normalization(stats.result()["posterior_statistics"])
    # Var(z) = Var(mean) + E[sigma^2] = 4 + 0.25
    assert suggested["shift_factor"] == pytest.approx(3.0, abs=0.05)
    assert suggested["scaling_factor"] == pytest.approx(1 / math.sqrt(4.25), rel=0.03)
    normalised = (stats.values() - suggested["shift_factor"]) * suggested["scaling_factor"]
    assert float(normalised.mean()) == pytest.approx(0.0, abs=0.05)
    assert float(normalised.std()) == pytest.approx(1.0, abs=0.05)


# ---------------------------------------------------------------------------------------------------
# Sampling and interpolation


def test_slerp_keeps_endpoints_and_norm():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 8, 8, generator=generator)
    b = torch.randn(2, 4, 8, 8, generator=generator)
    torch.testing.assert_close(sampling.slerp(a, b, 0.0), a)
    torch.testing.assert_close(sampling.slerp(a, b, 1.0), b)
    middle = sampling.slerp(a, b, 0.5)
    # Between two nearly orthogonal vectors of norm about r, slerp stays near r; lerp drops to about r / sqrt(2).
    ratio = middle.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    lerp_ratio = sampling.lerp(a, b, 0.5).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert bool(((ratio - 1).abs() < 0.15).all()) and bool((lerp_ratio < 0.85).all())
    torch.testing.assert_close(sampling.slerp(a, a, 0.3), a)  # parallel: no division by zero


def test_sample_decodes_prior_noise_through_the_normalisation(tiny_dirs, tmp_path):
    from vaekit.model import load_vae

    tiny, _ = tiny_dirs
    vae = load_vae(str(tiny), {"scaling_factor": 0.5, "shift_factor": 0.25})
    images = sampling.sample_images(vae, 3, 32, seed=5, batch_size=2)
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = inference.decode(vae, noise / 0.5 + 0.25).clamp(-1, 1)
    torch.testing.assert_close(images, expected)

    out = tmp_path / "grid.png"
    assert main(["sample", "--vae", str(tiny), "--n", "4", "--size", "32", "--seed", "1", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))  # a 2 x 2 grid with 2 px padding
    first = out.read_bytes()
    assert main(["sample", "--vae", str(tiny), "--n", "4", "--size", "32", "--seed", "1", "--out", str(out)]) == 0
    assert out.read_bytes() == first


def test_interpolate_starts_at_a_and_ends_at_b(tiny_dirs, tmp_path):
    from vaekit.data import to_tensor
    from vaekit.model import load_vae

    tiny, _ = tiny_dirs
    vae = load_vae(str(tiny))
    a, b = to_tensor(make_photo(32, 32, seed=1))[None], to_tensor(make_photo(32, 32, seed=2))[None]
    for spherical in (False, True):
        frames = sampling.interpolate_images(vae, a, b, 5, spherical=spherical)
        assert frames.shape == (5, 3, 32, 32)
        with torch.no_grad():
            ends = inference.decode(vae, inference.encode(vae, torch.cat([a, b]))[0]).clamp(-1, 1)
        torch.testing.assert_close(frames[[0, -1]], ends, atol=1e-5, rtol=0)
        assert not torch.allclose(frames[2], frames[0])

    make_photo(40, 30, seed=1).save(tmp_path / "a.png")
    make_photo(30, 40, seed=2).save(tmp_path / "b.png")
    out = tmp_path / "strip.png"
    assert main(["interpolate", "--vae", str(tiny), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "--steps", "4", "--slerp", "--size", "32", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (2 + 6 * (32 + 2), 2 + 32 + 2)  # A, 4 decodes, B in one row


def test_interpolate_needs_two_steps_and_existing_images(tiny_dirs, tmp_path, capsys):
    tiny, _ = tiny_dirs
    make_photo(32, 32).save(tmp_path / "a.png")
    assert main(["interpolate", "--vae", str(tiny), str(tmp_path / "a.png"), str(tmp_path / "missing.png"),
                 "--out", str(tmp_path / "s.png")]) == 2
    assert "Image not found" in capsys.readouterr().err
    assert main(["interpolate", "--vae", str(tiny), str(tmp_path / "a.png"), str(tmp_path / "a.png"),
                 "--steps", "1", "--size", "32", "--out", str(tmp_path / "s.png")]) == 2
    assert "--steps" in capsys.readouterr().err
