"""Hostile inputs and faults: special files, undecodable names, crafted model files, full or read-only disks,
odd config values, interrupted runs. Each class of defect has a test with real files and real faults."""

import contextlib
import json
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from imagegen import make_photo, write_photos
from vaekit.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
ODD_NAME = os.fsdecode(b"caf\xe9.png")  # a file name that is not valid UTF-8
ODD_KEY = "caf\\xe9.png"  # how vaekit writes it in lists, cache indices, CSV and HTML


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture
def hostile_folder(tmp_path):
    """Six good photos among a FIFO, symlink loops, a broken link, a folder named like an image, a non-UTF-8 name."""
    folder = tmp_path / "images"
    write_photos(folder, 5, size=(48, 40))
    make_photo(48, 40, seed=9).save(folder / ODD_NAME)
    os.mkfifo(folder / "pipe.png")  # reading it would block forever
    os.symlink("loop.png", folder / "loop.png")  # a link to itself
    os.symlink(".", folder / "again")  # a folder loop
    os.symlink("nowhere.jpg", folder / "gone.jpg")
    (folder / "folder.png").mkdir()  # a folder named like an image is a folder: searched, not read
    return folder


EXPECTED_SKIPS = {"pipe.png": "not a regular file (fifo)", "loop.png": "symlink loop", "gone.jpg": "broken symlink"}


def run(args, timeout=240):
    """vaekit in a subprocess, so that a hang fails the test instead of blocking the suite."""
    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------------------
# Image folders: special files and names that are not UTF-8


