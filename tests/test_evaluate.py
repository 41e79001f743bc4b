"""Metrics against reference implementations, known distortions, rFID, the evaluate command and its report."""

import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lpips
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from imagegen import make_photo, write_bad_images, write_photos
from vaekit.codec import inference
from vaekit.eval import evaluate, metrics
from vaekit.cli import main
from vaekit.data import open_source, resize_center_crop, to_tensor
from vaekit.model import build_preset, save_diffusers

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests share a small machine


def builtin_photos(size, count):
    """`count` of scikit-image's bundled colour photos, centre-cropped to `size`, as (N, 3, size, size) in [-1, 1]."""
    source = open_source("builtin:photos")
    picks = [source[i] for i in (0, 1, 2, 5, 8, 3)[:count]]  # astronaut, chelsea, coffee, motorcycle, rocket, hubble
    return [resize_center_crop(r.decode(), size)[0] for r in picks]


def stack(images):
    return torch.stack([to_tensor(img) for img in images])


def jpeg(img, quality):
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return Image.open(buffer).convert("RGB")


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A randomly initialised preset:tiny saved as a diffusers folder (the same weights on every load)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "vae"
    save_diffusers(build_preset("tiny").eval(), folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# 1. Metrics against independent implementations


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    originals = builtin_photos(64, 3)
    distorted = [jpeg(originals[0], 30), originals[1].filter(ImageFilter.GaussianBlur(1)), jpeg(originals[2], 5)]
    x, y = stack(originals), stack(distorted)
    ours_psnr, ours_ssim = metrics.psnr(x, y), metrics.ssim(x, y)
    for i in range(len(originals)):
        a = np.asarray(originals[i], dtype=np.float64) / 255
        b = np.asarray(distorted[i], dtype=np.float64) / 255
        ref_psnr = peak_signal_noise_ratio(a, b, data_range=1)
        ref_ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=1, channel_axis=2)
        assert abs(float(ours_psnr[i]) - ref_psnr) < 1e-3
        assert abs(float(ours_ssim[i]) - ref_ssim) < 1e-3
    assert 0.3 < float(ours_ssim.min()) < float(ours_ssim.max()) < 0.99  # the images really differ


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_equals_the_lpips_package(net, request):
    model = request.getfixturevalue(f"lpips_{net}")
    # An independent lpips.LPIPS holding the same weights, called the package's own way.
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    reference.load_state_dict(model.state_dict())
    originals = builtin_photos(64, 2)
    x = stack(originals)
    y = stack([jpeg(originals[0], 10), originals[1].filter(ImageFilter.GaussianBlur(2))])
    scores = evaluate.score_images(x, y, evaluate.Scorers({net: model}, None, {}))
    with torch.no_grad():
        expected = reference(x, y).flatten()
    torch.testing.assert_close(scores[f"lpips_{net}"], expected, rtol=1e-5, atol=1e-6)
    assert float(expected.min()) > 0.05
    assert float(metrics.lpips_distance(model, x, x).abs().max()) < 1e-6


def test_ms_ssim_scales_follow_image_size():
    assert metrics.ms_ssim_scales(256, 256) == 5
    assert metrics.ms_ssim_scales(64, 96) == 3
    x = stack(builtin_photos(64, 1))
    assert float(metrics.ms_ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(float(metrics.ms_ssim(x[..., :8, :8], x[..., :8, :8])[0]))


def test_frechet_distance_matches_scipy_and_its_low_rank_form():
    from scipy import linalg

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 50, generator=generator, dtype=torch.float64)
    b = 1.5 * a[:, torch.randperm(50, generator=generator)] + 0.3 + torch.randn(30, 50, generator=generator,
                                                                               dtype=torch.float64)
    mean_a, cov_a = metrics.feature_statistics(a)
    mean_b, cov_b = metrics.feature_statistics(b)
    root = linalg.sqrtm(cov_a.numpy() @ cov_b.numpy()).real
    expected = float((mean_a - mean_b).square().sum()) + float(np.trace(cov_a.numpy() + cov_b.numpy()) - 2 * np.trace(root))
    full = metrics.frechet_distance(mean_a, cov_a, mean_b, cov_b)  # eigh on the 50 x 50 covariances
    low_rank = metrics.fid_from_features(a[:20], b[:20])  # 20 rows < 50 dimensions: the SVD path
    assert full == pytest.approx(expected, rel=1e-6)
    assert low_rank == pytest.approx(
        metrics.frechet_distance(*metrics.feature_statistics(a[:20]), *metrics.feature_statistics(b[:20])), rel=1e-6)
    assert metrics.fid_from_features(a[:20], a[:20]) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(metrics.fid_from_features(a[:1], b[:1]))


# ---------------------------------------------------------------------------------------------------
# 3. Known distortions rank as expected


