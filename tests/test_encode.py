"""`vaekit encode`: bad inputs, kill and resume, two processes, cache keys, incremental runs, buckets."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from imagegen import BAD_REASONS, make_photo, write_bad_images, write_odd_images, write_photos
from vaekit import cli
from vaekit.data import nearest_bucket
from vaekit.cache.dataset import LatentDataset, load_latents
from vaekit.cache.format import list_units, read_unit_meta
from vaekit.cache.reader import cache_entries

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny f8 VAE saved as a diffusers folder, so every process and run loads the same weights."""
    from vaekit.model import build_preset, save_diffusers

    torch.manual_seed(0)
    return str(save_diffusers(build_preset("tiny"), tmp_path_factory.mktemp("vae") / "tiny"))


@pytest.fixture(scope="module")
def other_vae_dir(tmp_path_factory):
    """Same architecture, other weights."""
    from vaekit.model import build_preset, save_diffusers

    torch.manual_seed(1)
    return str(save_diffusers(build_preset("tiny"), tmp_path_factory.mktemp("vae") / "other"))


# fp32 compute: latents compared across runs and with vae.encode must not depend on whether this
# CPU has native bf16 (which `--compute_dtype auto` would use); test_auto_precision covers auto.
FP32 = ("--compute_dtype", "fp32")


def encode(vae, data, out, *extra, resolution=32):
    """Run `vaekit encode` in this process (fp32 compute); returns its exit code."""
    argv = ["encode", "--vae", str(vae), "--data", str(data), "--out", str(out), "--resolution", str(resolution),
            "--quiet", *FP32, *[str(a) for a in extra]]
    return cli.main(argv)


def encode_command(vae, data, out, *extra, resolution=32):
    """The `vaekit encode` command line for a subprocess (fp32 compute)."""
    return [sys.executable, "-m", "vaekit.cli", "encode", "--vae", str(vae), "--data", str(data), "--out", str(out),
            "--resolution", str(resolution), "--quiet", *FP32, *[str(a) for a in extra]]


def subprocess_env():
    """Environment for child processes: one thread each (the machine is small and shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def sample_keys(out):
    """(key, flip) of every stored sample."""
    return [(e["key"], e["flip"]) for e in cache_entries(out)]


def stored(out, dtype=torch.float32):
    """{(key, flip): (mean, logvar)} of the cache's samples."""
    return {(e["key"], e["flip"]): load_latents(out, e["key"], e["flip"]) for e in cache_entries(out)}


def latent_shape(out, entry):
    """The (C, h, w) shape of an entry's stored latents."""
    from safetensors import safe_open

    with safe_open(str(Path(out) / entry["part"]), framework="pt") as f:
        return list(f.get_slice(f"mean/{entry['group']}").get_shape()[1:])