def test_special_files_never_block_and_are_listed_with_their_reason(hostile_folder, tmp_path):
    from vaekit.data.sources import open_source

    source = open_source(str(hostile_folder))
    assert len(source) == 6 and ODD_KEY in source.keys()
    assert {s["key"]: s["reason"] for s in source.skipped} == EXPECTED_SKIPS
    assert source[source.keys().index(ODD_KEY)].decode().size == (48, 40)  # the undecodable name still reads

    cache = tmp_path / "cache"
    done = run(["encode", "--vae", "preset:tiny", "--data", hostile_folder, "--out", cache, "--resolution", 32,
                "--num_workers", 1, "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]
    errors = {e["key"]: e["reason"] for e in map(json.loads, (cache / "errors.jsonl").read_text().splitlines())}
    assert errors == EXPECTED_SKIPS
    from vaekit.cache.dataset import LatentDataset

    assert ODD_KEY in LatentDataset(cache).keys and len(LatentDataset(cache)) == 6


def test_training_on_a_hostile_folder_finishes_and_lists_what_it_skipped(hostile_folder, tmp_path):
    out = tmp_path / "run"
    done = run(["train", f"out_dir={out}", f"data.path={hostile_folder}", "data.size=32", "data.num_workers=1",
                "data.holdout=2", "train.steps=2", "train.batch_size=2", "log.tracker=none", "log.progress=false",
                "validation.every=0"])
    assert done.returncode == 0, done.stderr[-2000:]
    listed = (out / "skipped_images.txt").read_text()
    for key, reason in EXPECTED_SKIPS.items():
        assert f"{key}: {reason}" in listed
    assert (out / "vae" / "config.json").is_file()


def test_evaluate_and_inspect_write_every_file_with_an_undecodable_name(hostile_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--vae", "preset:tiny", "--data", str(hostile_folder), "--out", str(out),
                 "--resolution", "32", "--no-lpips", "--no-rfid", "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["images"] == 6
    assert {s["key"]: s["reason"] for s in metrics["data"]["skipped"]} == EXPECTED_SKIPS
    assert ODD_KEY in (out / "per_image.csv").read_text(encoding="utf-8")
    assert (out / "report.html").read_bytes().decode("utf-8")  # valid UTF-8, written after everything else
    capsys.readouterr()
    assert main(["inspect", "--vae", "preset:tiny", "--data", str(hostile_folder), "--size", "32", "--quiet",
                 "--out", str(tmp_path / "inspect")]) == 0
    result = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert result["images"] == 6 and {s["key"] for s in result["skipped"]} == set(EXPECTED_SKIPS)


def test_reconstruct_writes_the_good_images_and_lists_the_bad(hostile_folder, tmp_path, capsys):
    images = [hostile_folder / "photo_000.png", hostile_folder / "pipe.png", tmp_path / "missing.png",
              hostile_folder / ODD_NAME]
    out = tmp_path / "recon"
    assert main(["reconstruct", "--vae", "preset:tiny", *map(str, images), "--out", str(out), "--tile", "off"]) == 1
    printed = capsys.readouterr().out
    assert (out / "photo_000.png").is_file() and (out / f"{Path(ODD_NAME).stem}.png").exists()
    assert "pipe.png" in printed and "not a regular file" in printed and "missing.png" in printed
    assert "2 of 4 image(s) could not be read" in printed


# ---------------------------------------------------------------------------------------------------
# Model files are untrusted input

CRAFTED = {
    "latent_channels": 3_000_000,
    "block_out_channels": [1_000_000_000],
    "layers_per_block": 1_000_000,
    "norm_num_groups": 0,
    "in_channels": -3,
    "out_channels": [3],
    "act_fn": "rm -rf",
    "mid_block_add_attention": "yes",
    "scaling_factor": math.nan,
    "sample_size": 10**12,
    "latents_std": [1.0, 0.0, 1.0, 1.0],
}

PROBE = """
import json, resource, sys
from vaekit.errors import VaekitError
from vaekit.model.load import load_vae
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[2:]:
    try:
        load_vae(path)
        print(json.dumps({"path": path, "loaded": True}))
    except VaekitError as e:
        print(json.dumps({"path": path, "error": str(e)}))
    except BaseException as e:
        print(json.dumps({"path": path, "crash": f"{type(e).__name__}: {e}"[:300]}))
"""


def test_crafted_model_configs_are_refused_naming_the_field_without_allocating(tmp_path):
    from vaekit.model.architecture import build_preset
    from vaekit.model.load import save_diffusers
    from vaekit.model.single_file import METADATA_KEY, save_single_file

    good = save_single_file(build_preset("tiny"), tmp_path / "good.safetensors")
    tensors = load_file(str(good))
    config = json.loads(open_metadata(good)[METADATA_KEY])
    files = {}
    for field, value in CRAFTED.items():
        files[field] = tmp_path / f"{field}.safetensors"
        save_file(tensors, str(files[field]), metadata={METADATA_KEY: json.dumps({**config, field: value})})
    files["invalid JSON"] = tmp_path / "json.safetensors"
    save_file(tensors, str(files["invalid JSON"]), metadata={METADATA_KEY: "{not json"})
    files["a list"] = tmp_path / "list.safetensors"
    save_file(tensors, str(files["a list"]), metadata={METADATA_KEY: "[1, 2]"})
    files["does not fit"] = tmp_path / "fit.safetensors"  # a sane config that the tensors contradict
    save_file(tensors, str(files["does not fit"]), metadata={METADATA_KEY: json.dumps({**config, "latent_channels": 8})})
    folder = save_diffusers(build_preset("tiny"), tmp_path / "folder")
    folder_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**folder_config, "layers_per_block": 10**6}))
    files["config.json"] = folder
    # The same through a repository in the local hub cache, as `owner/name` model arguments load offline.
    snapshot = tmp_path / "hub" / "models--owner--crafted" / "snapshots" / "0123456789abcdef"
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    (snapshot / "config.json").write_text(json.dumps({**folder_config, "latent_channels": 3_000_000}))
    files["hub config.json"] = "owner/crafted"

    # The address space the probe needs to import torch and load a tiny model, plus 1 GiB: the crafted
    # architectures would need 13.8 GB to 3.7 TB, or hang in Python with memory growing.
    baseline = subprocess.run([sys.executable, "-c", "import resource, vaekit.model.load, torch;"
                               "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])"],
                              env=ENV, capture_output=True, text=True, timeout=120)
    limit = int(baseline.stdout.strip()) * 1024 + (1 << 30)
    hub_env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(limit), str(good), *map(str, files.values())],
                          env=hub_env, capture_output=True, text=True, timeout=120)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(files) + 1, done.stderr[-2000:]
    assert results[0] == {"path": str(good), "loaded": True}
    for (case, _), result in zip(files.items(), results[1:]):
        assert "error" in result, (case, result)
        expected = {"invalid JSON": "not valid JSON", "a list": "must be a JSON mapping",
                    "does not fit": "does not fit this architecture", "config.json": "layers_per_block",
                    "hub config.json": "latent_channels"}.get(case, case)
        assert expected in result["error"], (case, result["error"])


