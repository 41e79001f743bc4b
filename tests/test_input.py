"""What `vaekit encode` and `vaekit reconstruct` read: stalled shards, huge files, odd tar members, repeated keys.

Every case ends with each image encoded or listed with its reason, no raw traceback, no hang and
no command of a `pipe:` shard left running.
"""

import gzip
import io
import json
import os
import re
import resource
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import torch

from imagegen import make_photo, write_photos
from test_encode import FP32, encode, subprocess_env, vae_dir  # noqa: F401  (vae_dir: a fixture used here)
from vaekit.cache.dataset import LatentDataset
from vaekit.cache.format import list_units, read_unit_meta
from vaekit.cli import main
from vaekit.data.decode import ImageError, decode_image, read_image_file
from vaekit.data.shards import shard_samples
from vaekit.data.sources import open_source
from vaekit.errors import describe_exception

torch.set_num_threads(1)

pytestmark = pytest.mark.usefixtures("fresh_accelerate")

ROOT = Path(__file__).resolve().parents[1]


def png(seed, size=40):
    """PNG bytes of a small photo."""
    buffer = io.BytesIO()
    make_photo(size, size, seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


def add_member(tar, name, data=None, kind=tarfile.REGTYPE, **fields):
    """Add a member of any type to an open tar (data for regular files)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    for field, value in fields.items():
        setattr(info, field, value)
    if data is not None:
        info.size = len(data)
    tar.addfile(info, io.BytesIO(data) if data is not None else None)


def write_good_shard(path, count, prefix="g", seed=0):
    """A plain tar shard of `count` PNG samples keyed {prefix}000...; returns its path."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            add_member(tar, f"{prefix}{i:03d}.png", png(seed + i))
            add_member(tar, f"{prefix}{i:03d}.txt", b"a caption")
    return path


def errors_of(out):
    """errors.jsonl as a list of dicts."""
    return [json.loads(line) for line in (Path(out) / "errors.jsonl").read_text().splitlines()]


def running(marker):
    """Processes on this machine whose command line holds `marker` (a stalled command left behind)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in command and state != "Z":
            found.append(command)
    return found


def run_vaekit(args, timeout=240, limit_address_space=None):
    """vaekit in a subprocess (a hang fails the test), optionally under an address-space limit in bytes."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_address_space, limit_address_space))

    return subprocess.run([sys.executable, "-m", "vaekit", *map(str, args)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, preexec_fn=limit if limit_address_space else None)


# ---------------------------------------------------------------------------------------------------
# Stalls


def test_a_stalled_pipe_shard_is_given_up_while_the_good_shards_publish(tmp_path, vae_dir):
    good = write_good_shard(tmp_path / "good.tar", 6)
    write_good_shard(tmp_path / "other.tar", 3, prefix="o", seed=10)
    # A command that never writes, one that stops midway, and two good shards (more chunks than one)
    spec = (f"pipe:cat {good}::pipe:sleep 987::pipe:head -c 3000 {tmp_path / 'other.tar'}; sleep 986"
            f"::{tmp_path / 'other.tar'}")
    out = tmp_path / "cache"
    done = run_vaekit(["encode", "--vae", vae_dir, "--data", spec, "--out", out, "--resolution", 32, *FP32,
                       "--batch_size", 2, "--num_workers", 2, "--read_timeout", 2], timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("vaekit encode: error: 2 unit(s)") and "unreadable shard (stalled)" in message
    assert "run the same command again" in message and "Traceback" not in done.stderr
    assert "reading good.tar" in done.stderr or "reading pipe:sleep 987" in done.stderr  # the progress line
    assert sorted(list_units(out)) == [0, 3]
    stalled = {e["path"]: e for e in errors_of(out) if e["reason"] == "unreadable shard (stalled)"}
    assert set(stalled) == {"pipe:sleep 987", f"pipe:head -c 3000 {tmp_path / 'other.tar'}; sleep 986"}
    assert "no data for 2 s after 0 bytes" in stalled["pipe:sleep 987"]["detail"]
    assert not running("sleep 98"), "a stalled command was left running"
    keys = LatentDataset(out).keys
    assert sorted(keys) == [f"g{i:03d}" for i in range(6)] + [f"o{i:03d}" for i in range(3)]


def test_shard_reads_time_out_count_bytes_and_stop_the_whole_command(tmp_path):
    good = write_good_shard(tmp_path / "good.tar", 3)
    counts = []
    samples = list(shard_samples(f"pipe:cat {good}", timeout=5, on_read=counts.append))
    assert [key for key, _ in samples] == ["g000", "g001", "g002"] and counts[-1] == good.stat().st_size
    # All of the tar arrives, but the command never ends: a background child keeps its output open.
    url = f"pipe:sleep 985 & cat {good}; wait"
    read = []
    with pytest.raises(ImageError, match="unreadable shard \\(stalled\\).*did not exit within 1 s") as caught:
        for key, _ in shard_samples(url, timeout=1):
            read.append(key)
    assert read == ["g000", "g001", "g002"] and caught.value.reason == "unreadable shard (stalled)"
    assert not running("sleep 985"), "the command's child outlived it"
    # Stopping early (a consumer that has what it needs) stops the command at once.
    samples = shard_samples(f"pipe:cat {good}; sleep 984", timeout=60)
    next(samples)
    samples.close()
    assert not running("sleep 984")


def test_the_progress_line_names_the_shards_being_read_with_their_bytes_and_silence(tmp_path):
    from vaekit.cache.units import ShardPlan, UnitStream, reading_text

    shards = [write_good_shard(tmp_path / f"s{i}.tar", 1) for i in range(4)]
    stream = UnitStream(ShardPlan("::".join(map(str, shards))), [0, 1, 2, 3], preparer=None, batch_size=1)
    now = time.monotonic()
    stream.reading[0] = torch.tensor([2, 5000, now - 100], dtype=torch.float64)  # done: not shown
    stream.reading[1] = torch.tensor([1, 12_300_000, now - 1], dtype=torch.float64)
    stream.reading[2] = torch.tensor([1, 0, now - 41], dtype=torch.float64)  # silent for 41 s: shown first
    assert reading_text(stream) == "reading s2.tar 0 B (no data for 41 s), s1.tar 12.3 MB"
    stream.reading[3] = torch.tensor([1, 2048, now], dtype=torch.float64)
    assert reading_text(stream).endswith(", 1 more")


# ---------------------------------------------------------------------------------------------------
# Every fault is one plain line


def test_shard_faults_are_one_plain_line_without_object_reprs(tmp_path, vae_dir, capsys):
    good = write_good_shard(tmp_path / "good.tar", 2)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:700])
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(200))
    spec = (f"{good}::{cut}::{tmp_path / 'bad.tar.gz'}::pipe:cat {good}; exit 3::pipe:cat {tmp_path / 'nothing.tar'}"
            f"::pipe:sleep 983")
    out = tmp_path / "cache"
    assert encode(vae_dir, spec, out, "--num_workers", 0, "--read_timeout", 1) == 2
    printed = capsys.readouterr()
    failures = {e["path"]: e for e in errors_of(out) if e["key"] is None}
    assert len(failures) == 5
    assert failures[f"pipe:cat {good}; exit 3"]["detail"] == "its command exited with status 3"
    assert failures[f"pipe:cat {tmp_path / 'nothing.tar'}"]["detail"] == "its command exited with status 1"
    texts = [printed.out, printed.err, (out / "errors.jsonl").read_text()]
    texts += [f"{e['reason']} ({e['detail']})" for e in failures.values()]
    assert not [t for t in texts if "object at 0x" in t]
    assert len(printed.err.strip().splitlines()) == 1

    # The root: a library exception that carries objects (as webdataset appends its stream to args)
    class Stream:
        pass

    error = OSError("unexpected end of data", Stream(), "pipe:cat x.tar")
    assert "object at 0x" in str(error) and "object at 0x" not in describe_exception(error)
    assert "object at 0x" not in str(ImageError("unreadable shard", "x.tar", f"{error}\nsecond line"))
    assert "\n" not in str(ImageError("unreadable shard", "x.tar", f"{error}\nsecond line"))


