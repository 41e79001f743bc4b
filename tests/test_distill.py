"""Distillation through the real trainer: KL and tiny students of a frozen teacher, exact resume, two processes,
training from the teacher's cached latents, the refused inputs, and latent compatibility in `vaekit evaluate`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from test_train import isolated, photos  # noqa: F401 (fixtures: random-backbone LPIPS and a clean Accelerate; photos)
from test_train import max_diff, tensors, train_two_processes, write_config
from vaekit.cli import main

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
HALF = {"block_out_channels": [16, 16, 32, 32], "norm_num_groups": 8}  # preset:tiny at half width


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher with a latent space of its own: 8 channels, scaling_factor 0.5, shift_factor 0.1."""
    from vaekit.model import load_vae, save_diffusers

    folder = tmp_path_factory.mktemp("teacher")
    overrides = {"latent_channels": 8, "scaling_factor": 0.5, "shift_factor": 0.1}
    save_diffusers(load_vae("preset:tiny", overrides=overrides, seed=7), folder)
    return folder


def distill_config(path, out_dir, photos, teacher, **sections):
    """The trainer tests' tiny config as a distillation of `teacher` (a KL student at half width by default)."""
    sections.setdefault("model", {"source": "preset:tiny", "overrides": HALF})
    sections["distill"] = {"teacher": str(teacher), **sections.get("distill", {})}
    return write_config(path, out_dir, photos, **sections)


def test_tiny_student_keeps_the_teacher_latent_space_resumes_bit_exactly_and_exports(tmp_path, photos, teacher,
                                                                                      capsys):
    sections = dict(model={"source": "preset:taesd"}, distill={"teacher_decode_weight": 0.5},
                    train={"steps": 4, "batch_size": 2, "checkpoint_every": 2}, optim={"lr": 1e-3},
                    ema={"enabled": True, "decay": 0.9}, loss={"perceptual_weight": 0.5})
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", str(distill_config(tmp_path / "a.yaml", full, photos, teacher, **sections))]) == 0
    cfg = distill_config(tmp_path / "b.yaml", split, photos, teacher, **sections)
    assert main(["train", "--config", str(cfg), "train.steps=2"]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    a, b = full / "checkpoint-000004", split / "checkpoint-000004"
    for name in ("vae", "ema"):
        assert max_diff(tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")) == 0, name

    # The checkpoint holds the student only and names its teacher by fingerprint.
    from vaekit.model import fingerprint, load_vae

    meta = json.loads((a / "meta.json").read_text())
    assert meta["vae_class"] == "AutoencoderTiny" and meta["distill"]["student"] == "tiny"
    assert meta["distill"]["teacher_fingerprint"] == fingerprint(load_vae(teacher))
    assert all(k.startswith(("encoder.layers.", "decoder.layers.")) for k in tensors(a / "vae.safetensors"))
    assert "teacher_rec" in (full / "train.log").read_text()

    # Exports: a diffusers AutoencoderTiny in the teacher's normalised latent space, and the TAESD pair.
    student = AutoencoderTiny.from_pretrained(full / "vae")
    assert student.config.latent_channels == 8
    assert (student.config.scaling_factor, student.config.shift_factor) == (1.0, 0.0)
    assert max_diff(student.state_dict(), tensors(a / "ema.safetensors")) == 0
    assert fingerprint(load_vae(full / "taesd")) == fingerprint(load_vae(full / "vae"))  # none of ComfyUI's families
    card = (full / "vae" / "README.md").read_text()  # the model card names the class and the teacher it learned from
    assert "AutoencoderTiny.from_pretrained" in card and "distilled student of" in card and "taesd" in card
    assert sorted(p.name for p in (full / "taesd").iterdir()) == ["taesd_decoder.safetensors",
                                                                  "taesd_encoder.safetensors"]
    assert fingerprint(load_vae(a)) == fingerprint(load_vae(full / "vae"))  # a checkpoint is a model argument too

    # Resuming with another teacher is refused.
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "train.steps=6", "distill.teacher=preset:tiny", "--resume",
                 "latest"]) == 2
    assert "is not the teacher this run was trained with" in capsys.readouterr().err