def open_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_bad_overrides_of_a_preset_name_the_field(capsys):
    assert main(["info", "preset:tiny", "-o", "latent_channels=0"]) == 2
    assert "latent_channels" in capsys.readouterr().err
    assert main(["info", "preset:tiny", "-o", "scaling_factor=.nan"]) == 2
    assert "scaling_factor" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Run folders under faults: temporaries, permissions, full and read-only disks, two-process resume


def tiny_run(out, data, *extra):
    return ["train", f"out_dir={out}", f"data.path={data}", "data.size=32", "data.num_workers=0", "data.holdout=2",
            "train.steps=2", "train.batch_size=2", "log.tracker=none", "log.progress=false", "validation.every=0",
            "validation.size=64", *extra]


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder):
    """{relative path: permission bits} of everything under a folder."""
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_outputs_honour_the_umask_and_resume_removes_interrupted_writes(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 6, size=(48, 40))
    shared, private = tmp_path / "shared", tmp_path / "private"
    with umask(0o022):
        assert main(tiny_run(shared, photos)) == 0
        assert main(["export", str(shared / "checkpoint-000002"), "--out", str(tmp_path / "x"), "--format",
                     "single-file"]) == 0
    for folder in (shared, tmp_path / "x"):
        for name, mode in modes(folder).items():
            assert mode == (0o755 if (folder / name).is_dir() else 0o644), (name, oct(mode))
    with umask(0o077):
        assert main(tiny_run(private, photos)) == 0
    assert all(mode & 0o077 == 0 for mode in modes(private).values())

    # What kills during checkpointing and exporting leave: a whole partial checkpoint copy (named as
    # releases before this one did, and as now), a partial export and a temporary file.
    legacy = shared / ".checkpoint-000004.ab12cd34"
    legacy.mkdir()
    (legacy / "vae.safetensors").write_bytes(os.urandom(1 << 20))
    (shared / ".checkpoint-000004.x9y8z7w6.tmp").mkdir()
    (shared / ".vae.k3j4h5g6.tmp").mkdir()
    (shared / ".config.yaml.qwertyui.tmp").write_text("partial")
    with umask(0o022):
        assert main(tiny_run(shared, photos, "train.steps=3", "--resume", "latest")) == 0
    assert sorted(p.name for p in shared.iterdir() if p.name.startswith(".")) == []
    assert (shared / "checkpoint-000003" / "meta.json").is_file()


def mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root")
def test_full_and_read_only_disks_give_one_message_and_resume_once_fixed(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 6, size=(48, 40))
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=3m")  # the tiny model's first checkpoint needs about 20 MB
    try:
        done = run(tiny_run(disk / "run", photos, "train.checkpoint_every=1"))
        assert done.returncode == 2, done.stderr[-2000:]
        lines = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and "no space left on the device" in lines[0] and "Traceback" not in done.stderr
        assert not list((disk / "run").glob("checkpoint-*")) and not list((disk / "run").glob(".*"))
        subprocess.run(["mount", "-o", "remount,size=200m", str(disk)], check=True)
        done = run(tiny_run(disk / "run", photos, "--resume", "latest"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert (disk / "run" / "vae" / "config.json").is_file()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        done = run(["export", "preset:tiny", "--out", disk / "export"])
        assert done.returncode == 2 and "read-only" in done.stderr and "Traceback" not in done.stderr
        done = run(tiny_run(disk / "other", photos))
        assert done.returncode == 2 and "read-only" in done.stderr and "Traceback" not in done.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_torchrun_run_resumes_on_the_cpu(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 8, size=(48, 40))
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "vaekit.cli"]
    args = tiny_run(out, photos, "train.batch_size=1", "train.checkpoint_every=2", "disc.weight=0.5",
                    "disc.n_layers=1", "disc.base_channels=8", "disc.norm=none", "ema.enabled=true")
    done = subprocess.run(torchrun + args, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    torchrun[torchrun.index("--master_port") + 1] = str(free_port())
    done = subprocess.run(torchrun + args + ["train.steps=4", "--resume", "latest"], env=ENV, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "checkpoint-000004" / "meta.json").read_text())
    assert meta["data"]["processes"] == 2 and len(set(meta["replica_fingerprints"])) == 1


# ---------------------------------------------------------------------------------------------------
# Config values


def test_yaml_booleans_take_the_meaning_of_the_field(tmp_path):
    from vaekit.config import load_config
    from vaekit.train.config import TrainConfig

    config = load_config(TrainConfig, None, ["train.mixed_precision=no", "log.project=no", "model.overrides.latent_channels=16"])
    assert (config.train.mixed_precision, config.log.project, config.model.overrides) == ("no", "no", {"latent_channels": 16})
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nlog:\n  progress: no\n")
    config = load_config(TrainConfig, path)
    assert config.train.mixed_precision == "no" and config.log.progress is False


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("optim.betas=[2,-1]", "optim.betas"), ("loss.kl_weight=.nan", "loss.kl_weight"),
    ("disc.lr=.inf", "disc.lr"), ("ema.decay=1.5", "ema.decay"), ("optim.scheduler=cosine_annealing", "optim.scheduler"),
    ("train.keep_last=-1", "train.keep_last"),
])
def test_out_of_range_values_are_refused_before_the_run(tmp_path, override, key, capsys):
    assert main(["train", f"out_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_run_whose_steps_were_nearly_all_skipped_stops_without_exporting(tmp_path, monkeypatch, capsys):
    from vaekit.train import losses

    photos = tmp_path / "photos"
    write_photos(photos, 6, size=(48, 40))
    real = losses.reconstruction_loss
    monkeypatch.setattr(losses, "reconstruction_loss", lambda x, y, kind="l1": real(x, y, kind) * float("nan"))
    out = tmp_path / "run"
    assert main(tiny_run(out, photos, "train.steps=3", "train.max_nonfinite_in_row=100")) == 2
    assert "3 of the 3 steps" in capsys.readouterr().err and not (out / "vae").exists()


def test_resuming_with_fewer_steps_refuses_to_squeeze_the_schedule(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_photos(photos, 6, size=(48, 40))
    out = tmp_path / "run"
    assert main(tiny_run(out, photos, "train.steps=4", "train.checkpoint_every=2", "optim.scheduler=cosine")) == 0
    capsys.readouterr()
    shutil.rmtree(out / "checkpoint-000004")  # resume from step 2 of the 4 planned
    assert main(tiny_run(out, photos, "train.steps=3", "optim.scheduler=cosine", "--resume", "latest")) == 2
    err = capsys.readouterr().err
    assert "planned for 4 steps" in err and "train.steps=4" in err and "model.source=" in err
    assert main(tiny_run(out, photos, "train.steps=4", "optim.scheduler=cosine", "--resume", "latest")) == 0


# ---------------------------------------------------------------------------------------------------
# What a user sees


def test_evaluate_says_what_it_is_doing(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_photos(photos, 3, size=(48, 40))
    assert main(["evaluate", "--vae", "preset:tiny", "--data", str(photos), "--out", str(tmp_path / "e"),
                 "--resolution", "32", "--no-rfid", "--no-lpips"]) == 0
    err = capsys.readouterr().err
    for stage in ("evaluate: loading 1 model(s)", "evaluate: reconstructing and scoring 3 images",
                  "evaluate: rendering the comparison"):
        assert stage in err


def test_the_readme_single_file_snippet_loads_offline(tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "from_single_file" in block)
    assert main(["export", "preset:flux", "-o", "block_out_channels=[32,32,64,64]", "-o", "layers_per_block=1",
                 "--format", "single-file", "--out", str(tmp_path / "my-vae")]) == 0
    check = snippet + "\nassert vae.config.latent_channels == 16 and vae.config.shift_factor == 0.1159\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", check], env={**ENV, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_the_run_folder_is_documented_and_its_grid_is_worth_looking_at(tmp_path):
    photos = tmp_path / "photos"
    write_photos(photos, 6, size=(80, 72))
    out = tmp_path / "run"
    assert main(tiny_run(out, photos, "log.tracker=tensorboard", "validation.every=1", "data.num_workers=0",
                         "train.checkpoint_every=1", "train.keep_last=1")) == 0
    docs = (ROOT / "docs" / "training.md").read_text()
    for entry in out.iterdir():
        documented = re.sub(r"\d{6}", "NNNNNN", entry.name)  # checkpoint-000002 is checkpoint-NNNNNN
        assert re.search(rf"^\s+{re.escape(documented)}", docs, re.M), f"{entry.name} is not in docs/training.md"
    floats = [p for p in out.rglob("*") if re.fullmatch(r"\d+\.\d+", p.name)]
    assert floats == [], "folders named by timestamps"
    with Image.open(out / "reconstructions.png") as grid:  # original | reconstruction | error, 64 px each
        assert grid.width >= 3 * 64 and grid.height >= 2 * 64
