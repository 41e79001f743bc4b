"""Diffusability diagnostics: latent spectra, high-frequency share, equivariance error, verdicts, in inspect and evaluate."""

import json
import math

import pytest
import torch

from imagegen import write_photos
from vaekit.cli import main
from vaekit.eval import diffusability
from vaekit.eval.diffusability import (RetentionStatistics, SpectrumStatistics, equivariance_psnr, hf_retention,
                                      high_frequency_share, radial_frequency)
from vaekit.model import build_preset, save_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests share a small machine


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    write_photos(folder, 4, size=(64, 64))
    return folder


@pytest.fixture(scope="module")
def two_vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_diffusers(build_preset("tiny").eval(), root / f"tiny{seed}")
    return root / "tiny0", root / "tiny1"


def cosine_grid(size, cycles, axis, amplitude=1.0):
    """(size, size) cosine with `cycles` periods along one axis: radial frequency 2 * cycles / size (of Nyquist)."""
    t = torch.arange(size, dtype=torch.float64) * (2 * math.pi * cycles / size)
    wave = amplitude * torch.cos(t)
    return wave[None, :].expand(size, size) if axis == "x" else wave[:, None].expand(size, size)


def test_white_noise_has_the_high_frequency_share_of_its_frequency_area():
    size = 64
    radius = radial_frequency(size, size)
    expected = float(((radius > 0.5).sum()) / ((radius > 0).sum()))  # bins outside the half-Nyquist disc
    assert expected == pytest.approx(1 - math.pi / 16, abs=0.01)  # the continuous limit: 0.804
    noise = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    assert high_frequency_share(noise) == pytest.approx(expected, abs=0.01)
    # Relative to white noise of equal energy, white noise is flat at 1 in every ring.
    stats = SpectrumStatistics()
    stats.update(noise)
    assert all(p == pytest.approx(1.0, abs=0.2) for p in stats.result()["power"][1:])


def test_two_cosines_give_the_share_of_the_high_one():
    size = 64
    low = cosine_grid(size, 4, "x", amplitude=2.0)  # r = 0.125
    high = cosine_grid(size, 24, "y", amplitude=1.0)  # r = 0.75
    signal = (low + high)[None, None]  # (1, 1, 64, 64)
    assert high_frequency_share(signal) == pytest.approx(1 / (4 + 1), abs=0.01)  # B^2 / (A^2 + B^2)
    assert high_frequency_share(low[None, None]) < 0.001 and high_frequency_share(high[None, None]) > 0.999
    # Any grid size shares the normalised axis: the same frequency on a 16-grid gives the same share.
    small = (cosine_grid(16, 1, "x", 2.0) + cosine_grid(16, 6, "y", 1.0))[None, None]
    assert high_frequency_share(small) == pytest.approx(0.2, abs=0.02)
    # Unit white noise added: energies add, 0.5 high of the cosines' 2.5 and 0.80 of the noise's 1.
    rough = signal + torch.randn(8, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert high_frequency_share(rough) == pytest.approx((0.5 + (1 - math.pi / 16)) / 3.5, abs=0.02)


def test_an_equivariant_autoencoder_scores_high_and_the_verdict_says_so():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).mul(255).round() / 127.5 - 1
    identity = equivariance_psnr(lambda z: z, x, x, factor=1)  # encoder and decoder the identity: equivariant
    assert set(identity) == {"reconstruction", "downscale_x2", "rotate_90"}
    assert all(v.shape == (2,) for v in identity.values())
    assert torch.isinf(identity["reconstruction"]).all() and torch.isinf(identity["rotate_90"]).all()
    assert (identity["downscale_x2"] > 50).all()  # only the 8-bit rounding of the decode differs
    # A decoder that draws a fixed pattern into the image frame is exact on plain latents but not on rotated ones.
    mark = torch.zeros(1, 3, 32, 32)
    mark[..., :8, :8] = 0.5
    mark_plain = lambda z: z + mark if z.shape == x.shape and not torch.equal(z, x) else z  # noqa: E731
    broken = equivariance_psnr(mark_plain, x, x, factor=1)
    assert torch.isinf(broken["reconstruction"]).all() and (broken["rotate_90"] < 30).all()

    result = {"high_frequency_share": {"images": 0.05, "latents": 0.15, "ratio": 3.0},
              "equivariance_psnr": {"reconstruction": 30.0, "downscale_x2": 24.0, "rotate_90": 29.5}}
    text = diffusability.verdict(result)
    assert text.startswith("latents carry 3.0x the high-frequency energy of the images: expect slower diffusion")
    assert "2x-downscaled latent decodes 6.0 dB worse" in text and "not equivariant" in text
    result["high_frequency_share"]["ratio"] = 1.1
    result["equivariance_psnr"]["downscale_x2"] = 29.0
    text = diffusability.verdict(result)
    assert "a spectrum like the images'" in text and "equivariant" in text and "slower" not in text


