"""Encodes that overlap, pause or change options: the catalog never describes other units than those on disk,
temporaries belong to their writer, a paused writer never corrupts the cache, and options that would destroy
units are refused. Races are replayed deterministically: a process stops itself at a named step
(vaekit.faults: VAEKIT_STOP_AT) while the test runs the other one, then continues it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagegen import make_photo, write_photos
from test_cache import write_shards
from vaekit import cli
from vaekit.cache.dataset import LatentDataset
from vaekit.cache.format import lock_path, read_catalog, read_unit_meta, scan_units
from vaekit.cache.verify import verify_cache
from vaekit.io import abandoned, host_tag, remove_temporaries

torch.set_num_threads(1)

FP32 = ("--compute_dtype", "fp32")


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from vaekit.model import build_preset, save_diffusers

    torch.manual_seed(0)
    return save_diffusers(build_preset("tiny"), tmp_path_factory.mktemp("vae") / "tiny")


def arguments(vae, data, out, *extra):
    return ["encode", "--vae", str(vae), "--data", str(data), "--out", str(out), "--resolution", "32", "--quiet",
            "--num_workers", "0", *FP32, *[str(a) for a in extra]]


def encode(vae, data, out, *extra):
    return cli.main(arguments(vae, data, out, *extra))


def start(vae, data, out, *extra, stop_at):
    """`vaekit encode` in a subprocess that stops itself (SIGSTOP) at `stop_at`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "VAEKIT_STOP_AT": stop_at}
    return subprocess.Popen([sys.executable, "-m", "vaekit.cli", *arguments(vae, data, out, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stopped(process):
    """Whether the process is stopped (state T in /proc)."""
    try:
        return Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def wait_stopped(process, timeout=120):
    deadline = time.monotonic() + timeout
    while not stopped(process):
        assert process.poll() is None, f"ended before its stop point: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "never reached its stop point"
        time.sleep(0.01)


def resume(process, timeout=120):
    """Continue a stopped process (and again at each later stop) until it exits; returns (code, stderr)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        process.send_signal(signal.SIGCONT)
        time.sleep(0.02)
        assert time.monotonic() < deadline
    return process.returncode, process.communicate()[1]


def served(out):
    """The keys LatentDataset serves, each as often as served."""
    dataset = LatentDataset(out, sample=False, normalize=False, flips="none")
    return sorted(dataset[i]["key"] for i in range(len(dataset)))


def wait_stale(path, seconds):
    """Until the lock at `path` has had no heartbeat for `seconds` (its owner is stopped)."""
    while path.exists() and time.time() - path.stat().st_mtime <= seconds:
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------
# The catalog


def test_a_catalog_computed_before_another_run_changed_a_unit_never_hides_its_images(tmp_path, vae):
    data, out = tmp_path / "images", tmp_path / "cache"
    names = write_photos(data, 4)
    (data / names[1]).write_bytes(b"")  # a broken image: unit 0 holds 1 row
    a = start(vae, data, out, "--unit_size", 2, stop_at="catalog-computed")
    wait_stopped(a)  # A has computed its catalog (unit 0: 1 row) and not written it

    make_photo(48, 40, seed=1).save(data / names[1])  # fixed: B redoes unit 0 with 2 rows
    assert encode(vae, data, out, "--unit_size", 2) == 0
    assert read_unit_meta(out / "units" / "u-00000000.index.arrow")["rows"] == 2
    (out / "catalog.arrow").unlink()  # B killed before its catalog: nothing newer stops A from writing its own

    code, err = resume(a)
    assert code == 0, err[-3000:]
    assert served(out) == sorted(names), "every image served once, from the units on disk"
    columns, _ = read_catalog(out)
    assert dict(zip(columns["unit"], columns["rows"])) == {0: 2, 1: 2}, "A withdrew its stale catalog and wrote one"
    assert not verify_cache(out, progress=False)["catalog"]


def test_two_finalisers_at_once_leave_a_current_catalog_and_remove_no_live_file(tmp_path, vae):
    data, out = tmp_path / "images", tmp_path / "cache"
    write_photos(data, 4)
    assert encode(vae, data, out, "--unit_size", 2) == 0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = out / f".summary.json.h{host_tag()}p{sleeper.pid}.k2j3h4g5.tmp"  # another live writer's temporary
        live.write_text("{}")
        unfinished = out / "runs" / "0000000000000000ffff"  # a run still finishing elsewhere
        unfinished.mkdir()
        (unfinished / "rank-00000.json").write_text("{}")
        runs = [start(vae, data, out, "--unit_size", 2, stop_at="catalog-computed") for _ in range(2)]
        for run in runs:
            wait_stopped(run)
        for run in runs:
            run.send_signal(signal.SIGCONT)  # both finalise at the same moment
        for run in runs:
            code, err = resume(run)
            assert code == 0 and "Traceback" not in err, err[-3000:]
        assert live.exists(), "a live process's temporary is never removed"
        assert unfinished.exists(), "a run that has not finalised keeps its records"
        assert served(out) == sorted(f"photo_{i:03d}.png" for i in range(4))
        report = verify_cache(out, progress=False)
        assert not report["catalog"] and not report["damaged"] and not report["leftovers"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = host_tag()
    names = {"mine": f".x.h{here}p{os.getpid()}.abcdefgh.tmp", "dead": f".x.h{here}p{dead.pid}.abcdefgh.tmp",
             "other-young": ".x.h00000000p1.abcdefgh.tmp", "other-old": ".y.h00000000p1.abcdefgh.tmp",
             "untagged-young": ".z.abcdefgh.tmp", "untagged-old": ".w.abcdefgh.tmp"}
    for name in names.values():
        (tmp_path / name).write_text("")
    old = time.time() - 3600
    for kind in ("other-old", "untagged-old"):
        os.utime(tmp_path / names[kind], (old, old))
    assert remove_temporaries(tmp_path, stale_after=600) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[k] for k in ("mine", "other-young",
                                                                                   "untagged-young"))
    assert not abandoned(tmp_path / names["mine"])  # a live process's, even in a folder its caller owns alone


# ----------------------------------------------------------------------------------------------
# A paused writer: fenced at every publish step


STEPS = ("part-written", "index-staged", "index-fenced", "parts-published", "index-published")


def test_a_writer_paused_at_each_publish_step_never_breaks_the_cache_and_each_unit_is_encoded_once(tmp_path, vae):
    data = tmp_path / "images"
    names = write_photos(data, 6)
    options = ("--unit_size", 2, "--batch_size", 1, "--shard_size", 1, "--flip")
    # One paused writer per step, all started at once (their start-up is most of the time): P1 encodes unit 0,
    # then stops inside unit 1 at the step, holding the locks of units 1 and 2 with a stopped heartbeat.
    first = {step: start(vae, data, tmp_path / step, *options, "--lock_timeout", 2, stop_at=f"{step}:1")
             for step in STEPS}
    for step, p1 in first.items():
        out = tmp_path / step
        wait_stopped(p1)
        wait_stale(lock_path(out, 2), 1.0)
        # P2 takes the stale locks over (lock timeout 1 s) and encodes what is not done.
        assert encode(vae, data, out, *options, "--lock_timeout", 1) == 0, step
        second = json.loads((out / "summary.json").read_text())
        code, err = resume(p1)
        assert "Traceback" not in err, err[-3000:]
        first_summary = json.loads((out / "summary.json").read_text())
        assert served(out) == sorted(names), f"{step}: every image served exactly once"
        report = verify_cache(out, progress=False)
        assert not report["damaged"] and not report["card"], (step, report)
        encodes = {u: (u in first_summary["encoded_units"]) + (u in second["encoded_units"]) for u in range(3)}
        assert encodes[0] == 1 and encodes[2] == 1, (step, encodes, "each unit encoded once")
        assert encodes[1] == (1 if step == "index-published" else 2), (step, encodes, "twice only while expiring")
        assert code == 2 and "taken over" in err or "removed" in err, (step, err[-2000:])


# ----------------------------------------------------------------------------------------------
# Options that would destroy


def test_limit_on_an_existing_cache_neither_deletes_nor_redoes_units(tmp_path, vae):
    data, out = tmp_path / "images", tmp_path / "cache"
    names = write_photos(data, 8)
    assert encode(vae, data, out, "--unit_size", 2) == 0
    before = {u: read_unit_meta(p)["token"] for u, p in scan_units(out).indices.items()}
    for limit in (3, 5, 1):
        assert encode(vae, data, out, "--unit_size", 2, "--limit", limit) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["units_encoded"] == 0 and summary["encoded"] == 0, (limit, summary)
        assert {u: read_unit_meta(p)["token"] for u, p in scan_units(out).indices.items()} == before
    assert served(out) == sorted(names)


def test_limit_on_a_new_cache_encodes_the_first_images_and_a_full_run_completes_it(tmp_path, vae):
    data, out = tmp_path / "images", tmp_path / "cache"
    names = write_photos(data, 5)
    assert encode(vae, data, out, "--unit_size", 2, "--limit", 3) == 0
    assert served(out) == sorted(names[:3])
    assert encode(vae, data, out, "--unit_size", 2) == 0
    assert served(out) == sorted(names)
    assert json.loads((out / "summary.json").read_text())["encoded_units"] == [1, 2], "the short unit grown"


def test_a_different_unit_size_is_refused_with_the_overwrite_hint(tmp_path, vae, capsys):
    data, out = tmp_path / "images", tmp_path / "cache"
    names = write_photos(data, 6)
    assert encode(vae, data, out, "--unit_size", 2) == 0
    capsys.readouterr()
    assert encode(vae, data, out, "--unit_size", 3) == 2
    err = capsys.readouterr().err
    assert "--unit_size 2" in err and "--overwrite" in err and "Traceback" not in err
    assert sorted(scan_units(out).indices) == [0, 1, 2] and served(out) == sorted(names), "nothing touched"
    assert encode(vae, data, out, "--unit_size", 3, "--overwrite") == 0
    assert sorted(scan_units(out).indices) == [0, 1] and served(out) == sorted(names)


def test_a_shard_list_may_grow_or_shrink_but_never_move_a_shard_to_another_unit(tmp_path, vae, capsys):
    shards = write_shards(tmp_path / "shards", 3, 2, compress=False)
    out = tmp_path / "cache"
    spec = f"{tmp_path / 'shards'}/shard-{{000..001}}.tar"
    assert encode(vae, spec, out) == 0
    assert encode(vae, f"{tmp_path / 'shards'}/shard-{{000..002}}.tar", out) == 0  # a new shard: a new unit
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["units_unchanged"], summary["encoded_units"]) == (2, [2])
    assert encode(vae, shards[0], out) == 0  # fewer shards: the others stay
    assert sorted(scan_units(out).indices) == [0, 1, 2]
    capsys.readouterr()
    assert encode(vae, f"{shards[1]}::{shards[0]}::{shards[2]}", out) == 2
    err = capsys.readouterr().err
    assert "changed order" in err and "shard-000.tar" in err and "--overwrite" in err
    assert len(served(out)) == 6
