"""Presets, diffusers and single-file export, loading, conversion, pipeline fit, CLI errors."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from vaekit.cli import main
from vaekit.model.single_file import save_single_file, to_original
from vaekit.errors import VaekitError
from vaekit.model import PRESETS, build_preset, describe, fingerprint, load_vae, save_diffusers


@torch.no_grad()
def encode_decode(vae, x):
    """Posterior mean, logvar and the decode of the mean."""
    posterior = vae.encode(x).latent_dist
    return posterior.mean, posterior.logvar, vae.decode(posterior.mean).sample


def assert_identical(a, b, x):
    for ta, tb in zip(encode_decode(a, x), encode_decode(b, x)):
        assert torch.equal(ta, tb), (ta - tb).abs().max()


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    return torch.rand(1, 3, 32, 32) * 2 - 1


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_exports_load_identically(name, tmp_path, inputs):
    torch.manual_seed(1)
    vae = build_preset(name).eval()
    save_diffusers(vae, tmp_path / "diffusers")
    single = save_single_file(vae, tmp_path / "vae.safetensors")

    # 1. diffusers' own loader on our folder
    loaded = AutoencoderKL.from_pretrained(tmp_path / "diffusers").eval()
    assert_identical(vae, loaded, inputs)
    assert loaded.config.scaling_factor == PRESETS[name]["scaling_factor"]

    # 2. diffusers' own single-file loader, offline, with our folder as the config
    from_single = AutoencoderKL.from_single_file(
        str(single), config=str(tmp_path / "diffusers"), local_files_only=True
    ).eval()
    assert_identical(vae, from_single, inputs)

    # vaekit reads it back with the metadata ...
    assert_identical(vae, load_vae(str(single)), inputs)
    assert load_vae(str(single)).config.shift_factor == vae.config.shift_factor

    # ... without it (architecture inferred from shapes) and with a full-checkpoint prefix
    tensors = load_file(str(single))
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    assert_identical(vae, load_vae(str(tmp_path / "bare.safetensors")), inputs)
    save_file({f"first_stage_model.{k}": v for k, v in tensors.items()}, str(tmp_path / "full.safetensors"))
    assert_identical(vae, load_vae(str(tmp_path / "full.safetensors")), inputs)


def test_single_file_uses_original_layout(tmp_path):
    vae = build_preset("tiny")
    keys = set(load_file(str(save_single_file(vae, tmp_path / "v.safetensors"))))
    assert "encoder.down.0.block.0.norm1.weight" in keys
    assert "decoder.up.3.block.0.conv1.weight" in keys  # highest resolution level is up.{last}
    assert "encoder.mid.attn_1.q.weight" in keys and "decoder.mid.attn_1.proj_out.weight" in keys
    assert "encoder.norm_out.weight" in keys and "quant_conv.weight" in keys
    assert load_file(str(tmp_path / "v.safetensors"))["encoder.mid.attn_1.q.weight"].ndim == 4
    assert not any("down_blocks" in k or "to_q" in k for k in keys)


def test_ckpt_and_diffusers_keyed_single_files_load(tmp_path, inputs):
    vae = build_preset("tiny").eval()
    torch.save({"state_dict": to_original(vae.state_dict())}, tmp_path / "vae.ckpt")
    assert_identical(vae, load_vae(str(tmp_path / "vae.ckpt"), overrides={"norm_num_groups": 32}), inputs)
    save_file({f"vae.{k}": v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "d.safetensors"))
    assert_identical(vae, load_vae(str(tmp_path / "d.safetensors")), inputs)


def test_export_dtype_and_convert_roundtrip(tmp_path, inputs):
    src = tmp_path / "src"
    save_diffusers(build_preset("tiny").eval(), src)
    assert main(["export", str(src), "--out", str(tmp_path / "half"), "--format", "diffusers", "--dtype", "fp16"]) == 0
    stored = load_file(str(tmp_path / "half" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())

    assert main(["convert", str(src), "--to", "single-file", "--out", str(tmp_path / "one.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "one.safetensors"), "--to", "diffusers", "--out", str(tmp_path / "back")]) == 0
    assert_identical(load_vae(str(src)), load_vae(str(tmp_path / "back")), inputs)
    assert fingerprint(load_vae(str(src))) == fingerprint(load_vae(str(tmp_path / "back")))


def test_fingerprint_is_the_weights_not_their_memory_format():
    vae = build_preset("tiny")
    before = fingerprint(vae)
    vae.to(memory_format=torch.channels_last)  # as the bulk encoder runs it; 1x1 kernels get odd strides
    assert fingerprint(vae) == before
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert fingerprint(vae) != before


def test_export_is_atomic_when_interrupted(tmp_path, monkeypatch):
    out = tmp_path / "export"
    save_diffusers(build_preset("tiny"), out)
    before = (out / "diffusion_pytorch_model.safetensors").read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", fail)
    with pytest.raises(KeyboardInterrupt):
        save_diffusers(build_preset("tiny"), out)
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def card_parts(folder):
    """(front matter as YAML, Markdown body, the usage snippet's code) of an export's README.md."""
    import yaml

    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    code = body.split("```python\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(header), body, code


def test_every_diffusers_export_carries_a_model_card_whose_snippet_runs(tmp_path, capsys):
    out = tmp_path / "my-vae"
    assert main(["export", "preset:sd3", "--out", str(out), "-o", "block_out_channels=[32,32,32,32]",
                 "-o", "layers_per_block=1"]) == 0
    header, body, code = card_parts(out)
    assert header["library_name"] == "diffusers" and {"vae", "autoencoderkl", "vaekit"} <= set(header["tags"])
    assert "base_model" not in header  # a preset has none
    assert "| latent channels | 16 |" in body and "| scaling factor | 1.5305 |" in body
    assert "| shift factor | 0.0609 |" in body and "random weights" in body
    assert "StableDiffusion3Pipeline" in code  # 16-channel latents: the SD3 / FLUX family
    # The snippet loads this folder and round-trips an image through the normalisation (the pipeline line
    # needs the hub, so the snippet stops before it).
    runnable = code.split("# In a pipeline")[0].replace("256, 256", "32, 32")
    scope = {}
    exec(runnable, scope)
    assert scope["decoded"].shape == (1, 3, 32, 32) and scope["latents"].shape == (1, 16, 4, 4)

    single = tmp_path / "again"
    assert main(["convert", str(out), "--to", "diffusers", "--out", str(single)]) == 0
    assert f"from `{out}`" in card_parts(single)[1]


def test_a_card_names_a_hub_source_as_its_base_model(tmp_path):
    from vaekit.model.card import model_card

    vae = build_preset("tiny")
    text = model_card(vae, tmp_path / "vae", source="stabilityai/sd-vae-ft-mse")
    assert "base_model: stabilityai/sd-vae-ft-mse" in text and "StableDiffusionPipeline" in text
    assert "base_model" not in model_card(vae, tmp_path / "vae", source=str(tmp_path / "local"))


def test_the_card_is_written_with_the_export_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "export"
    save_diffusers(build_preset("tiny"), out, card="old card\n")
    monkeypatch.setattr("pathlib.Path.write_text", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(Exception):
        save_diffusers(build_preset("tiny"), out, card="new card\n")
    monkeypatch.undo()
    assert (out / "README.md").read_text() == "old card\n" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_overrides_and_info(capsys):
    vae = load_vae("preset:tiny", overrides={"latent_channels": 8, "scaling_factor": 0.5})
    info = describe(vae)
    assert info["latent_channels"] == 8 and info["scaling_factor"] == 0.5 and info["downsample_factor"] == 8
    assert describe(load_vae("preset:f16c32"))["downsample_factor"] == 16
    assert main(["info", "preset:sd3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["latent_channels"] == 16 and printed["shift_factor"] == 0.0609 and not printed["quant_conv"]


def tiny_sd_pipeline(vae):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def test_exported_vae_runs_in_a_diffusers_pipeline(tmp_path):
    from vaekit.model.pipeline import replace_vae

    save_diffusers(build_preset("tiny"), tmp_path / "vae")
    pipe = tiny_sd_pipeline(AutoencoderKL.from_pretrained(tmp_path / "vae"))
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 7, 32)
    image = pipe(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)

    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(VaekitError, match="16-channel latents .* expects 4"):
        replace_vae(pipe, load_vae("preset:tiny", overrides={"latent_channels": 16}))
    assert not calls  # refused before any denoising step


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "make_argument, message",
    [
        (lambda d: str(d / "missing.safetensors"), "Model not found"),
        (lambda d: (d / "notes.safetensors").write_text("hello") and str(d / "notes.safetensors"), "not a readable safetensors"),
        (lambda d: (d / "empty.ckpt").write_bytes(b"") or str(d / "empty.ckpt"), "empty"),
        (lambda d: "preset:nope", "Unknown preset 'nope'"),
        (lambda d: d.as_posix(), "not a diffusers VAE"),
    ],
)
def test_bad_model_arguments_give_one_clear_error(tmp_path, capsys, make_argument, message):
    code, err = run_cli(["info", make_argument(tmp_path)], capsys)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


class Payload:
    """A pickled object that weights_only loading must refuse."""


def test_pickle_checkpoint_is_refused(tmp_path, capsys):
    torch.save({"model": Payload()}, tmp_path / "evil.ckpt", pickle_module=pickle)
    code, err = run_cli(["info", str(tmp_path / "evil.ckpt")], capsys)
    assert code == 2 and "weights_only=True" in err and "safetensors" in err


def test_state_dict_of_another_model_is_refused(tmp_path, capsys):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "u.safetensors"))
    code, err = run_cli(["info", str(tmp_path / "u.safetensors")], capsys)
    assert code == 2 and "does not hold an AutoencoderKL" in err


def test_mismatched_architecture_names_key_and_shapes(tmp_path, capsys):
    save_single_file(build_preset("tiny"), tmp_path / "v.safetensors")
    code, err = run_cli(["info", str(tmp_path / "v.safetensors"), "-o", "latent_channels=8"], capsys)
    assert code == 2 and "key 'encoder.conv_out.weight'" in err and "(8, 64, 3, 3)" in err and "(16, 64, 3, 3)" in err


def test_unknown_override_key(capsys):
    code, err = run_cli(["info", "preset:tiny", "-o", "latent_chanels=8"], capsys)
    assert code == 2 and "Unknown model config key 'latent_chanels'" in err


def test_hub_id_offline_says_how_to_use_a_local_path(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(["info", "someone/not-a-real-vae"], capsys)
    assert code == 2 and "hub" in err and "local path" in err


def test_console_script_help_for_every_subcommand():
    script = Path(sys.executable).with_name("vaekit")
    assert script.exists(), "the vaekit console script is not installed (pip install -e .)"
    top = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    from vaekit.cli.main import build_parser

    names = list(build_parser()._subparsers._group_actions[0].choices)
    assert {"info", "export", "convert"} <= set(names)
    for name in names:
        assert name in top
        result = subprocess.run([str(script), name, "--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "usage: vaekit " + name in result.stdout, result.stderr