def test_jpeg_10_and_blur_score_worse_than_jpeg_90_on_every_metric(lpips_vgg, lpips_alex, inception):
    originals = builtin_photos(96, 4)
    x = stack(originals)
    scorers = evaluate.Scorers({"vgg": lpips_vgg, "alex": lpips_alex}, inception, {})
    reference = evaluate.inception_features(inception, x)
    results = {}
    for name, distort in {
        "q90": lambda img: jpeg(img, 90),
        "q10": lambda img: jpeg(img, 10),
        "blur": lambda img: img.filter(ImageFilter.GaussianBlur(1.5)),
    }.items():
        y = stack([distort(img) for img in originals])
        results[name] = evaluate.score_images(x, y, scorers)
        results[name]["rfid"] = metrics.fid_from_features(reference, evaluate.inception_features(inception, y))
    higher_better = ("psnr", "ssim", "ms_ssim")
    for worse in ("q10", "blur"):
        for name in (*higher_better, "lpips_vgg", "lpips_alex"):
            good, bad = results["q90"][name], results[worse][name]
            # every single image, not only the mean
            assert bool((bad < good).all() if name in higher_better else (bad > good).all()), (worse, name, good, bad)
        assert results[worse]["rfid"] > results["q90"]["rfid"], worse


# ---------------------------------------------------------------------------------------------------
# Colour shift and periodic artifacts


def test_colour_shift_measures_a_tint_in_levels():
    x = stack([make_photo(64, 64, seed=3)]) * 0.5  # keep away from 0 and 255 so the tint is not clipped
    tint = torch.tensor([12.0, 0.0, -6.0]).view(1, 3, 1, 1) / 127.5
    shift = metrics.colour_shift(x, metrics.quantize(x + tint))
    torch.testing.assert_close(shift, torch.tensor([[12.0, 0.0, -6.0]]), atol=0.3, rtol=0)


def test_checkerboard_and_grid_scores_find_periodic_patterns():
    x = stack(builtin_photos(128, 2))
    rows, cols = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    checkerboard = ((rows + cols) % 2 * 2 - 1).float() * (3 / 127.5)  # +-3 levels
    grid = (((rows % 8) == 0) | ((cols % 8) == 0)).float() * (6 / 127.5)  # 6-level lines every 8 px
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=generator) * (4 / 127.5)
    blur = stack([img.filter(ImageFilter.GaussianBlur(1.5)) for img in builtin_photos(128, 2)])
    score = lambda y: (metrics.checkerboard_db(x, y), metrics.grid_db(x, y, 8))  # noqa: E731

    cb_board, grid_board = score(x + checkerboard)
    cb_grid, grid_grid = score(x + grid)
    for y in (x + noise, blur, jpeg_batch(x, 30)):
        cb, gr = score(y)
        assert bool((cb.abs() < 4).all() and (gr.abs() < 4).all()), (cb, gr)  # broadband errors: about 0 dB
    assert bool((cb_board > 20).all()) and bool((grid_board.abs() < 4).all())  # period 2 only
    assert bool((grid_grid > 20).all())
    assert float(metrics.checkerboard_db(x, x).abs().max()) == 0.0


def jpeg_batch(x, quality):
    from vaekit.data import to_pil

    return stack([jpeg(to_pil(t), quality) for t in x])


# ---------------------------------------------------------------------------------------------------
# 2. The evaluate command: identity, a model compared with itself, outputs, report


@pytest.fixture(scope="module")
def evaluation(tiny_vae_dir, tmp_path_factory):
    """One `vaekit evaluate` run: identity, the tiny VAE twice, 3 good images and a corrupt one."""
    data = tmp_path_factory.mktemp("images")
    write_photos(data, 3, size=(80, 64))
    bad = tmp_path_factory.mktemp("bad")
    write_bad_images(bad)
    shutil.copy(bad / "truncated.png", data / "zz_truncated.png")
    out = tmp_path_factory.mktemp("evaluation")
    code = main(["evaluate", "--vae", "identity", "--vae", str(tiny_vae_dir), "--vae", str(tiny_vae_dir),
                 "--label", "identity", "--label", "tiny", "--label", "tiny again",
                 "--data", str(data), "--out", str(out), "--resolution", "64", "--worst", "2", "--crop", "32",
                 "--quiet"])
    assert code == 0
    return out


