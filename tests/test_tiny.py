"""AutoencoderTiny (TAESD) wherever a VAE is accepted: loading, TAESD's two-file layout, the codec, the commands,
and the measured latent-space check of `replace_vae`."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import load_file
from torch import nn

import imagegen
from test_model import tiny_sd_pipeline
from vaekit.cli import main
from vaekit.codec.inference import TINY_LOGVAR, decode, encode, encode_decode, tile_option
from vaekit.errors import VaekitError
from vaekit.model import describe, fingerprint, load_vae, save_diffusers
from vaekit.model.load import write_model
from vaekit.model.pipeline import latent_space_error, replace_vae


# TAESD as madebyollin/taesd publishes it (and ComfyUI's comfy/taesd rebuilds it): nn.Sequential layers
# whose indices are the keys of the taesd_encoder / taesd_decoder files. Encoder input and decoder
# output are in [0, 1].
def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(conv(n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def reference_encoder(latent_channels):
    down = lambda: conv(64, 64, stride=2, bias=False)  # noqa: E731
    return nn.Sequential(conv(3, 64), Block(64), down(), Block(64), Block(64), Block(64), down(), Block(64), Block(64),
                         Block(64), down(), Block(64), Block(64), Block(64), conv(64, latent_channels))


def reference_decoder(latent_channels):
    up = lambda: [nn.Upsample(scale_factor=2), conv(64, 64, bias=False)]  # noqa: E731
    return nn.Sequential(Clamp(), conv(latent_channels, 64), nn.ReLU(), Block(64), Block(64), Block(64), *up(),
                         Block(64), Block(64), Block(64), *up(), Block(64), Block(64), Block(64), *up(), Block(64),
                         conv(64, 3))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    imagegen.write_photos(folder, 3, size=(40, 36))
    return folder


def test_taesd_files_hold_taesd_layout_and_load_back(tmp_path):
    """Exported files load strictly into TAESD's own modules and compute what diffusers' AutoencoderTiny computes."""
    vae = load_vae("preset:taesd", overrides={"latent_channels": 16}, seed=3)
    write_model(vae, tmp_path / "taesd", "taesd", taesd_name="taef1")
    assert sorted(p.name for p in (tmp_path / "taesd").iterdir()) == ["taef1_decoder.safetensors",
                                                                      "taef1_encoder.safetensors"]
    encoder, decoder = reference_encoder(16), reference_decoder(16)
    encoder.load_state_dict(load_file(tmp_path / "taesd" / "taef1_encoder.safetensors"))  # strict
    decoder.load_state_dict(load_file(tmp_path / "taesd" / "taef1_decoder.safetensors"))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latents
        assert torch.allclose(encoder((x + 1) / 2), z, atol=1e-5)
        assert torch.allclose(decoder(z) * 2 - 1, vae.decode(z).sample, atol=1e-5)

    # vaekit reads the pair back (the folder, or either file; .pth too) into the same model.
    for spec in (tmp_path / "taesd", tmp_path / "taesd" / "taef1_decoder.safetensors"):
        assert fingerprint(load_vae(spec)) == fingerprint(vae)
    (tmp_path / "pth").mkdir()
    torch.save(encoder.state_dict(), tmp_path / "pth" / "taesd_encoder.pth")
    torch.save(decoder.state_dict(), tmp_path / "pth" / "taesd_decoder.pth")
    assert fingerprint(load_vae(tmp_path / "pth" / "taesd_encoder.pth")) == fingerprint(vae)
    (tmp_path / "pth" / "taesd_decoder.pth").unlink()
    with pytest.raises(VaekitError, match="taesd_decoder.pth must lie beside it"):
        load_vae(tmp_path / "pth" / "taesd_encoder.pth")


def test_tiny_folder_round_trips_and_runs_through_the_codec(tmp_path):
    vae = load_vae("preset:taesd", seed=0)
    save_diffusers(vae, tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    loaded = load_vae(tmp_path / "tiny")
    assert isinstance(loaded, AutoencoderTiny) and fingerprint(loaded) == fingerprint(vae)
    theirs = AutoencoderTiny.from_pretrained(tmp_path / "tiny")
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in vae.state_dict().items())
    info = describe(vae)
    assert info["class"] == "AutoencoderTiny" and info["downsample_factor"] == 8 and info["scaling_factor"] == 1.0

    # Any size: padded to the factor and cropped back; the posterior is the latents at the log-variance floor.
    x = torch.rand(2, 3, 30, 45) * 2 - 1
    mean, logvar = encode(vae, x, tile="auto")
    assert mean.shape == (2, 4, 4, 6) and torch.all(logvar == TINY_LOGVAR)
    with torch.no_grad():
        padded = torch.nn.functional.pad(x, (0, 3, 0, 2), mode="reflect")
        assert torch.allclose(mean, vae.encode(padded).latents, atol=1e-6)
    assert decode(vae, mean, size=(30, 45)).shape == (2, 3, 30, 45)
    assert encode_decode(vae, x, sample=True, seeds=[0, 1]).shape == x.shape
    with pytest.raises(VaekitError, match="runs untiled"):
        tile_option(vae, "256")
    with pytest.raises(VaekitError, match="num_encoder_blocks"):  # 3 block counts for 4 levels
        load_vae("preset:taesd", overrides={"num_encoder_blocks": [1, 3, 3]})
    with pytest.raises(VaekitError, match="downsamples 16x but the decoder upsamples 8x"):
        load_vae("preset:taesd", overrides={"encoder_block_out_channels": [64] * 5, "num_encoder_blocks": [1] * 5})


def test_every_command_takes_a_tiny_model(tmp_path, photos, capsys):
    save_diffusers(load_vae("preset:taesd", seed=0), tmp_path / "tiny")
    tiny = str(tmp_path / "tiny")
    assert main(["info", tiny]) == 0 and "AutoencoderTiny" in capsys.readouterr().out
    assert main(["export", tiny, "--format", "taesd", "--out", str(tmp_path / "t")]) == 0
    assert fingerprint(load_vae(tmp_path / "t")) == fingerprint(load_vae(tiny))
    assert main(["export", tiny, "--format", "single-file", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no AutoencoderTiny" in capsys.readouterr().err
    assert main(["export", "preset:tiny", "--format", "taesd", "--out", str(tmp_path / "y")]) == 2
    assert "holds an AutoencoderTiny" in capsys.readouterr().err
    images = sorted(str(p) for p in photos.iterdir())
    assert main(["reconstruct", "--vae", tiny, *images, "--out", str(tmp_path / "rec")]) == 0
    assert len(list((tmp_path / "rec").iterdir())) == 3
    assert main(["reconstruct", "--vae", tiny, images[0], "--out", str(tmp_path / "rec"), "--tile", "64"]) == 2
    assert "runs untiled" in capsys.readouterr().err
    assert main(["encode", "--vae", tiny, "--data", str(photos), "--out", str(tmp_path / "cache"), "--resolution",
                 "32", "--num_workers", "0", "--store", "mode"]) == 0
    from vaekit.cache import LatentDataset

    assert LatentDataset(tmp_path / "cache")[0]["latents"].shape == (4, 4, 4)
    assert main(["inspect", "--vae", tiny, "--data", str(photos), "--size", "32", "--quiet",
                 "--out", str(tmp_path / "inspect")]) == 0
    assert (tmp_path / "inspect" / "inspect.json").is_file()
    assert main(["inspect", "--vae", tiny, "--data", str(photos), "--size", "32", "--quiet", "--precision"]) == 0
    assert main(["stats", "--vae", tiny, "--data", str(photos), "--resolution", "32", "--num_workers", "0",
                 "--write", str(tmp_path / "normalised")]) == 2
    assert "normalise the teacher instead" in capsys.readouterr().err


def test_replace_vae_measures_that_the_latent_space_is_shared(tmp_path):
    teacher = load_vae("preset:tiny", seed=0)
    pipe = tiny_sd_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    copy = load_vae("preset:tiny", seed=0)
    assert latent_space_error(teacher, copy) == 0.0
    replace_vae(pipe, copy)  # the same latent space: accepted
    assert pipe.vae is copy

    stranger = load_vae("preset:tiny", seed=1)  # same shape, unrelated latent space
    assert latent_space_error(copy, stranger) > 1.0
    with pytest.raises(VaekitError, match="does not share the pipeline's latent space"):
        replace_vae(pipe, stranger)
    assert pipe.vae is copy
    with pytest.raises(VaekitError, match="downsampling factor is 16 but the pipeline's VAE's is 8"):
        replace_vae(pipe, load_vae("preset:tiny", overrides={"block_out_channels": [32, 32, 64, 64, 64]}))

    tiny = load_vae("preset:taesd", seed=0)
    replace_vae(pipe, tiny, check_latent_space=False)  # asked to: swapped without the measurement
    embeds = torch.randn(1, 7, 32)
    image = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2,
                 height=64, width=64, output_type="np").images
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.vae_scale_factor == 8 and image.shape == (1, 64, 64, 3)
    assert not isinstance(pipe.vae, AutoencoderKL)