def test_inspect_compares_several_vaes_side_by_side(images, two_vaes, tmp_path, capsys):
    out = tmp_path / "inspect"
    a, b = two_vaes
    assert main(["inspect", "--vae", str(a), "--vae", str(b), "--label", "A", "--label", "B", "--data", str(images),
                 "--size", "64", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "HF latents" in printed and printed.count("verdict: ") == 2 and "verdict: A: latents carry" in printed
    combined = json.loads((out / "diffusability.json").read_text())
    assert [m["label"] for m in combined["models"]] == ["A", "B"]
    for model in combined["models"]:
        share = model["high_frequency_share"]
        assert 0 < share["images"] < share["latents"] < 1  # random encoders: rougher latents than photos
        assert share["ratio"] == pytest.approx(share["latents"] / share["images"])
        assert set(model["equivariance_psnr"]) == {"reconstruction", "downscale_x2", "rotate_90"}
        assert len(model["spectrum"]["radius"]) == len(model["spectrum"]["latents"]) == diffusability.RADIAL_BINS
    for folder in ("1-A", "2-B"):
        single = json.loads((out / folder / "inspect.json").read_text())
        assert single["diffusability"]["verdict"] and (out / folder / "histograms.png").is_file()
    from PIL import Image

    with Image.open(out / "spectrum.png") as img:
        assert img.width >= 500 and img.height >= 300

    assert main(["inspect", "--vae", str(a), "--data", str(images), "--size", "64", "--no-diffusability",
                 "--quiet"]) == 0
    assert "verdict" not in capsys.readouterr().out


def test_evaluate_reports_diffusability_per_model(images, two_vaes, tmp_path, capsys):
    out = tmp_path / "eval"
    a, _ = two_vaes
    assert main(["evaluate", "--vae", str(a), "--vae", "identity", "--data", str(images), "--resolution", "64",
                 "--out", str(out), "--no-lpips", "--no-rfid", "--quiet"]) == 0
    assert "diffusability: " in capsys.readouterr().out
    summary = json.loads((out / "metrics.json").read_text())
    measured, identity = summary["models"]
    assert measured["diffusability"]["high_frequency_share"]["latents"] > 0 and identity["diffusability"] is None
    html = (out / "report.html").read_text()
    assert "<h2>Diffusability</h2>" in html and 'id="diffusability"' in html and (out / "spectrum.png").is_file()
    assert measured["diffusability"]["verdict"] in html.replace("&#x27;", "'")


# ---------------------------------------------------------------------------------------------------
# High-frequency retention: how sharp reconstructions are


def textured_images():
    """Two 64 px images with detail at every frequency: smooth colour fields plus fine 8-bit noise."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=64, mode="bicubic")
    fine = torch.rand(2, 3, 64, 64, generator=g) - 0.5
    return ((smooth + 0.3 * fine).clamp(0, 1) * 255).round() / 127.5 - 1


def test_hf_retention_of_the_input_itself_is_one():
    x = textured_images()
    assert torch.equal(hf_retention(x, x.clone()), torch.ones(2, dtype=torch.float64))
    stats = RetentionStatistics()
    stats.update(x, x.clone())
    assert all(r == pytest.approx(1.0, abs=1e-12) for r in stats.bands()["ratio"][1:])


def test_growing_blur_lowers_hf_retention_monotonically_and_noise_raises_it_above_one():
    from torchvision.transforms.functional import gaussian_blur

    x = textured_images()
    values = [hf_retention(x, gaussian_blur(x, kernel_size=13, sigma=sigma)) for sigma in (0.4, 0.7, 1.0, 1.5, 2.5)]
    for sharper, blurrier in zip(values, values[1:]):
        assert (blurrier < sharper).all()
    assert (values[0] < 1).all() and (values[-1] < 0.05).all()
    # A blur's response falls with frequency: the per-band curve falls from about 1 near DC.
    stats = RetentionStatistics()
    stats.update(x, gaussian_blur(x, kernel_size=13, sigma=1.0))
    ratio = stats.bands()["ratio"]
    assert ratio[1] > 0.8 and ratio[-1] < 0.05 and ratio[-1] < ratio[len(ratio) // 2] < ratio[1]

    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert (hf_retention(x, noisy) > 1.1).all()
    # A flat image has no fine detail to keep: its ratio is undefined, not a number that skews a mean.
    flat = torch.zeros(1, 3, 32, 32)
    assert hf_retention(flat, flat).isnan().all()