def test_cached_teacher_latents_train_the_student_as_the_teacher_would(tmp_path, photos, teacher, monkeypatch,
                                                                       capsys):
    """A cache of the teacher's latents gives the student the teacher's targets without running its encoder,
    resumes bit-exactly, and a cache of another VAE is refused."""
    from vaekit.cache.config import EncodeConfig
    from vaekit.cache.encode import encode_dataset

    cache = tmp_path / "cache"
    encode_dataset(EncodeConfig(data=str(photos), out=str(cache), vae=str(teacher), resolution=32, dtype="fp32",
                                compute_dtype="fp32", channels_last=False, num_workers=0), progress=False)
    sections = dict(data={"crop": "center", "flip": False}, optim={"lr": 1e-3, "eps": 1e-3},
                    train={"steps": 3, "batch_size": 2, "checkpoint_every": 2})
    live = tmp_path / "live"
    assert main(["train", "--config", str(distill_config(tmp_path / "a.yaml", live, photos, teacher, **sections))]) == 0

    import vaekit.train.distill

    real_load = vaekit.train.distill.load_teacher

    def teacher_without_encoder(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model.encoder.forward = lambda *a, **k: pytest.fail("the teacher's encoder ran")
        return model

    monkeypatch.setattr(vaekit.train.distill, "load_teacher", teacher_without_encoder)
    cached = tmp_path / "cached"
    sections["distill"] = {"cache": str(cache)}
    cfg = distill_config(tmp_path / "b.yaml", cached, photos, teacher, **sections)
    assert main(["train", "--config", str(cfg)]) == 0
    # The same images, crops and posterior noise: the weights of the run that encoded on the fly.
    a = tensors(live / "checkpoint-000003" / "vae.safetensors")
    b = tensors(cached / "checkpoint-000003" / "vae.safetensors")
    initial = tensors(live / "checkpoint-000002" / "vae.safetensors")
    assert max_diff(a, b) < 1e-4 < max_diff(a, initial)

    resumed = tmp_path / "resumed"
    cfg = distill_config(tmp_path / "c.yaml", resumed, photos, teacher, **sections)
    assert main(["train", "--config", str(cfg), "train.steps=2"]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    assert max_diff(b, tensors(resumed / "checkpoint-000003" / "vae.safetensors")) == 0

    other = tmp_path / "other.yaml"
    distill_config(other, tmp_path / "other", photos, "preset:tiny", **sections)
    capsys.readouterr()
    assert main(["train", "--config", str(other)]) == 2
    assert "was encoded by another VAE" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "out_dir=" + str(tmp_path / "big"), "data.size=64"]) == 2
    assert "larger than the images of" in capsys.readouterr().err
    means = tmp_path / "means"
    encode_dataset(EncodeConfig(data=str(photos), out=str(means), vae=str(teacher), resolution=32, store="mode",
                                num_workers=0), progress=False)
    assert main(["train", "--config", str(cfg), "out_dir=" + str(tmp_path / "means_run"), f"distill.cache={means}"]) == 2
    assert "posterior variance would not learn" in capsys.readouterr().err