def test_evaluate_writes_every_output(evaluation):
    assert {p.name for p in evaluation.iterdir()} == {"metrics.json", "per_image.csv", "report.html", "comparison.png",
                                                     "spectrum.png", "sharpness.png"}
    summary = json.loads((evaluation / "metrics.json").read_text())
    assert summary["data"]["images"] == 3
    assert summary["data"]["skipped"] == [{"key": "zz_truncated.png", "reason": "truncated image"}]
    assert "posterior mean" in summary["protocol"]["latents"]
    assert "capped at 100 dB" in summary["protocol"]["psnr"]
    assert any("rFID over 3 images" in w for w in summary["warnings"])
    with open(evaluation / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and {r["vae"] for r in rows} == {"identity", "tiny", "tiny again"}
    assert all(float(r["hf_retention"]) == 1.0 for r in rows if r["vae"] == "identity")
    assert all(0 < float(r["hf_retention"]) for r in rows)
    with Image.open(evaluation / "comparison.png") as img:
        assert img.width > 4 * 64 and img.height > 2 * 64  # 2 rows of original, 2 reconstructions, 2 error maps


def test_identical_images_give_capped_psnr_zero_lpips_and_zero_rfid(evaluation, lpips_vgg, lpips_alex, inception):
    summary = json.loads((evaluation / "metrics.json").read_text())
    identity = summary["models"][0]
    assert identity["label"] == "identity"
    assert identity["mean"]["psnr"] == 100.0
    assert identity["mean"]["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert identity["mean"]["ms_ssim"] == pytest.approx(1.0, abs=1e-6)
    assert identity["mean"]["lpips_vgg"] == pytest.approx(0.0, abs=1e-6)
    assert identity["mean"]["lpips_alex"] == pytest.approx(0.0, abs=1e-6)
    assert identity["rfid"] == pytest.approx(0.0, abs=1e-6) and identity["rfid_images"] == 3
    assert identity["mean"]["colour_shift"] == 0.0
    assert identity["mean"]["hf_retention"] == 1.0 and identity["std"]["hf_retention"] == 0.0
    assert set(identity["hf_retention_bands"]["ratio"][1:]) == {1.0}


def test_a_vae_compared_with_itself_scores_the_same(evaluation):
    tiny, again = json.loads((evaluation / "metrics.json").read_text())["models"][1:]
    for name, value in tiny["mean"].items():
        if value is not None:
            assert again["mean"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert again["rfid"] == pytest.approx(tiny["rfid"], rel=1e-6)
    assert tiny["mean"]["psnr"] < 30  # a random decoder is far from the input
    assert tiny["architecture"]["downsample_factor"] == 8


def test_report_is_self_contained_with_table_and_images(evaluation):
    page = (evaluation / "report.html").read_text()
    assert 'id="summary"' in page and page.count("<tr>") >= 4
    sources = [s.split('"')[0] for s in page.split('src="')[1:]]
    assert len(sources) >= 2 * 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "zz_truncated.png" in page and "capped at 100 dB" in page
    # The sharpness section: a row per real model (not the identity), its reading, and the per-band plot.
    sharpness = page.split('id="sharpness"')[1].split("</table>")[0]
    assert sharpness.count("<tr>") == 3 and "tiny again" in sharpness and "identity" not in sharpness
    assert "HF retention" in page and "high-frequency retention per band" in page


def test_report_opens_in_headless_chromium(evaluation, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import screenshot_report
    finally:
        sys.path.pop(0)
    if screenshot_report.find_browser() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(evaluation / "report.html"),
         "--out", str(shot), "--size", "1200x1600"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)
    assert checks["console_messages"] == 0 and checks["problems"] == []
    assert checks["dom"]["images"] >= 10 and checks["dom"]["tables"] >= 1
    assert checks["pixels"]["non_white_fraction"] > 0.05


def test_screenshot_script_flags_a_broken_page(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import screenshot_report
    finally:
        sys.path.pop(0)
    dom_info, problems = screenshot_report.check_dom('<table id="summary"></table><img src="missing.png">')
    assert dom_info == {"tables": 1, "images": 1} and "not an embedded PNG" in problems[0]
    assert screenshot_report.console_messages('[1:1:INFO:CONSOLE:3] "Uncaught TypeError: x", source: f (3)')


# ---------------------------------------------------------------------------------------------------
# Whole images, posterior samples, command-line errors


def test_full_resolution_pads_to_the_factor_and_crops_back(tiny_vae_dir):
    from vaekit.model import load_vae

    vae = load_vae(str(tiny_vae_dir))
    x = to_tensor(make_photo(45, 37, seed=1))[None]  # neither side a multiple of 8
    with torch.no_grad():
        y = inference.encode_decode(vae, x)
        sampled = inference.encode_decode(vae, x, sample=True, seeds=[7])
        again = inference.encode_decode(vae, x, sample=True, seeds=[7])
    assert y.shape == x.shape
    assert not torch.equal(sampled, y) and torch.equal(sampled, again)  # seeded per image


def test_evaluate_full_resolution_on_odd_sizes(tiny_vae_dir, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    make_photo(45, 37, seed=1).save(data / "a.png")
    make_photo(30, 52, seed=2).save(data / "b.png")
    out = tmp_path / "out"
    assert main(["evaluate", "--vae", str(tiny_vae_dir), "--data", str(data), "--out", str(out),
                 "--resolution", "full", "--no-lpips", "--no-rfid", "--quiet"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["data"]["images"] == 2 and "whole images" in summary["protocol"]["resolution"]
    assert summary["models"][0]["mean"]["lpips_vgg"] is None and summary["models"][0]["rfid"] is None


@pytest.mark.parametrize("argv, message", [
    (["--data", "x", "--out", "y"], "--vae"),
    (["--vae", "identity", "--vae", "identity", "--label", "one", "--data", "x", "--out", "y"], "--label"),
    (["--vae", "identity", "--data", "/nonexistent/images", "--out", "y"], "not found"),
])
def test_evaluate_user_errors_are_one_line(argv, message, capsys):
    assert main(["evaluate", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
