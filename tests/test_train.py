"""The trainer through its real entry points (`vaekit train`, `accelerate launch`) on the tiny preset at 32 px.

Each known failure of the diffusers community VAE trainer has a test here:
perceptual loss without gradient, generator/discriminator gradient leaks, forward passes that skip
the prepared (DDP) module, trainable weights cast to half precision, and a resume that cannot load.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import imagegen
from conftest import reset_accelerate
from vaekit.train import losses
from vaekit.cli import main
from vaekit.config import load_config

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def random_lpips():
    """LPIPS with its learned heads on a random backbone: gradients and shapes as the real one, no download."""
    import warnings

    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(pretrained=True, pnet_rand=True, net="alex", verbose=False)


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Random-backbone LPIPS for loss and metric; a clean Accelerate state for every in-process run."""
    monkeypatch.setattr("vaekit.pretrained.backbones.load_lpips", lambda net="vgg", path=None, device=None, **kw: random_lpips())
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ten small photo-like PNGs."""
    folder = tmp_path_factory.mktemp("photos")
    imagegen.write_photos(folder, 10, size=(48, 40))
    return folder


def write_config(path, out_dir, data_path, **sections):
    """A tiny-model config: 32 px crops, two held-out images, no tracker, no progress bar."""
    config = {
        "out_dir": str(out_dir),
        "model": {"source": "preset:tiny"},
        "data": {"path": str(data_path), "size": 32, "holdout": 2, "num_workers": 0},
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 100},
        "validation": {"every": 0, "num_images": 2, "final_images": 2, "lpips_net": "alex"},
        "log": {"tracker": "none", "progress": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values) if isinstance(values, dict) else config.update({section: values})
    path.write_text(yaml.safe_dump(config))
    return path


def tensors(path):
    return load_file(str(path))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def initial_tiny_weights(seed=0):
    """The weights `vaekit train` starts from for preset:tiny with train.seed=seed."""
    from accelerate.utils import set_seed

    from vaekit.model import load_vae

    set_seed(seed)
    return {k: v.clone() for k, v in load_vae("preset:tiny").state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Command line, run folder, export


def test_train_writes_run_folder_checkpoint_export_and_metrics(tmp_path, photos):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, photos, log={"tracker": "tensorboard", "progress": True},
                       validation={"every": 1})
    assert main(["train", "--config", str(cfg), "train.steps=2", "optim.lr=1e-3"]) == 0

    from vaekit.train import TrainConfig, load_checkpoint_vae
    from vaekit.model import load_vae

    resolved = load_config(TrainConfig, out / "config.yaml")
    assert resolved.train.steps == 2 and resolved.optim.lr == 1e-3  # overrides land in the saved config
    ckpt = out / "checkpoint-000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "vaekit-train-checkpoint" and meta["step"] == 2 and not meta["interrupted"]
    assert meta["loop"]["images_seen"] == 4 and meta["data"]["global_batch"] == 2
    assert {"vae.safetensors", "optimizer.pt", "rng.pt"} <= {p.name for p in ckpt.iterdir()}
    torch.load(ckpt / "optimizer.pt", weights_only=True)  # plain tensors and dicts only
    torch.load(ckpt / "rng.pt", weights_only=True)
    assert not list(out.glob(".checkpoint-*"))  # no temporary folder left behind

    # The diffusers export holds the trained weights, and `vaekit export`'s loader reads the checkpoint.
    exported = load_vae(out / "vae")
    assert max_diff(exported.state_dict(), tensors(ckpt / "vae.safetensors")) == 0
    assert max_diff(load_vae(ckpt).state_dict(), exported.state_dict()) == 0
    assert max_diff(load_checkpoint_vae(ckpt, "raw").state_dict(), exported.state_dict()) == 0
    assert max_diff(exported.state_dict(), initial_tiny_weights()) > 1e-4  # it trained

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["step"] == 2
    assert all(isinstance(metrics[k], float) for k in ("psnr", "ssim", "lpips", "hf_retention", "train_seconds"))
    assert "latents_unchanged" not in metrics  # trained from scratch: no base to compare with
    # The export's model card: what was trained, from what, on what, and its held-out metrics.
    card = (out / "vae" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "## Training" in card
    assert "| source model | `preset:tiny` |" in card and "| steps | 2 x 2 images |" in card
    assert f"{metrics['psnr']:.2f}" in card and "LPIPS-Alex" in card and "8 training images" in card
    from PIL import Image

    grid = Image.open(out / "reconstructions.png")
    # A captioned row per held-out image: original | reconstruction | error map, 32 px tiles shown 5x (160 px).
    assert grid.size == (6 + 3 * (160 + 6), 34 + 2 * (20 + 160 + 6) + 24)
    assert (out / "samples" / "step-000001.png").is_file()
    assert list(out.rglob("events.out.tfevents.*"))  # TensorBoard, the default tracker
    assert "step 2" in (out / "train.log").read_text()


def test_config_errors_are_one_line_messages(tmp_path, photos, capsys):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", photos)
    assert main(["train", "--config", str(cfg), "loss.bogus=1"]) == 2
    assert "loss.bogus" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "train.steps=0"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_missing_lpips_weights_stop_the_run_unless_the_config_allows_it(tmp_path, photos, monkeypatch, capsys):
    from vaekit.errors import VaekitError

    def no_weights(net="vgg", path=None, device=None, **kw):
        raise VaekitError("No LPIPS weights. Run `vaekit weights fetch lpips-vgg`.")

    monkeypatch.setattr("vaekit.pretrained.backbones.load_lpips", no_weights)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", photos, loss={"perceptual_weight": 0.1},
                       train={"steps": 1})
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "vaekit weights fetch" in err and "loss.perceptual_weight=0" in err
    assert main(["train", "--config", str(cfg), "loss.perceptual_if_missing=skip"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["lpips"] is None


# ------------------------------------------------------------------------------------------------
# Resume, signals


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(tmp_path, photos, monkeypatch):
    """Train to 4; separately train, get SIGTERM at step 2, resume to 4: same weights, EMA, D and optimizer."""
    import vaekit.train.loop

    sections = dict(
        train={"steps": 4, "batch_size": 1, "grad_accum": 2, "checkpoint_every": 3},
        optim={"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 1},
        loss={"perceptual_weight": 0.5, "kl_warmup_steps": 3},
        disc={"weight": 0.5, "start": 1, "n_layers": 1, "base_channels": 8, "r1_weight": 1.0},
        ema={"enabled": True, "decay": 0.9},
    )
    full = tmp_path / "full"
    assert main(["train", "--config", str(write_config(tmp_path / "a.yaml", full, photos, **sections))]) == 0

    calls = {"n": 0}
    real_step = vaekit.train.loop.generator_step

    def step_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # first micro-batch of step 2 (two per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(vaekit.train.loop, "generator_step", step_then_sigterm)
    split = tmp_path / "split"
    cfg = write_config(tmp_path / "b.yaml", split, photos, **sections)
    assert main(["train", "--config", str(cfg)]) == 128 + signal.SIGTERM  # stopped, not finished: exit 143
    assert [p.name for p in split.glob("checkpoint-*")] == ["checkpoint-000002"]
    assert json.loads((split / "checkpoint-000002" / "meta.json").read_text())["interrupted"] is True
    assert not (split / "vae").exists()  # an interrupted run does not export
    monkeypatch.setattr(vaekit.train.loop, "generator_step", real_step)
    assert main(["train", "--config", str(cfg)]) == 2  # a fresh start would mix two runs in one folder

    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    a, b = full / "checkpoint-000004", split / "checkpoint-000004"
    for name in ("vae", "ema", "disc"):
        assert max_diff(tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")) <= 1e-6, name
    opt_a = torch.load(a / "optimizer.pt", weights_only=True)["vae"]["state"]
    opt_b = torch.load(b / "optimizer.pt", weights_only=True)["vae"]["state"]
    assert all(torch.allclose(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"], atol=1e-9) for i in opt_a)
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert meta_a["data"] == meta_b["data"] and meta_a["loop"] == meta_b["loop"]
    assert meta_a["schedulers"] == meta_b["schedulers"]
    # EMA and raw weights differ, and the export holds the EMA.
    from vaekit.model import load_vae

    assert max_diff(tensors(b / "ema.safetensors"), tensors(b / "vae.safetensors")) > 0
    assert max_diff(load_vae(split / "vae").state_dict(), tensors(b / "ema.safetensors")) == 0
    # Old checkpoints are pruned to keep_last.
    assert main(["train", "--config", str(cfg), "train.steps=6", "train.checkpoint_every=1", "train.keep_last=2",
                 "--resume", "latest"]) == 0
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-000005", "checkpoint-000006"]


def test_sigterm_to_the_process_group_with_loader_workers_still_checkpoints(tmp_path, photos):
    """As a scheduler or `timeout` does: SIGTERM reaches the DataLoader workers too; the run still saves."""
    import time

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, photos, data={"num_workers": 1},
                       train={"steps": 10000, "checkpoint_every": 10000}, log={"every": 1, "progress": False})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vaekit.cli", "train", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and "step 1 " not in ((out / "train.log").read_text()
                                                           if (out / "train.log").exists() else ""):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and "Continue with --resume latest" in output
    assert json.loads((checkpoints[0] / "meta.json").read_text())["interrupted"] is True


def test_shipped_configs_load_and_pass_checks():
    from vaekit.train import TrainConfig, check_config

    names = sorted(p.stem for p in (ROOT / "configs" / "train").glob("*.yaml"))
    assert {"demo", "demo_finetune", "kl_f8c4_256", "kl_f8c16_256", "ft_decoder_mse", "ft_decoder_l1_lpips", "ft_eq",
            "kl_f16c32_va"} <= set(names)
    for name in names:
        config = load_config(TrainConfig, ROOT / "configs" / "train" / f"{name}.yaml")
        check_config(config)
        # latent-diffusion's kl_weight 1e-6 on summed losses, converted: 1e-6 * C / (3 * 8^2).
        if name.startswith("kl_f8c"):
            channels = int(name.split("c")[1].split("_")[0])
            assert config.loss.kl_weight == pytest.approx(1e-6 * channels / 192, rel=1e-3)
        if name == "demo":  # the same conversion at the demo's latent width
            channels = config.model.overrides["latent_channels"]
            assert config.loss.kl_weight == pytest.approx(1e-6 * channels / 192, rel=1e-3)
        if name.startswith("ft_decoder") or name == "demo_finetune":
            assert config.model.mode == "decoder" and config.ema.enabled
    # The regularised recipes: the papers' settings (docs/training.md), and nothing else switched on.
    eq = load_config(TrainConfig, ROOT / "configs" / "train" / "ft_eq.yaml").loss
    assert (eq.equivariance_prob, eq.equivariance_min_scale, eq.scale_equivariance_weight, eq.align_weight) == \
        (0.5, 0.25, 0.0, 0.0)
    va = load_config(TrainConfig, ROOT / "configs" / "train" / "kl_f16c32_va.yaml")
    assert (va.loss.align_weight, va.loss.align_margin_cos, va.loss.align_margin_distance) == (0.1, 0.5, 0.25)
    assert va.loss.equivariance_prob == 0 and va.model.source == "preset:f16c32"
    assert va.loss.kl_weight == pytest.approx(1e-6 * 32 / (3 * 16**2), rel=1e-3)


@pytest.mark.parametrize("quant_conv", [True, False])
def test_init_logvar_starts_a_fresh_preset_with_quiet_posterior_noise(quant_conv):
    from vaekit.config import from_dict
    from vaekit.train import TrainConfig
    from vaekit.train.loop import build_vae

    overrides = {"use_quant_conv": quant_conv}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    logvar = {}
    for init in (None, -6.0):
        cfg = from_dict(TrainConfig, {"model": {"overrides": overrides, "init_logvar": init}})
        vae = build_vae(cfg)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
        logvar[init] = posterior.logvar
        if init is None:
            mean = posterior.mean
        else:  # only the log-variance moved: the same seed gives the same means
            assert torch.equal(posterior.mean, mean)
    assert logvar[None].mean().abs() < 1.5
    assert (logvar[-6.0].mean() + 6).abs() < 1.5 and logvar[-6.0].max() < -3


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(native, monkeypatch, caplog, tmp_path):
    from vaekit.train import TrainConfig, loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    config = load_config(TrainConfig, overrides=["train.mixed_precision=bf16", f"out_dir={tmp_path}",
                                                 "log.tracker=none"])
    with caplog.at_level("WARNING", logger=loop.log.name):
        accelerator = loop.start_run(config)
    assert accelerator.mixed_precision == "bf16"
    assert ("emulated" in caplog.text) is (not native)


def test_init_logvar_leaves_a_model_with_weights_unchanged(tmp_path):
    from vaekit.config import from_dict
    from vaekit.model import save_diffusers
    from vaekit.train import TrainConfig
    from vaekit.train.loop import build_vae

    saved = build_vae(from_dict(TrainConfig, {}))
    save_diffusers(saved, tmp_path / "vae")
    loaded = build_vae(from_dict(TrainConfig, {"model": {"source": str(tmp_path / "vae"), "init_logvar": -6.0}}))
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))


def test_every_demo_recipe_candidate_is_a_valid_config():
    """scripts/demo_recipes.py trains each candidate as overrides of demo.yaml: each must load and pass the checks."""
    import importlib.util

    from vaekit.train import TrainConfig, check_config

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("demo_recipes", ROOT / "scripts" / "demo_recipes.py")
        recipes = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(recipes)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert "shipped" in recipes.CANDIDATES and recipes.CANDIDATES["shipped"][1] == []
    shipped = load_config(TrainConfig, ROOT / "configs" / "train" / "demo.yaml")
    for name, (_, overrides) in recipes.CANDIDATES.items():
        config = load_config(TrainConfig, ROOT / "configs" / "train" / "demo.yaml", overrides)
        check_config(config)
        assert config.data.holdout == 2 and config.validation.size == 256, name  # scored as `make demo` is
        # ... on the same photos: data.seed also chooses the held-out photos
        assert (config.data.path, config.data.seed) == (shipped.data.path, shipped.data.seed), name


# ------------------------------------------------------------------------------------------------
# Decoder fine-tuning


def test_decoder_mode_keeps_the_latent_space_bit_identical(tmp_path, photos):
    from vaekit.model import load_vae, save_diffusers

    start = tmp_path / "start"
    torch.manual_seed(3)
    save_diffusers(load_vae("preset:tiny"), start)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", photos, model={"source": str(start), "mode": "decoder"},
                       optim={"lr": 1e-3}, train={"steps": 3})
    assert main(["train", "--config", str(cfg)]) == 0
    before, after = load_vae(start), load_vae(tmp_path / "run" / "vae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d0, d1 = before.encode(x).latent_dist, after.encode(x).latent_dist
    assert torch.equal(d0.mean, d1.mean) and torch.equal(d0.logvar, d1.logvar)
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)

    # The run checks it too, and shows the base it started from beside the fine-tune.
    from PIL import Image

    from vaekit.model import encoder_fingerprint

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["latents_unchanged"] is True and metrics["encoder_fingerprint"] == encoder_fingerprint(before)
    assert set(metrics["base"]) >= {"psnr", "ssim", "lpips", "hf_retention"} and metrics["base"]["psnr"] != metrics["psnr"]
    with Image.open(tmp_path / "run" / "reconstructions.png") as grid:  # original | base | fine-tuned | 2 error maps
        assert grid.width == 6 + 5 * (160 + 6)
    card = (tmp_path / "run" / "vae" / "README.md").read_text()
    assert "decoder fine-tune" in card and "bit-identical" in card and "the base, before fine-tuning" in card
    assert encoder_fingerprint(load_vae(tmp_path / "run" / "vae")) == encoder_fingerprint(before)


# ------------------------------------------------------------------------------------------------
# Gradient separation and precision (the functions train() calls for each micro-step)


def make_parts(mixed_precision="no", disc=True):
    """An Accelerator, the prepared tiny VAE wrapper and optimizer, and a small discriminator."""
    from accelerate import Accelerator

    from vaekit.train.discriminator import DiscriminatorConfig, PatchDiscriminator
    from vaekit.model import load_vae
    from vaekit.train import AutoencoderForTraining

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    torch.manual_seed(0)
    vae = load_vae("preset:tiny")
    model = AutoencoderForTraining(vae)
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    d = PatchDiscriminator(DiscriminatorConfig(n_layers=1, base_channels=8)) if disc else None
    return accelerator, model, vae, d


def step_kwargs(**loss):
    from vaekit.train import DiscConfig, LossConfig

    return dict(loss_cfg=LossConfig(**loss), disc_cfg=DiscConfig(weight=0.5, r1_weight=1.0), kl_weight=1e-3)


def grads(module):
    return [p.grad for p in module.parameters()]


def test_generator_step_leaves_discriminator_gradients_untouched():
    from vaekit.train import generator_step

    accelerator, model, vae, disc = make_parts()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, recon, logs = generator_step(accelerator, model, x, disc=disc, last_layer=vae.decoder.conv_out.weight,
                                 **step_kwargs())
    assert "g" in logs and logs["g_weight"] > 0  # the adversarial term was part of the loss
    assert all(g is None for g in grads(disc))
    assert all(p.requires_grad for p in disc.parameters())  # frozen only during the step
    assert all(g is not None and torch.isfinite(g).all() for g in grads(vae))
    assert not recon.requires_grad


def test_discriminator_step_leaves_vae_gradients_untouched():
    from vaekit.train import discriminator_step

    accelerator, model, vae, disc = make_parts()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon = model(x).recon  # a reconstruction still attached to the VAE's graph
    logs = discriminator_step(accelerator, disc, x, recon, disc_cfg=step_kwargs()["disc_cfg"])
    assert "r1" in logs and logs["r1"] > 0
    assert all(g is None for g in grads(vae))
    assert all(g is not None for g in grads(disc))


def test_perceptual_term_changes_the_vae_gradient():
    from vaekit.train import generator_step

    accelerator, model, vae, _ = make_parts(disc=False)
    perceptual = losses.PerceptualLoss(model=random_lpips())
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def decoder_grad(weight):
        vae.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(0)
        generator_step(accelerator, model, x, perceptual=perceptual, generator=g, **step_kwargs(perceptual_weight=weight))
        return vae.decoder.conv_out.weight.grad.clone()

    assert not torch.allclose(decoder_grad(0.0), decoder_grad(1.0))


def test_trainable_weights_stay_fp32_under_bf16_autocast(tmp_path, photos):
    from vaekit.train import generator_step

    accelerator, model, vae, disc = make_parts(mixed_precision="bf16")
    seen = {}
    vae.decoder.conv_out.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    generator_step(accelerator, model, torch.rand(2, 3, 32, 32) * 2 - 1, disc=disc,
                   last_layer=vae.decoder.conv_out.weight, **step_kwargs())
    assert seen["dtype"] == torch.bfloat16  # the forward really ran under autocast
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in vae.parameters())


def test_bf16_run_saves_fp32_weights(tmp_path, photos):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "run", photos, train={"mixed_precision": "bf16", "steps": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    saved = tensors(tmp_path / "run" / "checkpoint-000001" / "vae.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------
# Robustness: bad images, non-finite steps


def test_corrupt_images_are_skipped_counted_and_listed(tmp_path):
    folder = tmp_path / "data"
    imagegen.write_photos(folder, 6, size=(48, 40))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, folder, data={"holdout": 0}, train={"steps": 4, "batch_size": 2})
    assert main(["train", "--config", str(cfg)]) == 0  # one epoch: all 8 files are visited
    listed = (out / "skipped_images.txt").read_text()
    assert "broken.png" in listed and "empty.jpg" in listed
    meta = json.loads((out / "checkpoint-000004" / "meta.json").read_text())
    assert len(meta["skipped_images"]) == 2 and meta["loop"]["images_seen"] == 6


def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(tmp_path, photos, monkeypatch, capsys):
    real = losses.reconstruction_loss
    calls = {"n": 0}

    def nan_first(x, y, kind="l1"):
        calls["n"] += 1
        return real(x, y, kind) * (float("nan") if calls["n"] == 1 else 1.0)

    monkeypatch.setattr(losses, "reconstruction_loss", nan_first)
    out = tmp_path / "recover"
    cfg = write_config(tmp_path / "c.yaml", out, photos, train={"steps": 3, "max_nonfinite_in_row": 2},
                       ema={"enabled": True})
    assert main(["train", "--config", str(cfg)]) == 0
    loop = json.loads((out / "checkpoint-000003" / "meta.json").read_text())["loop"]
    assert loop["nonfinite_skips"] == 1 and loop["nonfinite_in_row"] == 0

    monkeypatch.setattr(losses, "reconstruction_loss", lambda x, y, kind="l1": real(x, y, kind) * float("nan"))
    out = tmp_path / "stop"
    assert main(["train", "--config", str(cfg), f"out_dir={out}", "train.steps=10"]) == 2
    assert "non-finite" in capsys.readouterr().err
    ckpt = out / "checkpoint-000002"
    assert json.loads((ckpt / "meta.json").read_text())["loop"]["nonfinite_skips"] == 2
    assert max_diff(tensors(ckpt / "vae.safetensors"), initial_tiny_weights()) == 0  # no update applied
    assert max_diff(tensors(ckpt / "ema.safetensors"), initial_tiny_weights()) == 0


# ------------------------------------------------------------------------------------------------
# Data order and distributed training


def test_step_batches_do_not_depend_on_how_the_global_batch_is_split():
    from vaekit.train import StepBatchSampler

    def steps(world, accum, batch, start=0, count=6):
        """The set of (index, epoch) items of each step, across processes and micro-batches."""
        iters = [iter(StepBatchSampler(10, batch, accum, world, r, seed=1, start_step=start)) for r in range(world)]
        out = []
        for _ in range(count):
            items = [i for _ in range(accum) for it in iters for i in next(it)]
            out.append(sorted(items))
        return out

    a = steps(world=1, accum=1, batch=4)
    assert a == steps(world=2, accum=1, batch=2) == steps(world=2, accum=2, batch=1) == steps(world=1, accum=4, batch=1)
    assert steps(1, 1, 4, start=1, count=5) == a[1:]  # resuming mid-epoch continues the same order
    assert all(len(set(s)) == 4 for s in a)  # no image twice within a step
    assert {e for s in a for _, e in s} == {0, 1, 2}  # 2 steps per epoch of 10 images, epoch travels along
    assert [i for i, _ in a[0]] != [i for i, _ in a[2]]  # reshuffled each epoch
    tiny = StepBatchSampler(3, 4, 1, 1, 0, seed=0)  # data set smaller than one batch: repeated
    assert len(next(iter(tiny))) == 4 and tiny.steps_per_epoch == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_processes(cfg, cwd):
    """`vaekit train --config cfg` as 2 CPU processes (gloo) under `accelerate launch`; fails the test if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "vaekit.cli", "train", "--config", str(cfg)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_process_run_keeps_replicas_identical_and_matches_the_recipe(tmp_path, photos):
    """2 CPU processes (gloo) x 1 image x 2 accumulation == 1 process x 1 image x 4 accumulation.

    The replicas only agree, and only match the single process, if every forward went through the
    DDP-prepared modules (so gradients were averaged) and each process took its own slice of the step.
    """
    sections = dict(
        train={"steps": 3, "batch_size": 1, "grad_accum": 2, "checkpoint_every": 3},
        # A larger Adam eps keeps near-zero gradients (summed in a different order by the all-reduce)
        # from being amplified into full-size updates, so the comparison can be tight.
        optim={"lr": 1e-3, "eps": 1e-3},
        disc={"weight": 0.5, "start": 1, "n_layers": 1, "base_channels": 8, "norm": "none", "r1_weight": 1.0},
        ema={"enabled": True},
    )
    dist, single = tmp_path / "dist", tmp_path / "single"
    cfg = write_config(tmp_path / "c.yaml", dist, photos, **sections)
    train_two_processes(cfg, tmp_path)
    meta = json.loads((dist / "checkpoint-000003" / "meta.json").read_text())
    assert meta["data"]["processes"] == 2 and meta["data"]["global_batch"] == 4
    assert meta["loop"]["images_seen"] == 3 * 1 * 2 * 2  # steps x batch x processes x accumulation
    fingerprints = meta["replica_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]

    assert main(["train", "--config", str(cfg), f"out_dir={single}", "train.grad_accum=4"]) == 0
    a, b = dist / "checkpoint-000003", single / "checkpoint-000003"
    assert json.loads((b / "meta.json").read_text())["loop"]["images_seen"] == 12
    for name in ("vae", "ema", "disc"):
        assert max_diff(tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")) < 1e-5, name
    assert max_diff(tensors(a / "vae.safetensors"), initial_tiny_weights()) > 1e-3  # far above the tolerance


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped without one): fp16 with the GradScaler, bf16, resume of the scaler state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_cuda_trains_with_fp32_weights_and_resumes(tmp_path, photos, precision):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", out, photos, train={"mixed_precision": precision, "steps": 4,
                                                                "checkpoint_every": 2},
                       disc={"weight": 0.5, "start": 1, "n_layers": 1, "base_channels": 8}, ema={"enabled": True})
    assert main(["train", "--config", str(cfg), "train.steps=2"]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    meta = json.loads((out / "checkpoint-000004" / "meta.json").read_text())
    assert (meta["scaler"] is not None) == (precision == "fp16")
    saved = tensors(out / "checkpoint-000004" / "vae.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert meta["loop"]["nonfinite_in_row"] == 0


# ------------------------------------------------------------------------------------------------
# Diffusability regularisers (EQ-VAE, scale equivariance, VA-VAE alignment) through the real trainer


def regularized(tiny_dinov2, **loss):
    """Config sections with all three regularisers on; EQ-VAE on every micro-batch so each step uses it."""
    return dict(
        train={"steps": 4, "batch_size": 1, "grad_accum": 2, "checkpoint_every": 2},
        optim={"lr": 1e-3, "eps": 1e-3},
        loss={"equivariance_prob": 0.5, "scale_equivariance_weight": 0.5, "align_weight": 0.1,
              "align_model": str(tiny_dinov2), **loss},
        disc={"weight": 0.5, "start": 1, "n_layers": 1, "base_channels": 8, "norm": "none"},
        ema={"enabled": True},
        data={"size": 64},
    )


def test_regularised_run_resumes_to_bit_identical_weights(tmp_path, photos, tiny_dinov2):
    """Train to 4; train to 2 and resume to 4: the same VAE, EMA, discriminator and alignment projection, bit for bit.

    The transforms derive from (seed, step, slot), and the projection and its optimizer state are in the checkpoint.
    """
    sections = regularized(tiny_dinov2)
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", str(write_config(tmp_path / "a.yaml", full, photos, **sections))]) == 0
    cfg = write_config(tmp_path / "b.yaml", split, photos, **sections)
    assert main(["train", "--config", str(cfg), "train.steps=2"]) == 0
    assert main(["train", "--config", str(cfg), "--resume", "latest"]) == 0
    a, b = full / "checkpoint-000004", split / "checkpoint-000004"
    for name in ("vae", "ema", "disc", "align"):
        assert max_diff(tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")) == 0, name
    projection = tensors(a / "align.safetensors")["weight"]
    assert projection.shape == (16, 4, 1, 1)  # latent channels -> the feature model's 16 dimensions
    assert max_diff(tensors(a / "align.safetensors"), tensors(full / "checkpoint-000002" / "align.safetensors")) > 0
    from vaekit.model import load_vae

    assert set(load_vae(full / "vae").state_dict()) == set(initial_tiny_weights())  # the export is a plain VAE
    log = (full / "train.log").read_text()
    assert "align_cos" in log and "se " in log and "eq " in log  # the terms are logged


@pytest.mark.slow
def test_regularised_two_process_run_matches_one_process(tmp_path, photos, tiny_dinov2):
    """2 CPU processes (gloo) x 1 image x 2 accumulation == 1 process x 1 image x 4, with every regulariser on.

    Each slot draws its own transform from (seed, step, slot) wherever it runs; the projection trains through
    the DDP-prepared module, so both replicas stay identical and equal the single process.
    """
    sections = regularized(tiny_dinov2)
    sections["train"] = {"steps": 3, "batch_size": 1, "grad_accum": 2, "checkpoint_every": 3}
    dist, single = tmp_path / "dist", tmp_path / "single"
    cfg = write_config(tmp_path / "c.yaml", dist, photos, **sections)
    train_two_processes(cfg, tmp_path)
    meta = json.loads((dist / "checkpoint-000003" / "meta.json").read_text())
    assert meta["data"]["processes"] == 2
    fingerprints = meta["replica_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]

    assert main(["train", "--config", str(cfg), f"out_dir={single}", "train.grad_accum=4"]) == 0
    a, b = dist / "checkpoint-000003", single / "checkpoint-000003"
    for name in ("vae", "ema", "disc", "align"):
        assert max_diff(tensors(a / f"{name}.safetensors"), tensors(b / f"{name}.safetensors")) < 1e-5, name
    assert max_diff(tensors(a / "vae.safetensors"), initial_tiny_weights()) > 1e-3  # far above the tolerance