def test_two_process_distillation_matches_one_process(tmp_path, photos, teacher):
    """2 CPU processes (gloo) x 1 image x 2 accumulation == 1 process x 1 image x 4, with the GAN and EMA on."""
    sections = dict(train={"steps": 2, "batch_size": 1, "grad_accum": 2, "checkpoint_every": 2},
                    optim={"lr": 1e-3, "eps": 1e-3}, ema={"enabled": True},
                    disc={"weight": 0.5, "n_layers": 1, "base_channels": 8, "norm": "none"})
    dist, single = tmp_path / "dist", tmp_path / "single"
    cfg = distill_config(tmp_path / "c.yaml", dist, photos, teacher, **sections)
    train_two_processes(cfg, tmp_path)
    meta = json.loads((dist / "checkpoint-000002" / "meta.json").read_text())
    assert meta["data"]["processes"] == 2 and len(set(meta["replica_fingerprints"])) == 1

    assert main(["train", "--config", str(cfg), f"out_dir={single}", "train.grad_accum=4"]) == 0
    a, b = dist / "checkpoint-000002", single / "checkpoint-000002"
    for name in ("vae", "ema", "disc"):
        assert max_diff(tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")) < 1e-5, name
    student = AutoencoderKL.from_pretrained(single / "vae")
    assert (student.config.latent_channels, student.config.scaling_factor, student.config.shift_factor) == (8, 0.5, 0.1)
    assert list(student.config.block_out_channels) == HALF["block_out_channels"]


@pytest.mark.parametrize("change, message", [
    ({"model": {"source": "preset:tiny", "overrides": {"latent_channels": 4}}}, "contradicts|keeps its teacher's"),
    ({"model": {"source": "preset:tiny", "overrides": {"block_out_channels": [32, 32, 64, 64, 64]}}},
     "downsamples 8x but the student"),
    ({"distill": {"teacher": "TINY16"}, "model": {"source": "preset:taesd"}}, "give the tiny student 5 levels"),
    ({"distill": {"teacher": "preset:taesd"}}, "The teacher is an AutoencoderTiny"),
    ({"model": {"source": "preset:taesd", "gradient_checkpointing": True}}, "EncoderTiny skips"),
    ({"model": {"source": "preset:tiny", "mode": "decoder"}}, "model.mode=scratch"),
    ({"loss": {"equivariance_prob": 0.5}}, "keeps its teacher's"),
    ({"distill": {"latent_weight": 0}}, "distill.latent_weight"),
    ({"distill": {"teacher": "MEANSTD"}, "model": {"source": "preset:taesd"}}, "latents_mean / latents_std"),
])
def test_bad_teachers_and_students_are_one_line_errors(tmp_path, photos, teacher, capsys, change, message):
    from vaekit.model import load_vae, save_diffusers

    f16 = tmp_path / "f16"
    save_diffusers(load_vae("preset:tiny", overrides={"block_out_channels": [32, 32, 32, 64, 64]}), f16)
    meanstd = tmp_path / "meanstd"
    save_diffusers(load_vae("preset:tiny", overrides={"latents_mean": [0.1] * 4, "latents_std": [2.0] * 4}), meanstd)
    swaps = {"TINY16": str(f16), "MEANSTD": str(meanstd)}
    distill = {k: swaps.get(v, v) for k, v in change.get("distill", {}).items()}
    sections = {**change, "distill": distill}
    cfg = distill_config(tmp_path / "c.yaml", tmp_path / "run", photos, teacher, **sections)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_tiny_model_trains_only_as_a_student(tmp_path, photos, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", photos, model={"source": "preset:taesd"})
    assert main(["train", "--config", str(cfg)]) == 2
    assert "trains only as a distillation student" in capsys.readouterr().err


def test_evaluate_scores_latent_compatibility_beside_the_teacher(tmp_path, photos, teacher):
    from vaekit.model import load_vae, save_diffusers

    save_diffusers(load_vae("preset:taesd", overrides={"latent_channels": 8}, seed=0), tmp_path / "stranger")
    save_diffusers(load_vae("preset:tiny", seed=0), tmp_path / "four")  # 4 channels: not comparable
    out = tmp_path / "eval"
    models = [("teacher", teacher), ("copy", teacher), ("stranger", tmp_path / "stranger"), ("four", tmp_path / "four")]
    argv = [arg for label, spec in models for arg in ("--vae", str(spec), "--label", label)]
    assert main(["evaluate", *argv, "--teacher", str(teacher), "--data", str(photos), "--out", str(out),
                 "--resolution", "32", "--limit", "3", "--no-lpips", "--no-rfid", "--no-diffusability",
                 "--quiet"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    models = {m["label"]: m for m in summary["models"]}
    assert summary["teacher"] == "teacher" and models["teacher"]["latent_compatibility"] is None
    copy = models["copy"]["latent_compatibility"]  # the teacher itself: a perfect student
    # Equal up to the float rounding of normalising and de-normalising (a few 8-bit levels flip, if any).
    assert copy["images"] == 3 and copy["decode_psnr_vs_teacher"] > 60 and copy["latent_error"] == 0.0
    assert copy["decode_psnr_vs_image"] == pytest.approx(copy["teacher_psnr_vs_image"], abs=0.01)
    stranger = models["stranger"]["latent_compatibility"]
    assert stranger["latent_error"] > 0.5 and stranger["decode_psnr_vs_teacher"] < 30
    assert models["four"]["latent_compatibility"] is None
    assert any("not measured for four" in w for w in summary["warnings"])
    html = (out / "report.html").read_text()
    assert 'id="compatibility"' in html and "<td>teacher</td>" in html and html.count("<td>student</td>") == 2

    # A --teacher that is none of the models is loaded and added.
    assert main(["evaluate", "--vae", str(tmp_path / "stranger"), "--teacher", str(teacher), "--data", str(photos),
                 "--out", str(tmp_path / "eval2"), "--resolution", "32", "--limit", "2", "--no-lpips", "--no-rfid",
                 "--no-diffusability", "--quiet"]) == 0
    summary = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert [m["label"] for m in summary["models"]] == [str(tmp_path / "stranger"), str(teacher)]
    assert summary["teacher"] == str(teacher)


def test_cached_pairs_cut_pixels_and_latents_at_the_same_place(tmp_path, photos, teacher):
    """A crop smaller than the cached images takes the latents under it; a flip takes the mirrored latents."""
    from vaekit.cache.config import EncodeConfig
    from vaekit.cache.encode import encode_dataset
    from vaekit.cache.dataset import load_latents
    from vaekit.cache.pairs import CachedPairs, collate_pairs
    from vaekit.cache.units import prepare_pixels
    from vaekit.data.decode import decode_image
    from vaekit.data.sources import open_source

    cache = tmp_path / "cache"
    encode_dataset(EncodeConfig(data=str(photos), out=str(cache), vae=str(teacher), resolution=64, flip=True,
                                dtype="fp32", num_workers=0), progress=False)
    source = open_source(str(photos))
    pairs = CachedPairs(cache, source, size=32, flip=True, seed=3)
    flipped = set()
    for index in range(len(source)):
        item = pairs[(index, 1)]
        full, _, _ = prepare_pixels(decode_image(source[index].read_bytes()), {"mode": "resolution", "resolution": 64,
                                    "small_images": "upscale", "min_size": 0})
        pixels = ((item["pixels"] + 1) * 127.5).round().to(torch.uint8)  # (3, 32, 32)
        found = None
        for flip in (False, True):
            image = full.flip(-1) if flip else full
            for top in range(0, 33, 8):
                for left in range(0, 33, 8):
                    if torch.equal(image[:, top:top + 32, left:left + 32], pixels):
                        found = (flip, top, left)
        assert found is not None, index
        flip, top, left = found
        mean, logvar = load_latents(cache, source[index].key, flip=flip)
        window = (slice(None), slice(top // 8, top // 8 + 4), slice(left // 8, left // 8 + 4))
        assert torch.equal(item["mean"], mean[window]) and torch.equal(item["logvar"], logvar[window])
        flipped.add(flip)
    assert flipped == {False, True}  # both variants are drawn
    assert pairs[(0, 1)]["mean"].shape == (8, 4, 4)
    batch = collate_pairs([pairs[(0, 0)], {"error": "broken", "key": "x"}, pairs[(1, 0)]])
    assert batch["pixels"].shape == (2, 3, 32, 32) and batch["mean"].shape == (2, 8, 4, 4)
    assert batch["errors"] == [{"key": "x", "error": "broken"}]


def test_shipped_distillation_configs_build_their_students():
    """Each config builds its student in the teacher's latent space: half SD's widths, or TAESD's architecture."""
    from vaekit.config import load_config
    from vaekit.model import describe, load_vae
    from vaekit.train import TrainConfig, check_config
    from vaekit.train.distill import student_overrides

    teacher = load_vae("preset:tiny", overrides={"latent_channels": 8, "scaling_factor": 0.5}, seed=0)
    for name, family, widths in (("distill_kl_half", "AutoencoderKL", [64, 128, 256, 256]),
                                 ("distill_tiny", "AutoencoderTiny", None)):
        cfg = load_config(TrainConfig, ROOT / "configs" / "train" / f"{name}.yaml", ["distill.teacher=T"])
        check_config(cfg)
        with torch.device("meta"):
            student = load_vae(cfg.model.source, overrides=cfg.model.overrides)
        changes = student_overrides(student, teacher, cfg.model.overrides, cfg.model.source)
        info = describe(load_vae(cfg.model.source, overrides={**cfg.model.overrides, **changes}))
        assert info["class"] == family and info["latent_channels"] == 8
        assert info["scaling_factor"] == (0.5 if family == "AutoencoderKL" else 1.0)
        if widths:
            assert info["block_out_channels"] == widths and info["layers_per_block"] == 2
        assert cfg.distill.latent_weight == 1.0 and cfg.ema.enabled


@pytest.mark.slow  # four processes load torch: 20 s on 2 cores (`make test-slow`)
def test_bench_distill_runs_and_writes_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_distill.py"), "--teacher", "preset:tiny",
                           "--size", "32", "--warmup", "0", "--repeats", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["teacher", "kl-half", "tiny"]
    assert rows["tiny"]["class"] == "AutoencoderTiny" and rows["kl-half"]["class"] == "AutoencoderKL"
    assert rows["teacher"]["speedup"] == 1.0 and all(r["seconds"] > 0 and r["peak_mib"] >= 0 for r in rows.values())
    assert "| tiny | AutoencoderTiny |" in done.stdout and "target >= 10x" in done.stdout
