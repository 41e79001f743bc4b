"""The cache at scale: streamed WebDataset shards on several processes, a killed rank redone alone, locks
without flock, unreadable shards, first-write kills, full disks, format-1 migration, LatentStream splits."""

import fcntl
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from imagegen import make_photo, write_photos
from test_encode import (assert_latents_match, assert_units_whole, encode, encode_command, sample_keys, stored,
                         subprocess_env, vae_dir)  # noqa: F401 (vae_dir is a fixture)
from vaekit import cli
from vaekit.cache.dataset import LatentDataset, LatentStream
from vaekit.cache.format import list_units, lock_path, read_unit_meta
from vaekit.cache.reader import cache_entries

torch.set_num_threads(1)


def write_shards(folder, shards, per_shard, compress=True, start_seed=0, prefix="s"):
    """WebDataset shards shard-000.tar.gz ... of PNG samples keyed {prefix}{shard}_{i}; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = folder / f"shard-{s:03d}.tar{'.gz' if compress else ''}"
        with tarfile.open(path, "w:gz" if compress else "w") as tar:
            for i in range(per_shard):
                buffer = io.BytesIO()
                make_photo(40, 40, seed=start_seed + s * per_shard + i).save(buffer, "PNG")
                for name, data in ((f"{prefix}{s}_{i}.png", buffer.getvalue()), (f"{prefix}{s}_{i}.txt", b"caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command, rank, world, port):
    """One rank of a job started by hand (what torchrun sets), in its own process group; gloo on the CPU."""
    env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def tokens(out):
    """{unit: token of the run that wrote it}."""
    return {unit: read_unit_meta(path)["token"] for unit, path in list_units(out).items()}


# ----------------------------------------------------------------------------------------------
# Streamed shards, several processes, a rank killed


@pytest.mark.slow
def test_streamed_shards_on_three_processes_once_each_and_a_killed_rank_redone_alone(tmp_path, vae_dir):
    shards = write_shards(tmp_path / "shards", 6, 3)
    spec = f"pipe:cat {tmp_path / 'shards'}/shard-{{000..005}}.tar.gz"
    options = ("--batch_size", 2, "--num_workers", 0, "--dtype", "fp32")
    reference = tmp_path / "reference"
    assert encode(vae_dir, spec, reference, *options) == 0
    assert sorted(sample_keys(reference)) == sorted((f"s{s}_{i}", False) for s in range(6) for i in range(3))

    # Units 0..5 belong to ranks 0, 1, 2, 0, 1, 2. Rank 1's second shard is a FIFO nobody writes: its
    # `cat` blocks, so rank 1 hangs inside unit 4 until it is killed; the other ranks must finish.
    held = tmp_path / "held.tar.gz"
    shutil.move(shards[4], held)
    os.mkfifo(shards[4])
    out, port = tmp_path / "cache", free_port()
    command = encode_command(vae_dir, spec, out, *options)
    ranks = [launch(command, rank, 3, port) for rank in range(3)]
    try:
        for rank in (0, 2):
            stdout, stderr = ranks[rank].communicate(timeout=180)
            assert ranks[rank].returncode == 0, f"rank {rank} did not finish alone: {stderr[-3000:]}"
        deadline = time.monotonic() + 60
        while 1 not in list_units(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(list_units(out)) == [0, 1, 2, 3, 5], "everything but rank 1's blocked unit is done"
        assert ranks[1].poll() is None
    finally:
        for process in ranks:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)  # the rank and its pipe's cat
                process.wait()
    before = tokens(out)
    assert not (out / "summary.json").exists(), "a run with a dead rank is not finalised"

    os.unlink(shards[4])
    shutil.move(held, shards[4])
    port = free_port()
    ranks = [launch(command, rank, 3, port) for rank in range(3)]
    outputs = [process.communicate(timeout=180) for process in ranks]
    assert [p.returncode for p in ranks] == [0, 0, 0], outputs[0][1][-3000:]
    after = tokens(out)
    assert [u for u in after if after[u] != before.get(u)] == [4], "only the killed rank's unfinished unit redone"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["units_encoded"], summary["units_unchanged"], summary["encoded"]) == (1, 5, 3)
    assert summary["processes"] == 3
    keys = sample_keys(out)
    assert len(keys) == len(set(keys)) == 18, "every sample exactly once"
    assert_units_whole(out)
    assert_latents_match(stored(out), stored(reference))
    assert sum("encoded 3 images" in o for o, _ in outputs) == 1, "the last rank to finish reports the run"


def test_a_process_that_cannot_open_its_data_stops_every_process_with_its_message(tmp_path, vae_dir):
    data = tmp_path / "images"
    write_photos(data, 4)
    out, port = tmp_path / "cache", free_port()
    # Two nodes: the second lacks the data. Nobody may wait for it in a collective.
    commands = [encode_command(vae_dir, data, out, "--num_workers", 0),
                encode_command(vae_dir, tmp_path / "not-mounted", out, "--num_workers", 0)]
    ranks = [launch(command, rank, 2, port) for rank, command in enumerate(commands)]
    outputs = [process.communicate(timeout=120) for process in ranks]
    assert [p.returncode for p in ranks] == [2, 2]
    for _, stderr in outputs:
        assert "Process 1: Data not found" in stderr and "not-mounted" in stderr, stderr[-2000:]
        assert "Traceback" not in stderr
    assert not list_units(out)


def test_local_shard_folder_of_plain_and_gzipped_tars(tmp_path, vae_dir):
    write_shards(tmp_path / "shards", 1, 2, compress=False)
    write_shards(tmp_path / "shards" / "more", 1, 2, start_seed=10, prefix="t")  # sub-folders are searched too
    out = tmp_path / "cache"
    assert encode(vae_dir, tmp_path / "shards", out, "--num_workers", 2) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["units"]["kind"] == "shards"
    assert sorted(e["key"] for e in cache_entries(out)) == ["s0_0", "s0_1", "t0_0", "t0_1"]
    assert all(e["path"] is None for e in cache_entries(out))


def test_an_unreadable_shard_is_listed_the_others_kept_and_a_rerun_finishes(tmp_path, vae_dir, capsys):
    shards = write_shards(tmp_path / "shards", 3, 2, compress=False)
    whole = shards[1].read_bytes()
    shards[1].write_bytes(whole[:700])  # cut inside the first member
    spec = f"{tmp_path / 'shards'}/shard-{{000..002}}.tar"
    out = tmp_path / "cache"
    assert encode(vae_dir, spec, out, "--num_workers", 0) == 2
    err = capsys.readouterr().err
    assert "shard-001.tar" in err and "unreadable shard" in err and "run the same command again" in err
    assert sorted(list_units(out)) == [0, 2]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["path"], e["reason"]) for e in errors] == [(str(shards[1]), "unreadable shard")]

    shards[1].write_bytes(whole)
    assert encode(vae_dir, spec, out, "--num_workers", 0) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["units_encoded"], summary["units_unchanged"], summary["errors"]) == (1, 2, 0)
    assert len(sample_keys(out)) == 6


def test_a_missing_local_shard_and_limit_with_shards_are_clear_errors(tmp_path, vae_dir, capsys):
    write_shards(tmp_path / "shards", 2, 1, compress=False)
    assert encode(vae_dir, f"{tmp_path / 'shards'}/shard-{{000..003}}.tar", tmp_path / "c") == 2
    assert "Shard not found" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert encode(vae_dir, tmp_path / "shards", tmp_path / "c", "--limit", 1) == 2
    assert "fewer shards" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Locks and faults


def test_locks_work_without_flock_respect_a_live_owner_and_take_over_a_stale_one(tmp_path, vae_dir, monkeypatch,
                                                                                    capsys):
    def no_flock(*args):  # a parallel file system mounted without flock support
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    data = tmp_path / "images"
    write_photos(data, 6)
    out = tmp_path / "cache"
    options = ("--num_workers", 0, "--unit_size", 2, "--lock_timeout", 30)
    (out / "locks").mkdir(parents=True)
    lock = lock_path(out, 1)
    lock.write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "started": time.time()}))
    assert encode(vae_dir, data, out, *options) == 2
    err = capsys.readouterr().err
    assert "host gpu-node-17, pid 4242" in err and "run the same command again" in err
    assert sorted(list_units(out)) == [0, 2], "the other units are done"
    assert lock.is_file(), "a live owner's lock is left alone"

    old = time.time() - 120  # no heartbeat for two minutes: that node is gone
    os.utime(lock, (old, old))
    assert encode(vae_dir, data, out, *options) == 0
    assert sorted(list_units(out)) == [0, 1, 2] and not lock.exists()
    assert json.loads((out / "summary.json").read_text())["units_encoded"] == 1


def test_a_kill_during_the_first_card_write_leaves_a_folder_the_next_run_takes(tmp_path, vae_dir):
    data = tmp_path / "images"
    write_photos(data, 2)
    out = tmp_path / "cache"
    out.mkdir()
    (out / ".card.json.k3j2h1.tmp").write_text('{"format": "vaekit-lat')  # cut short by the kill
    assert encode(vae_dir, data, out, "--num_workers", 0) == 0
    assert len(sample_keys(out)) == 2


def test_outputs_honour_the_umask(tmp_path, vae_dir):
    data = tmp_path / "images"
    write_photos(data, 2)
    old = os.umask(0o022)
    try:
        assert encode(vae_dir, data, tmp_path / "cache", "--num_workers", 0) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, "readable by colleagues"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a full disk) needs root")
def test_a_full_disk_gives_one_message_keeps_the_cache_and_resumes(tmp_path, vae_dir):
    from test_hostile import mount_tmpfs

    data = tmp_path / "images"
    write_photos(data, 12, size=(256, 256))  # 32 KB of fp32 posterior per image: the disk holds about five
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "size=180k")
    try:
        command = encode_command(vae_dir, data, disk / "cache", "--num_workers", 0, "--unit_size", 2,
                                 "--dtype", "fp32", resolution=256)
        done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "no space left on the device" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        finished = len(list_units(disk / "cache"))
        assert 0 < finished < 6, "stopped partway"
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = json.loads((disk / "cache" / "summary.json").read_text())
        assert summary["units_unchanged"] == finished and len(sample_keys(disk / "cache")) == 12
        assert_units_whole(disk / "cache")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ----------------------------------------------------------------------------------------------
# Format 1


def write_format_1(cache, v2_cache):
    """A format-1 cache holding the latents of a format-2 one (its manifests and shards as format 1 wrote them)."""
    from safetensors.torch import save_file

    card = json.loads((v2_cache / "card.json").read_text())
    card["version"] = 1
    del card["units"]
    (cache / "shards").mkdir(parents=True)
    (cache / "card.json").write_text(json.dumps(card))
    lines = []
    for i, entry in enumerate(cache_entries(v2_cache)):
        mean, logvar = stored(v2_cache)[(entry["key"], entry["flip"])]
        shard = f"shards/shard-000-{i:05d}.safetensors"
        save_file({f"mean/{entry['group']}": mean[None].half(), f"logvar/{entry['group']}": logvar[None].half()},
                  str(cache / shard), metadata={"count": "1"})
        lines.append(json.dumps({"key": entry["key"], "path": entry["path"], "sha256": entry["sha256"],
                                 "original_size": entry["original_size"], "resized_size": entry["resized_size"],
                                 "crop_box": entry["crop_box"], "flip": entry["flip"], "bucket": entry["bucket"],
                                 "shard": shard, "group": entry["group"], "offset": 0, "run": 1}))
    (cache / "manifest-000.jsonl").write_text("".join(line + "\n" for line in lines))


def test_a_format_1_cache_points_to_migrate_and_migrates_in_place(tmp_path, vae_dir, capsys):
    data = tmp_path / "images"
    write_photos(data, 3)
    new = tmp_path / "new"
    assert encode(vae_dir, data, new, "--num_workers", 0, "--flip") == 0
    old = tmp_path / "old"
    write_format_1(old, new)

    with pytest.raises(Exception, match="vaekit cache migrate"):
        LatentDataset(old)
    capsys.readouterr()
    assert encode(vae_dir, data, old, "--num_workers", 0, "--flip") == 2
    assert "vaekit cache migrate" in capsys.readouterr().err

    assert cli.main(["cache", "migrate", str(old)]) == 0
    assert "3 images (6 latents)" in capsys.readouterr().out
    assert not (old / "shards").exists() and not list(old.glob("manifest-*"))
    assert_latents_match(stored(old), stored(new))
    assert LatentDataset(old, flips="all").keys == LatentDataset(new, flips="all").keys
    assert cli.main(["cache", "migrate", str(old)]) == 0, "again: nothing to do"
    assert "already in format 2" in capsys.readouterr().out
    assert encode(vae_dir, data, old, "--num_workers", 0, "--flip") == 2
    assert "migrated from format 1" in capsys.readouterr().err
    assert encode(vae_dir, data, old, "--num_workers", 0, "--flip", "--overwrite") == 0


# ----------------------------------------------------------------------------------------------
# Reading


def test_latent_stream_reads_each_item_once_per_epoch_across_ranks_and_workers(tmp_path, vae_dir):
    data = tmp_path / "images"
    data.mkdir()
    for i, size in enumerate([(96, 48), (48, 96), (64, 64), (100, 50), (50, 100), (70, 64), (90, 45), (64, 70)]):
        make_photo(*size, seed=i).save(data / f"img{i}.png")
    out = tmp_path / "cache"
    assert encode(vae_dir, data, out, "--buckets", "--bucket_step", 16, "--num_workers", 0, "--unit_size", 3,
                  "--flip", resolution=64) == 0
    everything = sorted(sample_keys(out))
    orders = []
    for epoch in range(3):
        seen = []
        for rank in range(2):
            stream = LatentStream(out, batch_size=2, rank=rank, world=2, flips="all")
            stream.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
            for batch in loader:
                c, h, w = batch["latents"].shape[1:]
                assert all(tuple(b) == (w * 8, h * 8) for b in batch["buckets"]), "one bucket per batch"
                seen.extend(zip(batch["keys"], batch["flips"]))
        assert sorted(seen) == everything, "every item (image and mirror) once per epoch"
        orders.append(seen)
    assert len({tuple(order) for order in orders}) > 1, "a new shuffle each epoch"


def test_opening_reads_the_catalog_or_lists_units_when_it_is_gone(tmp_path, vae_dir):
    data = tmp_path / "images"
    write_photos(data, 5)
    out = tmp_path / "cache"
    assert encode(vae_dir, data, out, "--num_workers", 0, "--unit_size", 2) == 0
    with_catalog = LatentDataset(out, sample=False)
    (out / "catalog.arrow").unlink()  # a cache being written: no catalog yet
    without = LatentDataset(out, sample=False)
    assert len(with_catalog) == len(without) == 5
    for i in range(5):
        assert torch.equal(with_catalog[i]["latents"], without[i]["latents"])
    with pytest.raises(IndexError):
        without[5]


@pytest.mark.slow
def test_the_scale_benchmark_prints_its_table_and_verify_stays_bounded_at_1e5_images(tmp_path):
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_scale.py"), "--sizes", "1000,100000",
                           "--reads", "50", "--json", str(tmp_path / "scale.json")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MB at 1e8" in done.stdout
    result = json.loads((tmp_path / "scale.json").read_text())
    rows = {(r["format"], r["phase"], r["images"]) for r in result["rows"]}
    phases = {"v2": ("rerun", "open", "reads", "verify"), "v1": ("rerun", "open", "reads")}
    assert rows == {(f, p, n) for f in phases for p in phases[f] for n in (1000, 100000)}
    assert all(r["seconds"] > 0 for r in result["rows"])
    verify = {r["images"]: r for r in result["rows"] if r["phase"] == "verify"}
    # Memory independent of the number of images: the hashing buffers and one unit at a time.
    assert verify[100000]["anon_growth_mb"] < verify[1000]["anon_growth_mb"] + 30, verify
