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
from vaekit.cache.format import read_catalog, read_unit_meta, scan_units
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


class Forked:
    """`vaekit encode` in a process forked from this one (torch is imported already: no start-up to wait for),
    which stops itself (SIGSTOP) at `stop_at`; its output goes to a file."""

    def __init__(self, argv, stop_at, log):
        self.log = Path(log)
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                os.environ["VAEKIT_STOP_AT"] = stop_at
                code = cli.main(argv)
            except BaseException:
                import traceback  # the child's own failure, into its log

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self):
        return "", self.log.read_text()


def start(vae, data, out, *extra, stop_at):
    """`vaekit encode` in a forked process that stops itself (SIGSTOP) at `stop_at`."""
    log = Path(out).parent / f"{Path(out).name}.{time.monotonic_ns()}.log"
    return Forked(arguments(vae, data, out, *extra), stop_at, log)


def stopped(process):
    """Whether the process is stopped (state T in /proc)."""
    try:
        return Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
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


def wait_stale(out, seconds):
    """Until every lock of the cache has had no heartbeat for `seconds` (their owner is stopped)."""
    def fresh():
        for path in (Path(out) / "locks").glob("*.lock"):
            try:
                if time.time() - path.stat().st_mtime <= seconds:
                    return True
            except FileNotFoundError:
                continue
        return False

    while fresh():
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


def encodes_per_unit(out, first, second, units):
    """How many runs encoded each unit: `first` is the paused run's summary, `second` the other's."""
    return {u: (u in first["encoded_units"]) + (u in second["encoded_units"]) for u in range(units)}


def pause_and_take_over(tmp_path, vae, data, steps, options, units):
    """For each step, a writer stopped there inside unit 1 while another process takes its stale locks over and
    finishes; then the writer continues. Yields (step, out, exit code, stderr, encodes per unit)."""
    # All stopped writers start at once; each encodes unit 0, then stops at its step inside unit 1, holding the
    # locks of the units after it with a stopped heartbeat.
    first = {step: start(vae, data, tmp_path / step.replace(":", "-"), *options, "--lock_timeout", 2, stop_at=step)
             for step in steps}
    for step, p1 in first.items():
        out = tmp_path / step.replace(":", "-")
        wait_stopped(p1)
        wait_stale(out, 1.0)
        # P2 takes the stale locks over (lock timeout 1 s) and encodes what is not done.
        assert encode(vae, data, out, *options, "--lock_timeout", 1) == 0, step
        second = json.loads((out / "summary.json").read_text())
        code, err = resume(p1)
        assert "Traceback" not in err, err[-3000:]
        first_summary = json.loads((out / "summary.json").read_text())
        yield step, out, code, err, encodes_per_unit(out, first_summary, second, units)


@pytest.mark.parametrize("steps", [("parts-published:1", "index-fenced:1"),
                                   ("part-written:1", "index-staged:1", "index-published:1")], ids=["renames", "others"])
def test_a_writer_paused_at_each_publish_step_never_breaks_the_cache(tmp_path, vae, steps):
    data = tmp_path / "images"
    names = write_photos(data, 6)
    options = ("--unit_size", 2, "--batch_size", 1, "--shard_size", 1, "--flip")
    for step, out, code, err, encodes in pause_and_take_over(tmp_path, vae, data, steps, options, 3):
        assert served(out) == sorted(names), f"{step}: every image served exactly once"
        report = verify_cache(out, progress=False)
        assert not report["damaged"] and not report["card"], (step, report)
        assert encodes[0] == 1 and all(n <= 2 for n in encodes.values()), (step, encodes)
        if step == "index-published:1":
            assert encodes[1] == 1, "a unit published before the pause is not encoded again"
        assert code == 2 and "taken over" in err, (step, err[-2000:])


def test_a_paused_process_skips_the_units_taken_over_so_each_unit_is_encoded_once(tmp_path, vae, capsys):
    data = tmp_path / "images"
    names = write_photos(data, 12)
    options = ("--unit_size", 2, "--batch_size", 1)
    # Stopped just before encoding unit 1 (unit 0 may still be in its writer): both leases expire in flight.
    # Units 2-5 it had not started: after the pause it finds them taken over and skips them.
    ((_, out, code, err, encodes),) = pause_and_take_over(tmp_path, vae, data, ["unit-start:1"], options, 6)
    assert [encodes[u] for u in range(2, 6)] == [1, 1, 1, 1], encodes
    assert encodes[1] == 2 and encodes[0] in (1, 2), encodes
    assert served(out) == sorted(names)
    assert code == 2 and "taken over by another process and left to it" in err, err[-2000:]


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