# ---------------------------------------------------------------------------------------------------
# Bounded reads


@pytest.fixture
def folder_with_a_huge_file(tmp_path):
    """Three photos beside a sparse 20 GB huge.jpg (no disk used) whose first bytes are a JPEG's."""
    folder = tmp_path / "images"
    write_photos(folder, 3, size=(40, 40))
    with open(folder / "huge.jpg", "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(20 * 1024 ** 3)
    return folder


def test_a_huge_file_is_refused_by_its_size_without_being_read(folder_with_a_huge_file, tmp_path, vae_dir):
    huge = folder_with_a_huge_file / "huge.jpg"
    expected = f"too many bytes ({20 * 1024 ** 3} > {1024 ** 3})"
    source = open_source(str(folder_with_a_huge_file))
    for read in (lambda: read_image_file(huge), lambda: decode_image(huge),
                 lambda: source[source.keys().index("huge.jpg")].decode()):
        with pytest.raises(ImageError) as caught:
            read()
        assert caught.value.reason == expected
    with pytest.raises(ImageError, match=re.escape("too many bytes (4 > 3)")):
        decode_image(b"\xff\xd8\xff\xe0", max_bytes=3)

    # The whole run under an 8 GB address-space limit: reading the file would need 20 GB.
    out = tmp_path / "cache"
    done = run_vaekit(["encode", "--vae", vae_dir, "--data", folder_with_a_huge_file, "--out", out, "--resolution", 32,
                       "--num_workers", 1, "--quiet", *FP32], limit_address_space=8 * 1024 ** 3)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [(e["key"], e["reason"]) for e in errors_of(out)] == [("huge.jpg", expected)]
    assert len(LatentDataset(out)) == 3
    # A lower limit from the command line
    assert encode(vae_dir, folder_with_a_huge_file, tmp_path / "small", "--max_image_bytes", "1K") == 0
    assert {e["reason"] for e in errors_of(tmp_path / "small")} == {f"too many bytes ({20 * 1024 ** 3} > 1024)"} | {
        f"too many bytes ({(folder_with_a_huge_file / name).stat().st_size} > 1024)"
        for name in os.listdir(folder_with_a_huge_file) if name != "huge.jpg"}


def test_every_command_that_decodes_skips_a_huge_file(folder_with_a_huge_file, tmp_path, capsys):
    assert main(["evaluate", "--vae", "preset:tiny", "--data", str(folder_with_a_huge_file), "--out",
                 str(tmp_path / "eval"), "--resolution", "32", "--no-lpips", "--no-rfid", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["data"]["images"] == 3 and [s["key"] for s in metrics["data"]["skipped"]] == ["huge.jpg"]
    assert main(["inspect", "--vae", "preset:tiny", "--data", str(folder_with_a_huge_file), "--size", "32", "--quiet",
                 "--out", str(tmp_path / "inspect")]) == 0
    assert [s["key"] for s in json.loads((tmp_path / "inspect" / "inspect.json").read_text())["skipped"]] == \
        ["huge.jpg"]
    capsys.readouterr()
    assert main(["reconstruct", "--vae", "preset:tiny", str(folder_with_a_huge_file / "huge.jpg"),
                 str(folder_with_a_huge_file / "photo_000.png"), "--out", str(tmp_path / "recon"), "--tile", "off"]) == 1
    assert "huge.jpg" in capsys.readouterr().out and (tmp_path / "recon" / "photo_000.png").is_file()
    from vaekit.data.config import DataConfig
    from vaekit.data.training import build_train_val

    train, _ = build_train_val(DataConfig(path=str(folder_with_a_huge_file), size=32, holdout=0,
                                          max_image_bytes=10 ** 9))
    assert [train[i].get("error") for i in range(len(train))].count(f"too many bytes ({20 * 1024 ** 3} > {10 ** 9})") \
        == 1


def gzipped_tar_with_a_huge_member(path, size, good=2):
    """A .tar.gz of `good` small PNG samples, then a `size`-byte member of zeros (big.png), compressed in pieces."""
    body = io.BytesIO()
    tar = tarfile.open(fileobj=body, mode="w", format=tarfile.USTAR_FORMAT)
    for i in range(good):
        add_member(tar, f"s{i}.png", png(i))
    head = body.getvalue()  # the members so far; the end of the archive is only written on close
    info = tarfile.TarInfo("big.png")
    info.size = size
    stream = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: gzip framing
    with open(path, "wb") as f:
        f.write(stream.compress(head + info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")))
        block, left = bytes(1 << 20), size + (-size % 512) + 2 * 512  # the data, its padding, two end blocks
        while left:
            f.write(stream.compress(block[:min(left, len(block))]))
            left -= min(left, len(block))
        f.write(stream.flush())
    return path


def test_a_tar_gz_member_over_the_byte_limit_is_listed_and_the_others_encoded(tmp_path, vae_dir):
    shard = gzipped_tar_with_a_huge_member(tmp_path / "small.tar.gz", 1024 ** 2)
    out = tmp_path / "cache"
    assert encode(vae_dir, shard, out, "--num_workers", 0, "--max_image_bytes", "64K") == 0
    assert [(e["key"], e["reason"], e["path"]) for e in errors_of(out)] == \
        [("big", f"too many bytes ({1024 ** 2} > {64 * 1024})", str(shard))]
    assert sorted(LatentDataset(out).keys) == ["s0", "s1"]


def test_a_tar_gz_with_a_bad_checksum_is_an_unreadable_shard(tmp_path):
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        add_member(tar, "a.png", png(0))
    data = bytearray(gzip.compress(body.getvalue() + bytes(64 * 1024)))  # padded after the end marker, as tars are
    data[-8] ^= 0xFF  # the CRC32 in the gzip trailer, past what tarfile reads
    shard = tmp_path / "bad-crc.tar.gz"
    shard.write_bytes(bytes(data))
    with pytest.raises(ImageError) as caught:
        list(shard_samples(str(shard)))
    assert caught.value.reason == "unreadable shard" and "CRC" in str(caught.value)


def test_a_command_that_goes_on_writing_after_a_valid_tar_gz_is_stopped(tmp_path):
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        add_member(tar, "a.png", png(0))
    shard = tmp_path / "good.tar.gz"
    shard.write_bytes(gzip.compress(body.getvalue()))
    # gzip skips zeros after a member as padding, and bytes keep coming, so no read timeout fires
    # (8 MiB of them here; a command can write them for ever)
    found = []
    with pytest.raises(ImageError) as caught:
        for key, data in shard_samples(f"pipe:cat {shard}; head -c 8388608 /dev/zero", timeout=30):
            found.append((key, len(data)))
    assert found == [("a", len(png(0)))]
    assert caught.value.reason == "unreadable shard" and "after the end of its tar archive" in str(caught.value)


@pytest.mark.parametrize("suffix,compress", [(".tar.bz2", "bz2"), (".tar.xz", "lzma")])
def test_bzip2_and_xz_shards_in_a_folder_are_found_and_streamed(tmp_path, suffix, compress):
    import bz2
    import lzma

    from vaekit.data.shards import expand_shards
    from vaekit.data.streaming import is_streamed

    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        add_member(tar, "a.png", png(0))
    folder = tmp_path / "shards"
    folder.mkdir()
    shard = folder / f"part{suffix}"
    shard.write_bytes({"bz2": bz2, "lzma": lzma}[compress].compress(body.getvalue()))
    assert expand_shards(folder) == [str(shard)]
    assert is_streamed(folder) and is_streamed(shard)
    assert [(key, len(data)) for key, data in shard_samples(str(shard))] == [("a", len(png(0)))]


PEAK_RSS = """
import resource, sys
import webdataset  # what reading a shard imports (torch among it): the baseline
from vaekit.data.shards import shard_samples
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
found = [(key, data.reason if isinstance(data, Exception) else len(data))
         for key, data in shard_samples(sys.argv[1], max_bytes=int(sys.argv[2]))]
print(found)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


def test_a_huge_tar_member_is_skipped_over_without_being_held(tmp_path):
    size = 300 * 1024 ** 2
    shard = gzipped_tar_with_a_huge_member(tmp_path / "small.tar.gz", size)
    assert shard.stat().st_size < 2 * 1024 ** 2
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(shard), str(1024 ** 2)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    found, growth = done.stdout.splitlines()
    assert eval(found) == [("s0", len(png(0))), ("s1", len(png(1))), ("big", f"too many bytes ({size} > 1048576)")]
    assert int(growth) < 64 * 1024 ** 2, f"memory grew {int(growth) >> 20} MB while skipping a {size >> 20} MB member"


PEAK_OF_CHILD = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_a_three_gigabyte_member_of_a_small_tar_gz_is_encoded_around_in_low_memory(tmp_path, vae_dir):
    size = 3 * 1024 ** 3
    shard = gzipped_tar_with_a_huge_member(tmp_path / "small.tar.gz", size)
    out = tmp_path / "cache"
    # A fresh parent for the run, so its peak is that of the run's own processes (main and workers).
    command = [sys.executable, "-m", "vaekit", "encode", "--vae", vae_dir, "--data", str(shard), "--out", str(out),
               "--resolution", "32", "--quiet", "--num_workers", "1", *FP32]
    done = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(done.stdout.split()[-1])
    assert peak < 2 * 1024 ** 3, f"peak RSS {peak >> 20} MB (an encode of small images peaks near 1.2 GB)"
    assert [(e["key"], e["reason"]) for e in errors_of(out)] == [("big", f"too many bytes ({size} > {1024 ** 3})")]
    assert sorted(LatentDataset(out).keys) == ["s0", "s1"]


# ---------------------------------------------------------------------------------------------------
# Every member accounted for, keys unique


def write_odd_shards(folder):
    """shard-0.tar and shard-1.tar: good samples, each kind of odd member, and keys repeated inside and across."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "shard-0.tar", "w") as tar:
        add_member(tar, "a.png", png(1))
        add_member(tar, "b.png", png(2))
    with tarfile.open(folder / "shard-1.tar", "w") as tar:
        add_member(tar, "sub", kind=tarfile.DIRTYPE)  # a folder entry: tar structure, not a sample
        add_member(tar, "a.png", png(3))  # shard-0 has the key a
        add_member(tar, "c.png", png(4))
        add_member(tar, "link.jpg", kind=tarfile.SYMTYPE, linkname="c.png")
        add_member(tar, "hard.jpg", kind=tarfile.LNKTYPE, linkname="c.png")
        add_member(tar, "dev.jpg", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add_member(tar, "fifo.jpg", kind=tarfile.FIFOTYPE)
        add_member(tar, "dir.jpg", kind=tarfile.DIRTYPE)
        add_member(tar, ".hidden.jpg", png(5))
        add_member(tar, "sub/.x.jpg", png(6))
        add_member(tar, "README", b"no extension")
        add_member(tar, "caption.txt", b"a sample without an image")
        add_member(tar, "d.png", png(7))
        add_member(tar, "e.png", png(8))
        add_member(tar, "d.jpg", png(9))  # d again, after e: a repeated key inside the shard
        add_member(tar, "f.png", png(10))
        add_member(tar, "f.png", png(11))  # the same member twice in one sample
        add_member(tar, "g.png", png(12))
        add_member(tar, "g.jpg", kind=tarfile.SYMTYPE, linkname="g.png")  # a link beside a good image
    return folder


ODD_MEMBERS = {
    ("link", "not a regular file (symlink)"), ("hard", "not a regular file (hardlink)"),
    ("dev", "not a regular file (device)"), ("fifo", "not a regular file (fifo)"),
    ("dir", "not a regular file (directory)"), (".hidden.jpg", "hidden member"), ("sub/.x.jpg", "hidden member"),
    ("README", "member without extension"), ("caption", "no image member"), ("d", "duplicate key"),
    ("f.png", "repeated member"), ("g.jpg", "not a regular file (symlink)"),
}


def test_every_tar_member_is_encoded_or_listed_and_keys_stay_unique(tmp_path, vae_dir):
    shards = write_odd_shards(tmp_path / "shards")
    out = tmp_path / "cache"
    assert encode(vae_dir, shards, out, "--num_workers", 2) == 0
    errors = errors_of(out)
    listed = {(e["key"], e["reason"]) for e in errors}
    assert listed == ODD_MEMBERS | {("a", "duplicate key (renamed)")}
    assert all(e["path"] == str(shards / "shard-1.tar") for e in errors)
    renamed = next(e for e in errors if e["reason"] == "duplicate key (renamed)")
    assert renamed["detail"] == "stored as a@shard-1.tar: the earlier shard shard-0.tar has the key a"
    dataset = LatentDataset(out)
    assert sorted(dataset.keys) == ["a", "a@shard-1.tar", "b", "c", "d", "e", "f", "g"]
    assert len(set(dataset.keys)) == len(dataset)

    # The same rule when the shards are indexed (train, evaluate, inspect read plain tars this way)
    source = open_source(str(shards))
    assert sorted(source.keys()) == sorted(dataset.keys)
    assert {(s["key"], s["reason"]) for s in source.skipped} == ODD_MEMBERS
    assert [(r["key"], r["reason"]) for r in source.renamed] == [("a", "duplicate key (renamed)")]
    assert source[source.keys().index("a@shard-1.tar")].read_bytes() == png(3)

    # A re-run changes nothing; once the earlier shard no longer has the key, the later sample gets it back.
    unit_one = list_units(out)[1]
    token, written = read_unit_meta(unit_one)["token"], unit_one.stat().st_mtime_ns
    assert encode(vae_dir, shards, out) == 0
    assert errors_of(out) == errors and unit_one.stat().st_mtime_ns == written  # not even rewritten
    with tarfile.open(shards / "shard-0.tar", "w") as tar:
        add_member(tar, "b.png", png(2))
    assert encode(vae_dir, shards, out) == 0
    assert sorted(LatentDataset(out).keys) == ["a", "b", "c", "d", "e", "f", "g"]
    assert read_unit_meta(unit_one)["token"] == token and "renamed" not in read_unit_meta(unit_one)
    assert {(e["key"], e["reason"]) for e in errors_of(out)} == ODD_MEMBERS


def test_a_key_in_many_shards_is_kept_by_the_first_and_renamed_in_each_later_one(tmp_path, vae_dir):
    from vaekit.cache.keys import overlapping

    assert list(overlapping([("a", "c", 0), ("d", "f", 1), ("e", "g", 2), ("h", "h", 3), ("b", "b", 4)])) == \
        [[0, 4], [1, 2]]  # only units whose key ranges overlap are read
    for i, (folder, keys) in enumerate([("x", ["k", "m"]), ("y", ["k", "z"]), ("x2", ["a", "k"])]):
        (tmp_path / folder).mkdir()
        with tarfile.open(tmp_path / folder / "part.tar", "w") as tar:  # the same file name in every folder
            for j, key in enumerate(keys):
                add_member(tar, f"{key}.png", png(10 * i + j))
    out = tmp_path / "cache"
    spec = "::".join(str(tmp_path / folder / "part.tar") for folder in ("x", "y", "x2", "y"))  # y/ listed twice
    assert encode(vae_dir, spec, out, "--num_workers", 0) == 0
    assert sorted(LatentDataset(out).keys) == ["a", "k", "k@part.tar#1", "k@part.tar#2", "k@part.tar#3", "m", "z",
                                               "z@part.tar#3"]
    stored = {e["detail"].split(":")[0] for e in errors_of(out) if e["reason"] == "duplicate key (renamed)"}
    assert stored == {"stored as k@part.tar#1", "stored as k@part.tar#2", "stored as k@part.tar#3",
                      "stored as z@part.tar#3"}


# ---------------------------------------------------------------------------------------------------
# reconstruct over a corpus


def test_reconstruct_of_a_corpus_glob_takes_folders_and_skips_what_it_cannot_read(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_photos(corpus, 2, size=(40, 32))
    write_photos(corpus / "sub", 2, size=(32, 40), seed=5)
    (corpus / "sub" / "deeper").mkdir()
    make_photo(24, 24, seed=9).save(corpus / "sub" / "deeper" / "photo_000.png")
    (corpus / "empty").mkdir()
    os.mkfifo(corpus / "pipe.png")  # reading it would block forever
    os.mkfifo(corpus / "sub" / "inner.png")
    (corpus / "notes.txt").write_text("not an image")
    out = tmp_path / "recon"
    args = sorted(str(p) for p in corpus.iterdir())  # what the shell makes of corpus/*
    assert main(["reconstruct", "--vae", "preset:tiny", *args, "--out", str(out), "--tile", "off"]) == 1
    printed = capsys.readouterr().out
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["photo_000.png", "photo_001.png", "sub/deeper/photo_000.png", "sub/photo_000.png",
                       "sub/photo_001.png"]
    from PIL import Image

    with Image.open(out / "sub" / "deeper" / "photo_000.png") as img:
        assert img.size == (24, 24)
    for name, reason in [("pipe.png", "not a regular file"), ("inner.png", "not a regular file (fifo)"),
                         ("empty", "a folder without images"), ("notes.txt", "not an image")]:
        assert re.search(f"skipped .*{re.escape(name)}: .*{re.escape(reason)}", printed), (name, printed)
    assert "4 of 9 image(s) could not be read and were skipped" in printed
    assert "Traceback" not in printed
