"""`vaekit probe`: the same small denoiser on each VAE's latents ranks latent spaces, reproducibly, from caches."""

import json

import pytest
import torch

from imagegen import write_photos
from vaekit.cli import main
from vaekit.eval.config import ProbeConfig
from vaekit.eval.probe import LatentSet, build_denoiser, run_probe, white_noise_loss
from vaekit.model import build_preset, save_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")  # tests share a small machine


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 48, size=(64, 64))
    return folder


@pytest.fixture(scope="module")
def two_vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_diffusers(build_preset("tiny").eval(), root / f"tiny{seed}")
    return root / "tiny0", root / "tiny1"


def small_config(tmp_path, **fields):
    values = dict(vae=["preset:tiny"], data="unused", out=str(tmp_path), holdout=8, steps=100, batch_size=8, width=16,
                  blocks=2, noise_levels=4, eval_every=50, sample=False, lr=2e-3, device="cpu")
    values.update(fields)
    return ProbeConfig(**values)


def test_two_seeds_agree_that_latents_with_white_noise_are_harder(photos, tmp_path):
    from vaekit.codec.inference import encode
    from vaekit.data.crops import to_tensor
    from PIL import Image

    torch.manual_seed(0)
    vae = build_preset("tiny").eval()
    x = torch.stack([to_tensor(Image.open(p).convert("RGB")) for p in sorted(photos.glob("*.png"))])
    mean, _ = encode(vae, x)  # (48, 4, 8, 8)
    keys = [f"img{i:02d}" for i in range(len(mean))]
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1)) * 3 * mean.std()
    clean = LatentSet("clean", "preset:tiny", keys, mean)
    noisy = LatentSet("noisy", "preset:tiny + noise", keys, mean + noise)

    results = [run_probe([noisy, clean], small_config(tmp_path, seed=seed), progress=False) for seed in (0, 1)]
    for result in results:
        assert result["ranking"] == ["clean", "noisy"]
        final = {m["label"]: m["final"] for m in result["models"]}
        assert final["noisy"]["relative_mean"] > 0.9  # mostly white noise: little to learn
        assert final["clean"]["relative_mean"] < 0.8 * final["noisy"]["relative_mean"]
        assert len(final["clean"]["loss"]) == 4 and result["data"] == {"images": 48, "train": 40, "held_out": 8,
                                                                        "source": "unused"}
        curve = next(m for m in result["models"] if m["label"] == "clean")["curve"]
        assert curve["step"] == [50, 100] and len(curve["held_out_loss"]) == 2
        assert result["verdict"].startswith("clean is the easiest latent space")
    assert results[0]["models"][0]["final"]["loss"] != results[1]["models"][0]["final"]["loss"]  # seeds differ
    again = run_probe([noisy, clean], small_config(tmp_path, seed=0), progress=False)
    assert again["models"][1]["final"] == results[0]["models"][1]["final"]  # same seed: the same numbers


def test_every_model_starts_from_the_same_denoiser_and_the_noise_reference_is_right():
    config = ProbeConfig(vae=["a"], data="d", out="o", width=16, blocks=2)
    four, sixteen = build_denoiser(4, config), build_denoiser(16, config)
    shared = [k for k in four.state_dict() if not k.startswith(("conv_in.", "conv_out."))]
    assert shared and all(torch.equal(four.state_dict()[k], sixteen.state_dict()[k]) for k in shared)
    assert torch.count_nonzero(four(torch.randn(2, 4, 8, 8), torch.rand(2))) == 0  # zero output layer at the start
    # The lowest white-noise loss: 1 at both ends (one of the two is known), 2 in the middle (neither is).
    assert white_noise_loss(0.0) == pytest.approx(1.0) and white_noise_loss(1.0) == pytest.approx(1.0)
    assert white_noise_loss(0.5) == pytest.approx(2.0)
    generator = torch.Generator().manual_seed(0)
    z, eps = torch.randn(200000, generator=generator), torch.randn(200000, generator=generator)
    t = 0.3
    x_t, v = (1 - t) * z + t * eps, eps - z
    slope = float((x_t * v).mean() / x_t.square().mean())  # the best linear estimate of v from x_t
    assert float((v - slope * x_t).square().mean()) == pytest.approx(white_noise_loss(t), rel=0.02)


def test_probe_command_encodes_once_reuses_its_latents_and_reads_caches(photos, two_vaes, tmp_path, capsys):
    a, b = two_vaes
    out = tmp_path / "probe"
    argv = ["probe", "--vae", str(a), "--vae", str(b), "--label", "A", "--label", "B", "--data", str(photos),
            "--size", "32", "--limit", "16", "--holdout", "4", "--steps", "6", "--batch_size", "4", "--width", "8",
            "--blocks", "1", "--noise_levels", "3", "--eval_every", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "easiest latent space" in printed and "4x4x4" in printed
    result = json.loads((out / "probe.json").read_text())
    assert [m["label"] for m in result["models"]] == ["A", "B"] and result["data"]["images"] == 16
    assert (out / "probe.png").is_file()
    caches = [out / "latents" / "1-A", out / "latents" / "2-B"]
    assert all((c / "card.json").is_file() for c in caches)

    assert main(argv) == 0  # a second run finds its latents in the cache: nothing is encoded again
    capsys.readouterr()
    summary = json.loads((caches[0] / "summary.json").read_text())
    assert summary["encoded"] == 0 and summary["units_unchanged"] == summary["units_in_source"] == 1
    rerun = json.loads((out / "probe.json").read_text())["models"]
    assert [m["final"] for m in rerun] == [m["final"] for m in result["models"]]  # deterministic

    elsewhere = tmp_path / "from-caches"
    cached = [arg for arg in argv if arg not in ("--data", str(photos))]
    cached[cached.index("--out") + 1] = str(elsewhere)
    assert main(cached + ["--cache", str(caches[0]), "--cache", str(caches[1])]) == 0
    capsys.readouterr()
    from_caches = json.loads((elsewhere / "probe.json").read_text())
    assert [m["final"] for m in from_caches["models"]] == [m["final"] for m in result["models"]]
    assert not (elsewhere / "latents").exists()
    # A cache encoded by another VAE is refused, naming the problem.
    assert main(cached + ["--cache", str(caches[1]), "--cache", str(caches[1])]) == 2
    assert "another VAE" in capsys.readouterr().err
