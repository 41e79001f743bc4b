"""Exact tiled encode/decode, auto tiling by memory budget, fp32 fallback, reconstruct, inspect --precision."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen import make_photo
from vaekit.codec import inference, memory, options, tiling
from vaekit.cli import main
from vaekit.errors import VaekitError
from vaekit.model import build_preset, save_diffusers

# Tiled and untiled passes differ only by float rounding (convolutions over different extents sum in
# different orders): outputs are of order 1, so 1e-4 leaves a wide margin for that and none for a
# seam, a colour drift or a wrong statistic, which are of order 1e-2 and up.
TOLERANCE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests share a small machine


def hand_built(overrides=None, seed=0):
    """preset:tiny with random GroupNorm affines, so that every statistic a tile gets wrong would show."""
    torch.manual_seed(seed)
    vae = build_preset("tiny", overrides).eval()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return vae


@pytest.fixture(scope="module")
def vae():
    return hand_built()


@pytest.fixture(scope="module")
def photo():
    """A smooth photo-like image (1, 3, 203, 157): neither side a multiple of 8 or of any tile."""
    img = make_photo(157, 203, seed=3)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W)


# ---------------------------------------------------------------------------------------------------
# 1. Tiled equals untiled


@pytest.mark.parametrize("tile", ["minimum", 128])
def test_tiled_encode_and_decode_match_untiled_on_odd_sizes(vae, photo, tile):
    tile = tiling.minimum_tile(vae) if tile == "minimum" else tile
    mean, logvar = inference.encode(vae, photo)
    assert mean.shape == (1, 4, 26, 20)  # ceil(203 / 8), ceil(157 / 8)
    tiled_mean, tiled_logvar = inference.encode(vae, photo, tile=tile)
    assert (tiled_mean - mean).abs().max() < TOLERANCE and (tiled_logvar - logvar).abs().max() < TOLERANCE

    images = inference.decode(vae, mean, size=(203, 157))
    assert images.shape == (1, 3, 203, 157)
    tiled = inference.decode(vae, mean, tile=tile, size=(203, 157))
    assert (tiled - images).abs().max() < TOLERANCE
    # The decoder's tiles really were tiles: more than one per axis at the full resolution.
    assert len(tiling.plan_tiles(208, 160, tile, tiling.decoder_stages(vae)[-1].radius * 2, 1)) > 2


def test_untiled_path_is_diffusers_own_forward(vae, photo):
    x = tiling.pad_to_multiple(photo, 8)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        expected = vae.decode(posterior.mean).sample
    mean, logvar = inference.encode(vae, photo)
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)
    assert torch.equal(inference.decode(vae, mean), expected)


def test_untiled_units_with_gradients_are_diffusers_forward_and_differentiable(vae, photo):
    # Inference applies SiLU in place and adds the residual in place; with gradients on, the units
    # must give the same bits and a backward pass autograd accepts.
    z = inference.encode(vae, photo[..., :64, :64])[0].requires_grad_(True)
    with torch.no_grad():
        expected = vae.decode(z).sample
        without_grad = tiling.decode_untiled(vae, z)
    with torch.enable_grad():
        out = tiling.decode_untiled(vae, z)
        out.square().mean().backward()
    assert torch.equal(out.detach(), expected) and torch.equal(without_grad, expected)
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_other_architectures_tile_exactly():
    # f4 with two resnets per level in the encoder, and f2 with one: the stages and contexts follow the model.
    for overrides in ({"block_out_channels": [32, 64, 64], "layers_per_block": 2}, {"block_out_channels": [32, 32]}):
        vae = hand_built(overrides, seed=1)
        x = torch.rand(2, 3, 75, 61, generator=torch.Generator().manual_seed(0)) * 2 - 1
        tile = tiling.minimum_tile(vae)
        mean, _ = inference.encode(vae, x)
        assert (inference.encode(vae, x, tile=tile)[0] - mean).abs().max() < TOLERANCE
        untiled = inference.decode(vae, mean, size=(75, 61))
        assert (inference.decode(vae, mean, tile=tile, size=(75, 61)) - untiled).abs().max() < TOLERANCE


def test_per_tile_normalisation_is_what_diffusers_tiling_gets_wrong(vae, photo):
    # The same tile size through diffusers' enable_tiling(): each tile normalises on its own and tiles
    # are blended. vaekit's tiles are exact; diffusers' are off by far more than rounding.
    mean, _ = inference.encode(vae, photo)
    untiled = inference.decode(vae, mean)
    ours = inference.decode(vae, mean, tile=128)
    vae.enable_tiling()
    try:
        vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16
        with torch.no_grad():
            theirs = vae.decode(mean).sample
    finally:
        vae.disable_tiling()
    assert (ours - untiled).abs().max() < TOLERANCE
    assert (theirs - untiled).abs().max() > 100 * TOLERANCE


def test_explicit_small_overlap_is_allowed_and_approximate(vae, photo):
    mean, _ = inference.encode(vae, photo)
    untiled = inference.decode(vae, mean)
    rough = inference.decode(vae, mean, tile=64, overlap=8)  # less context than the receptive field
    assert rough.shape == untiled.shape and torch.isfinite(rough).all()
    assert (rough - untiled).abs().max() > TOLERANCE


@pytest.mark.parametrize("tile, overlap, message", [
    (100, None, "multiple of the downsampling factor 8"),
    (16, None, "too small for this VAE"),
    ("banana", None, "'auto', 'off' or a size in pixels"),
    (128, 12, "overlap=12 must be a non-negative multiple"),
    (64, 32, "too small for this VAE"),
])
def test_bad_tile_and_overlap_values_are_clear_errors(vae, photo, tile, overlap, message):
    with pytest.raises(VaekitError, match=message):
        inference.encode(vae, photo, tile=tile, overlap=overlap)


def test_unsupported_block_types_are_refused():
    vae = build_preset("tiny")
    vae.decoder.up_blocks[0].attentions = torch.nn.ModuleList([torch.nn.Identity()])
    with pytest.raises(VaekitError, match="attention in its down/up blocks"):
        inference.decode(vae, torch.zeros(1, 4, 8, 8), tile=128)


# ---------------------------------------------------------------------------------------------------
# 3. Auto tiling: by memory budget, and after running out of memory


def test_auto_tiles_when_the_budget_is_below_the_untiled_estimate(vae, photo, monkeypatch):
    mean, _ = inference.encode(vae, photo)
    untiled = inference.decode(vae, mean)
    need = memory.estimate_memory(vae, 1, 208, 160, "decode")
    assert memory.choose_tile(vae, 1, 208, 160, "decode", budget=2 * need) is None
    chosen = memory.choose_tile(vae, 1, 208, 160, "decode", budget=need // 2)
    assert chosen is not None and chosen % 8 == 0 and chosen >= tiling.minimum_tile(vae)
    assert memory.estimate_memory(vae, 1, 208, 160, "decode", tile=chosen) <= need // 2

    calls = []
    real = tiling.decode_tiled
    monkeypatch.setattr(tiling, "decode_tiled", lambda *a: calls.append(a[2]) or real(*a))
    assert (inference.decode(vae, mean, tile="auto", memory_budget=2 * need) - untiled).abs().max() == 0
    assert calls == []  # fits: untiled
    tiled = inference.decode(vae, mean, tile="auto", memory_budget=need // 2)
    assert calls == [chosen] and (tiled - untiled).abs().max() < TOLERANCE


def test_auto_falls_back_to_tiles_after_out_of_memory(vae, photo, monkeypatch):
    mean, _ = inference.encode(vae, photo)
    expected = inference.decode(vae, mean)

    def out_of_memory(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(tiling, "decode_untiled", out_of_memory)
    with pytest.warns(UserWarning, match="ran out of memory; retrying in tiles"):
        images = inference.decode(vae, mean, tile="auto", memory_budget="64G")
    assert (images - expected).abs().max() < TOLERANCE


def test_memory_budget_parsing():
    assert options.parse_bytes("512M") == 512 * 2**20 and options.parse_bytes("2.5G") == int(2.5 * 2**30)
    assert options.parse_bytes(1000) == 1000
    with pytest.raises(VaekitError, match="not a size"):
        options.parse_bytes("lots")


# ---------------------------------------------------------------------------------------------------
# 2. Precision: fp16 overflow is redone in fp32


def overflowing_fp16_pair():
    """(fp16 model whose first convolutions overflow fp16, fp32 model with the same, fp16-rounded, weights)."""
    vae = hand_built(seed=2)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(2e5)  # |w| up to ~4e4: representable, but outputs exceed 65504
        vae.decoder.conv_in.weight.mul_(2e5)
    vae.half()
    reference = build_preset("tiny").eval()
    reference.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    return vae, reference


def test_fp16_overflow_is_detected_and_redone_in_fp32(photo):
    vae, reference = overflowing_fp16_pair()
    with torch.no_grad():
        raw = vae.decoder.conv_in(torch.ones(1, 4, 8, 8, dtype=torch.float16))
    assert not torch.isfinite(raw).all()  # the construction really overflows

    with pytest.warns(UserWarning, match="float16 inference gave non-finite values"):
        mean, logvar = inference.encode(vae, photo)
    with pytest.warns(UserWarning, match="redoing the batch in float32"):
        images = inference.decode(vae, mean, tile=128)
    expected_mean, expected_logvar = inference.encode(reference, photo)
    assert torch.isfinite(mean).all() and torch.isfinite(images).all()
    assert (mean - expected_mean).abs().max() < TOLERANCE and (logvar - expected_logvar).abs().max() < TOLERANCE
    assert (images - inference.decode(reference, expected_mean)).abs().max() < TOLERANCE
    assert next(vae.parameters()).dtype == torch.float16  # the caller's model is left in its dtype


def test_finite_half_precision_needs_no_fallback(photo):
    vae = hand_built().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any fallback warning fails the test
        mean, _ = inference.encode(vae, photo)
    assert mean.dtype == torch.float32 and torch.isfinite(mean).all()


# ---------------------------------------------------------------------------------------------------
# Commands: reconstruct, inspect --precision


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vae):
    folder = tmp_path_factory.mktemp("model") / "vae"
    save_diffusers(vae, folder)
    return folder


def test_reconstruct_writes_pngs_equal_to_untiled(tmp_path, model_dir, capsys):
    images = tmp_path / "in"
    images.mkdir()
    make_photo(157, 203, seed=3).save(images / "odd.png")
    make_photo(96, 64, seed=4).save(images / "small.jpg")
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = ["reconstruct", "--vae", str(model_dir), str(images / "odd.png"), str(images / "small.jpg")]
    assert main(args + ["--out", str(out / "tiled"), "--tile", "104"]) == 0
    assert main(args + ["--out", str(out / "untiled"), "--tile", "off"]) == 0
    for name, size in (("odd.png", (157, 203)), ("small.png", (96, 64))):
        tiled, untiled = (Image.open(out / kind / name) for kind in ("tiled", "untiled"))
        assert tiled.size == size
        diff = np.asarray(tiled, dtype=np.int16) - np.asarray(untiled, dtype=np.int16)
        assert np.abs(diff).max() <= 1  # 8-bit rounding of values equal to 1e-4
    assert "PSNR" in capsys.readouterr().out

    # One unreadable image: reported, the others still written, exit code 1.
    assert main(args[:3] + [str(images / "broken.png"), str(images / "odd.png"), "--out", str(out / "mixed")]) == 1
    assert (out / "mixed" / "odd.png").is_file() and "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--tile", "12"], "multiple of the downsampling factor"),
    (["--tile", "auto", "--overlap", "3"], "--overlap 3"),
    (["--memory_budget", "lots"], "not a size"),
])
def test_reconstruct_bad_options_are_one_line_errors(tmp_path, model_dir, capsys, extra, message):
    make_photo(64, 64, seed=1).save(tmp_path / "a.png")
    assert main(["reconstruct", "--vae", str(model_dir), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_reconstruct_missing_image_is_a_clear_error(tmp_path, model_dir, capsys):
    assert main(["reconstruct", "--vae", str(model_dir), str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert "Image not found" in capsys.readouterr().err


def test_inspect_precision_flags_layers_that_overflow_fp16(tmp_path, model_dir, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        make_photo(64, 64, seed=i).save(data / f"{i}.png")
    assert main(["inspect", "--vae", str(model_dir), "--data", str(data), "--size", "64", "--precision",
                 "--out", str(tmp_path / "safe"), "--quiet"]) == 0
    safe = json.loads((tmp_path / "safe" / "precision.json").read_text())
    assert safe["fp16_safe"] and not safe["overflow"] and "fp16-safe" in capsys.readouterr().out
    names = [row["layer"] for row in safe["layers"]]
    assert "encoder.conv_in" in names and "decoder.conv_out" in names  # every layer is measured

    hot, _ = overflowing_fp16_pair()
    save_diffusers(hot.float(), tmp_path / "hot")
    assert main(["inspect", "--vae", str(tmp_path / "hot"), "--data", str(data), "--size", "64", "--precision",
                 "--out", str(tmp_path / "hot-report"), "--quiet"]) == 0
    report = json.loads((tmp_path / "hot-report" / "precision.json").read_text())
    assert not report["fp16_safe"] and report["overflow"][0] == "encoder.conv_in"
    assert "decoder.conv_in" in report["overflow"]
    assert "NOT fp16-safe" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The benchmark script runs end to end (its numbers are for the README, not for tests)


@pytest.mark.slow  # a real benchmark run, 30 s on 2 cores: `make test-slow`
def test_bench_tiling_script_runs_and_reports_every_variant(tmp_path, model_dir):
    make_photo(200, 200, seed=5).save(tmp_path / "photo.png")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_tiling.py"
    done = subprocess.run(
        [sys.executable, str(script), "--vae", str(model_dir), "--image", str(tmp_path / "photo.png"), "--size", "192",
         "--tile", "96", "--threads", "1", "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["variant"]: row for row in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert set(rows) == {"untiled", "vaekit exact", "vaekit fast", "diffusers tiled"}
    for row in rows.values():
        assert {"variant", "psnr_vs_untiled", "peak_mib", "seconds", "tile"} <= set(row) and row["seconds"] > 0
    assert rows["untiled"]["tile"] is None and rows["vaekit exact"]["tile"] == 96
    assert rows["vaekit exact"]["psnr_vs_untiled"] > 100  # exact up to rounding
    assert rows["diffusers tiled"]["psnr_vs_untiled"] < rows["vaekit fast"]["psnr_vs_untiled"] < 100
    assert "| vaekit fast 96 |" in done.stdout