def assert_latents_match(a, b):
    """Two caches hold the same samples with the same latents.

    CPU convolution kernels may pick a different algorithm for another batch size or thread count,
    so a sample encoded in another batch can differ in the last bits; 1e-5 is far below fp16 storage.
    """
    assert sorted(a) == sorted(b)
    for slot in a:
        for x, y in zip(a[slot], b[slot]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def assert_units_whole(out):
    """Every part file is named by exactly one unit index and holds as many samples as the index points to;
    nothing of a run in progress (staging folders, locks, temporaries) is left."""
    from safetensors import safe_open

    units = Path(out) / "units"
    named = {}
    for unit, path in list_units(out).items():
        for part in read_unit_meta(path)["parts"]:
            named[part] = unit
    parts = {p.name for p in units.iterdir() if p.suffix == ".safetensors"}
    assert parts == set(named), "every part is named by its unit's index and every named part exists"
    assert not [p for p in units.iterdir() if p.name.startswith(".")], "no staging folders or temporaries"
    assert not list((Path(out) / "locks").iterdir()), "no locks left"
    entries = cache_entries(out)
    for part in parts:
        with safe_open(str(units / part), framework="pt") as f:
            count = int(f.metadata()["count"])
            rows = sum(f.get_slice(name).get_shape()[0] for name in f.keys() if name.startswith("mean/"))
        assert count == rows == sum(1 for e in entries if e["part"] == f"units/{part}")


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_and_odd_images_each_encoded_or_listed_with_reason(tmp_path, vae_dir):
    data = tmp_path / "images"
    good = write_photos(data, 4)
    bad = write_bad_images(data)
    odd = write_odd_images(data)
    Image.new("RGB", (8, 8), (10, 200, 30)).save(data / "tiny_icon.png")
    out = tmp_path / "cache"

    assert encode(vae_dir, data, out, "--min_size", 16, "--num_workers", 2, "--batch_size", 4, "--shard_size", 6) == 0

    entries = cache_entries(out)
    assert sorted(e["key"] for e in entries) == sorted(good + list(odd)), "exactly the good images, once each"
    errors = {e["key"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == set(bad) | {"tiny_icon.png"}
    for name, reason in BAD_REASONS.items():
        assert errors[name]["reason"].startswith(reason), (name, errors[name])
        assert errors[name]["path"] == str((data / name).resolve())
    assert errors["tiny_icon.png"]["reason"] == "smaller than min_size"
    by_key = {e["key"]: e for e in entries}
    assert by_key["exif_rotated.jpg"]["original_size"] == [24, 40], "EXIF orientation applied before cropping"
    for entry in entries:
        assert latent_shape(out, entry) == [4, 4, 4] and entry["bucket"] == [32, 32]
        assert len(entry["sha256"]) == 64 and entry["flip"] is False
    assert_units_whole(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoded"] == len(entries) and summary["errors"] == len(errors)


def test_non_finite_latent_is_reported_and_not_written(tmp_path, vae_dir, monkeypatch):
    from vaekit.codec import inference

    data = tmp_path / "images"
    names = write_photos(data, 6)
    real = inference.encode
    calls = []

    def poisoned(vae, x, tile="off"):
        mean, logvar = real(vae, x, tile=tile)
        if not calls:  # first batch: rows 0-2 plain, 3-5 mirrored; poison the mirror of image 1
            mean = mean.clone()
            mean[4, 0, 0, 0] = float("nan")
        calls.append(len(x))
        return mean, logvar

    monkeypatch.setattr(inference, "encode", poisoned)
    out = tmp_path / "cache"
    assert encode(vae_dir, data, out, "--flip", "--batch_size", 3, "--num_workers", 0) == 0

    keys = sample_keys(out)
    assert (names[1], False) not in keys and (names[1], True) not in keys, "both variants of the image dropped"
    assert sorted(keys) == sorted((n, f) for n in names if n != names[1] for f in (False, True))
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors == [{"key": names[1], "path": str((data / names[1]).resolve()), "reason": "non-finite latent",
                       "detail": None}]
    monkeypatch.setattr(inference, "encode", real)
    assert encode(vae_dir, data, out, "--flip", "--batch_size", 3, "--num_workers", 0) == 0
    assert (names[1], False) in sample_keys(out) and (names[1], True) in sample_keys(out), "retried next run"
    assert len(sample_keys(out)) == 12


# ----------------------------------------------------------------------------------------------
# kill -9 and resume


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, vae_dir):
    data = tmp_path / "images"
    names = write_photos(data, 24, size=(80, 64))
    options = ("--batch_size", 2, "--unit_size", 4, "--shard_size", 3, "--num_workers", 0, "--dtype", "fp32", "--flip")
    reference = tmp_path / "reference"
    assert encode(vae_dir, data, reference, *options, resolution=64) == 0

    out = tmp_path / "cache"
    process = subprocess.Popen(encode_command(vae_dir, data, out, *options, resolution=64), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list_units(out)) >= 2:  # two units in place, the third under way
            break
        time.sleep(0.002)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {unit: read_unit_meta(path)["token"] for unit, path in list_units(out).items()}
    assert 2 <= len(done) < 6, "killed partway"

    assert encode(vae_dir, data, out, *options, resolution=64) == 0
    keys = sample_keys(out)
    assert len(keys) == len(set(keys)) == 48, "every image (and its mirror) exactly once"
    assert {k for k, _ in keys} == set(names)
    assert_units_whole(out)
    assert_latents_match(stored(out), stored(reference))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["units_unchanged"] == len(done) and summary["encoded"] == 24 - 4 * len(done)
    after = {unit: read_unit_meta(path)["token"] for unit, path in list_units(out).items()}
    assert all(after[unit] == token for unit, token in done.items()), "finished units were not redone"


def test_recovery_removes_what_a_kill_leaves(tmp_path, vae_dir):
    from vaekit.cache.format import index_path, lock_path, staging_dir

    data = tmp_path / "images"
    names = write_photos(data, 8)
    out = tmp_path / "cache"
    options = ("--batch_size", 2, "--unit_size", 2, "--num_workers", 0, "--dtype", "fp32")
    assert encode(vae_dir, data, out, *options) == 0
    reference = stored(out)
    units = out / "units"
    part = read_unit_meta(index_path(out, 1))["parts"][0]
    # What kills can leave: a unit whose parts are in place but whose index is not (killed before the
    # index rename), a part of a later run that no index names, a staging folder with the temporary
    # files of safetensors and of our atomic writes, and the lock of a process that is gone.
    index_path(out, 1).unlink()
    shutil.copy(units / part, units / part.replace(part.split(".")[2], "ffffffffffffffff0000"))
    staging = staging_dir(out, 2)
    staging.mkdir()
    (staging / ".tmpAb12Cd").write_bytes(b"\0" * 100)
    (staging / ".u-00000002.p000.x.safetensors.k2j3.tmp").write_bytes(b"\0" * 10)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for unit in (1, 3):  # unit 3 stays done: killed after its index was in place, before its lock was released
        lock_path(out, unit).write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid,
                                                    "started": 0}))

    assert encode(vae_dir, data, out, *options) == 0
    assert sorted(sample_keys(out)) == sorted((n, False) for n in names), "each image exactly once"
    assert_units_whole(out)
    assert_latents_match(stored(out), reference)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encoded"] == 2 and summary["units_unchanged"] == 3 and summary["units_encoded"] == 1


# ----------------------------------------------------------------------------------------------
# Two processes


def test_two_cpu_processes_match_one(tmp_path, vae_dir):
    data = tmp_path / "images"
    names = write_photos(data, 12)
    single = tmp_path / "single"
    options = ("--batch_size", 4, "--unit_size", 3, "--num_workers", 0, "--dtype", "fp32")
    assert encode(vae_dir, data, single, *options) == 0
    double = tmp_path / "double"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *encode_command(vae_dir, data, double, *options)[1:]]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads(p.read_text()) for p in sorted((double / "runs").glob("*/rank-*.json"))]
    assert [r["counters"]["units_encoded"] for r in records] == [2, 2], "each rank encoded its two units"
    assert sorted(sample_keys(double)) == sorted((n, False) for n in names)
    assert_latents_match(stored(double), stored(single))
    summary = json.loads((double / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["encoded"] == 12
    assert "encoded 12 images" in result.stdout


# ----------------------------------------------------------------------------------------------
# The cache key


def test_changed_vae_or_size_policy_is_a_different_cache(tmp_path, vae_dir, other_vae_dir, capsys):
    data = tmp_path / "images"
    write_photos(data, 3)
    out = tmp_path / "cache"
    fast = ("--num_workers", 0)
    assert encode(vae_dir, data, out, *fast) == 0
    card = json.loads((out / "card.json").read_text())
    capsys.readouterr()

    assert encode(other_vae_dir, data, out, *fast) == 2
    assert "a different VAE" in capsys.readouterr().err
    assert encode(vae_dir, data, out, *fast, "-o", "scaling_factor=0.2") == 2, "normalisation is part of the key"
    assert "scaling_factor" in capsys.readouterr().err
    assert encode(vae_dir, data, out, *fast, resolution=64) == 2
    assert "a different size policy (cache: resolution 32" in capsys.readouterr().err
    assert encode(vae_dir, data, out, *fast, "--buckets", "--bucket_step", 8) == 2
    assert "size policy" in capsys.readouterr().err
    assert encode(vae_dir, data, out, *fast, "--dtype", "bf16") == 2
    assert "dtype fp16 in the cache, bf16 now" in capsys.readouterr().err
    assert encode(vae_dir, data, out, *fast, "--store", "mode") == 2
    assert encode(vae_dir, data, out, *fast, "--flip") == 2
    assert json.loads((out / "card.json").read_text()) == card, "a refused run changes nothing"

    assert encode(other_vae_dir, data, out, *fast, "--overwrite", resolution=64) == 0
    new_card = json.loads((out / "card.json").read_text())
    assert new_card["key"]["vae_fingerprint"] != card["key"]["vae_fingerprint"]
    entries = cache_entries(out)
    assert len(entries) == 3 and all(latent_shape(out, e) == [4, 8, 8] for e in entries)
    assert_units_whole(out)


def test_not_a_cache_folder_is_refused(tmp_path, vae_dir, capsys):
    data = tmp_path / "images"
    write_photos(data, 2)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert encode(vae_dir, data, out, "--num_workers", 0) == 2
    assert "not a latent cache" in capsys.readouterr().err
    assert encode(vae_dir, data, out, "--num_workers", 0, resolution=30) == 2
    assert "multiple of the VAE's downsampling factor 8" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Incremental runs, buckets, other sources


def test_rerun_encodes_only_units_whose_images_changed(tmp_path, vae_dir):
    from vaekit.data import decode_image, resize_center_crop, to_tensor
    from vaekit.model import load_vae

    data = tmp_path / "images"
    names = write_photos(data, 5)  # units of two: [0, 1] [2, 3] [4]
    out = tmp_path / "cache"
    fast = ("--num_workers", 0, "--dtype", "fp32", "--unit_size", 2)
    assert encode(vae_dir, data, out, *fast) == 0
    before = stored(out)

    make_photo(48, 40, seed=123).save(data / names[0])  # changed bytes, same key
    make_photo(48, 40, seed=124).save(data / "photo_new.png")  # sorts last: the third unit becomes [new]
    (data / names[4]).unlink()
    assert encode(vae_dir, data, out, *fast) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["units_encoded"], summary["units_unchanged"], summary["encoded"]) == (2, 1, 3)

    after = stored(out)
    for name in names[1:4]:
        assert torch.equal(after[(name, False)][0], before[(name, False)][0]), "untouched images kept"
    assert not torch.allclose(after[(names[0], False)][0], before[(names[0], False)][0]), "the changed file re-encoded"
    vae = load_vae(vae_dir)
    img, _ = resize_center_crop(decode_image(data / names[0]), 32)
    with torch.no_grad():
        expected = vae.encode(to_tensor(img)[None]).latent_dist.mean[0]
    torch.testing.assert_close(after[(names[0], False)][0], expected, rtol=1e-5, atol=1e-5)
    assert LatentDataset(out).keys == [*names[:4], "photo_new.png"], "the removed image is gone"
    assert_units_whole(out)


def test_buckets_group_shapes_and_record_crops(tmp_path, vae_dir):
    from safetensors import safe_open

    from vaekit.data import make_buckets, resize_crop_to_bucket

    data = tmp_path / "images"
    sizes = {"wide.png": (96, 50), "tall.png": (40, 90), "square.png": (70, 64), "wide2.png": (120, 64),
             "tall2.png": (50, 100)}
    data.mkdir()
    for i, (name, size) in enumerate(sizes.items()):
        make_photo(*size, seed=i).save(data / name)
    out = tmp_path / "cache"
    assert encode(vae_dir, data, out, "--buckets", "--bucket_step", 16, "--batch_size", 2, "--num_workers", 2,
                  resolution=64) == 0

    buckets = make_buckets(64 * 64, 0.5, 2.0, 16)
    card = json.loads((out / "card.json").read_text())
    assert card["key"]["size_policy"]["buckets"] == [list(b) for b in buckets]
    entries = {e["key"]: e for e in cache_entries(out)}
    assert set(entries) == set(sizes)
    for name, size in sizes.items():
        entry = entries[name]
        bucket = nearest_bucket(*size, buckets)
        _, crop = resize_crop_to_bucket(make_photo(*size, seed=list(sizes).index(name)), bucket)
        assert entry["bucket"] == list(bucket) and entry["group"] == f"{bucket[0]}x{bucket[1]}"
        assert latent_shape(out, entry) == [4, bucket[1] // 8, bucket[0] // 8]
        assert entry["original_size"] == list(size) and entry["crop_box"] == list(crop.box)
        with safe_open(str(out / entry["part"]), framework="pt") as f:
            group = f.get_tensor(f"mean/{entry['group']}")
        assert group.shape[0] >= 1
    assert len({tuple(e["bucket"]) for e in entries.values()}) == 3, "wide, tall and square buckets"
    assert_units_whole(out)


def test_webdataset_shards_encode_with_their_keys(tmp_path, vae_dir):
    import io

    tar_path = tmp_path / "data-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            make_photo(40, 40, seed=i).save(buffer, "PNG")
            info = tarfile.TarInfo(f"sample{i:03d}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    out = tmp_path / "cache"
    assert encode(vae_dir, tar_path, out, "--num_workers", 0) == 0
    entries = cache_entries(out)
    assert sorted(e["key"] for e in entries) == ["sample000", "sample001", "sample002"]
    assert all(e["path"] is None for e in entries)


def test_tiled_encoding_is_part_of_the_key(tmp_path, vae_dir, capsys, monkeypatch):
    from vaekit.codec import tiling

    data = tmp_path / "images"
    write_photos(data, 2, size=(192, 192))
    out = tmp_path / "cache"
    assert encode(vae_dir, data, out, "--num_workers", 0, "--tile", "banana", resolution=192) == 2
    assert "tile" in capsys.readouterr().err
    assert encode(vae_dir, data, out, "--num_workers", 0, "--tile", 32, resolution=192) == 2
    assert "at least 88 px" in capsys.readouterr().err  # too small for the tiny preset's receptive field
    calls = []
    real = tiling.encode_tiled
    monkeypatch.setattr(tiling, "encode_tiled", lambda *a: calls.append(a[2]) or real(*a))
    assert encode(vae_dir, data, out, "--num_workers", 0, "--tile", 96, "--dtype", "fp32", resolution=192) == 0
    assert calls and set(calls) == {96}  # the tiled path ran
    assert json.loads((out / "card.json").read_text())["key"]["tile"] == "96"
    assert encode(vae_dir, data, out, "--num_workers", 0, "--dtype", "fp32", resolution=192) == 2
    assert "tile 96 in the cache, off now" in capsys.readouterr().err
    untiled = tmp_path / "untiled"
    assert encode(vae_dir, data, untiled, "--num_workers", 0, "--dtype", "fp32", resolution=192) == 0
    # Exact tiling: equal up to float rounding. The encoder runs channels-last, where oneDNN picks
    # its convolution algorithm by shape: against a float64 reference the untiled pass is off by
    # about 5e-4 here and the tiled one by 4e-6, so the tolerance is the untiled kernel's error.
    tiled, plain = stored(out), stored(untiled)
    assert sorted(tiled) == sorted(plain)
    for slot in tiled:
        for x, y in zip(tiled[slot], plain[slot]):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-3)


def test_yaml_config_with_flag_overrides(tmp_path, vae_dir, capsys):
    data = tmp_path / "images"
    write_photos(data, 2)
    config = tmp_path / "encode.yaml"
    config.write_text(f"vae: {vae_dir}\ndata: {data}\nout: {tmp_path / 'cache'}\nresolution: 32\nflip: true\n"
                      "num_workers: 0\nstore: mode\n")
    assert cli.main(["encode", "--config", str(config), "--no-flip", "--quiet"]) == 0
    key = json.loads((tmp_path / "cache" / "card.json").read_text())["key"]
    assert key["flip"] is False and key["store"] == "mode" and key["size_policy"]["resolution"] == 32
    config.write_text("resolution: 32\nbatch_sise: 4\n")
    assert cli.main(["encode", "--config", str(config), "--vae", vae_dir, "--data", str(data), "--out",
                     str(tmp_path / "other")]) == 2
    assert "Unknown config key 'batch_sise'" in capsys.readouterr().err


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(tmp_path, vae_dir, monkeypatch):
    from vaekit import device

    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.resolve_compute_dtype("auto", cpu) == torch.float32
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.resolve_compute_dtype("auto", cpu) == torch.bfloat16
    assert device.resolve_compute_dtype("fp32", cpu) == torch.float32

    # bf16 compute (what auto picks on such a CPU) stays near fp32: about bf16's 8 bits of mantissa.
    data = tmp_path / "images"
    write_photos(data, 3, size=(48, 40))
    args = ["--vae", vae_dir, "--data", str(data), "--resolution", "32", "--num_workers", "0", "--dtype", "fp32", "--quiet"]
    assert cli.main(["encode", *args, "--out", str(tmp_path / "auto")]) == 0
    assert cli.main(["encode", *args, "--out", str(tmp_path / "fp32"), "--compute_dtype", "fp32"]) == 0
    low, full = stored(tmp_path / "auto"), stored(tmp_path / "fp32")
    assert sorted(low) == sorted(full)
    for slot in full:
        assert (low[slot][0] - full[slot][0]).abs().max() < 0.05 and not torch.equal(low[slot][0], full[slot][0])
