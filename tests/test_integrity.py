"""A damaged or tampered latent cache: every read is bit-identical or one VaekitError naming the unit, no read
leaves the cache folder, `vaekit cache verify` finds the damage, and `--repair` (or re-running encode) restores it.

The damage corpus is written once per session from one small cache: byte flips at chosen offsets,
truncation, header edits, index edits, card and catalog edits, absolute and `..` part names, links.
"""

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from imagegen import write_photos
from vaekit import cli
from vaekit.cache.dataset import LatentDataset, LatentStream
from vaekit.cache.format import index_digest, index_path, meta_digest, read_unit_meta, scan_units, write_index
from vaekit.cache.stats import cache_statistics
from vaekit.cache.verify import verify_cache
from vaekit.errors import VaekitError
from vaekit.io import host_tag

torch.set_num_threads(1)

FP32 = ("--compute_dtype", "fp32")
OPTIONS = ("--unit_size", "2", "--batch_size", "1", "--shard_size", "2", "--num_workers", "0", "--flip")


def encode(vae, data, out, *extra):
    """`vaekit encode` in this process on the tiny VAE (32 px, fp32 compute); returns the exit code."""
    return cli.main(["encode", "--vae", str(vae), "--data", str(data), "--out", str(out), "--resolution", "32",
                     "--quiet", *FP32, *OPTIONS, *[str(a) for a in extra]])


@pytest.fixture(scope="session")
def clean_cache(tmp_path_factory):
    """(cache, vae, images): 6 images in 3 units of 2 parts each, with flips and the posterior, never modified."""
    from vaekit.model import build_preset, save_diffusers

    root = tmp_path_factory.mktemp("integrity")
    torch.manual_seed(0)
    vae = save_diffusers(build_preset("tiny"), root / "vae")
    write_photos(root / "images", 6)
    assert encode(vae, root / "images", root / "cache") == 0
    return root / "cache", vae, root / "images"


def latents(cache, verify=False):
    """{(key, flip): (mean, logvar)} as stored, read through LatentDataset."""
    dataset = LatentDataset(cache, sample=False, normalize=False, flips="all", verify=verify)
    found = {}
    for i in range(len(dataset)):
        item = dataset[i]
        found[(item["key"], item["flip"])] = dataset.stored(i // 2, item["flip"])
    return found


@pytest.fixture(scope="session")
def reference(clean_cache):
    return latents(clean_cache[0])


def copy_cache(clean, folder):
    shutil.copytree(clean, folder, symlinks=True)
    return folder


def part_path(cache, unit, number=0):
    return cache / "units" / read_unit_meta(index_path(cache, unit))["parts"][number]


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x40
    path.write_bytes(bytes(data))


def header_length(path):
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def edit_header(path, change):
    """Rewrite a part's JSON header through `change(header)`, keeping the data bytes."""
    raw = path.read_bytes()
    length = header_length(path)
    header = json.loads(raw[8:8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def set_length(value):
    def damage(cache):
        path = part_path(cache, 1)
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", value) + raw[8:])
    return damage


def header_edit(change):
    return lambda cache: edit_header(part_path(cache, 1), change)


def set_dtype(header):
    header["mean/32x32"]["dtype"] = "BF16"


def grow_shape(header):
    header["mean/32x32"]["shape"][0] += 1


def offsets_beyond(header):
    header["mean/32x32"]["data_offsets"][1] += 10**6


def overlapping(header):
    header["logvar/32x32"]["data_offsets"] = list(header["mean/32x32"]["data_offsets"])


def swap_kinds(header):  # consistent: shapes, sizes and dtypes all still fit
    header["mean/32x32"], header["logvar/32x32"] = header["logvar/32x32"], header["mean/32x32"]


def rename_group(header):
    header["mean/64x64"] = header.pop("mean/32x32")


def drop_logvar(header):
    del header["logvar/32x32"]


def more_count(header):
    header["__metadata__"]["count"] = "5"


def edit_index(change, digest="keep"):
    """Rewrite unit 1's index through `change(columns, meta)`; digest: keep the written one, or forge it."""
    def damage(cache):
        path = index_path(cache, 1)
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        meta = json.loads(table.schema.metadata[b"vaekit"])
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        change(columns, meta)
        types = {name: table.schema.field(name).type for name in table.column_names}
        new = pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})
        if digest.startswith("forge"):
            meta["digest"] = index_digest(new)
        if digest == "forge-all":
            meta["meta_digest"] = meta_digest(meta)
        path.unlink()
        write_index(path, new.replace_schema_metadata({"vaekit": json.dumps(meta)}))
    return damage


def column_edit(name, value, row=0):
    def change(columns, meta):
        columns[name][row] = value
    return change


def swap_offsets(columns, meta):  # an image and its mirror exchanged: every offset still in range
    columns["offset"][0], columns["flip_offset"][0] = columns["flip_offset"][0], columns["offset"][0]


def meta_edit(field, value):
    def change(columns, meta):
        meta[field] = value
    return change


def part_name_edit(value):
    def change(columns, meta):
        meta["parts"][0] = value
        if meta.get("part_files"):
            meta["part_files"][0]["name"] = value
    return change


def edit_card(change):
    def damage(cache):
        card = json.loads((cache / "card.json").read_text())
        change(card)
        (cache / "card.json").write_text(json.dumps(card))
    return damage


def edit_catalog(column, value):
    def damage(cache):
        path = cache / "catalog.arrow"
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        columns[column][1] = value
        new = pa.table({n: pa.array(v, table.schema.field(n).type) for n, v in columns.items()})
        path.unlink()
        write_index(path, new.replace_schema_metadata(table.schema.metadata))
    return damage


def link_part_outside(cache):
    path = part_path(cache, 1)
    outside = cache.parent / "outside.safetensors"
    shutil.copy(part_path(cache, 2), outside)  # a well-formed part, outside the cache
    path.unlink()
    path.symlink_to(outside)


def index_to_link(cache):
    path = index_path(cache, 1)
    outside = cache.parent / "outside.arrow"
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)


def part_to_folder(cache):
    path = part_path(cache, 1)
    path.unlink()
    path.mkdir()


def sibling_part(cache):  # the unit's other part, copied over: same size, same header, other latents
    shutil.copy(part_path(cache, 1, 1), part_path(cache, 1, 0))


def other_units_index(cache):
    shutil.copy(index_path(cache, 2), index_path(cache, 1))


def cut(path_of, keep):
    def damage(cache):
        path = path_of(cache)
        raw = path.read_bytes()
        path.write_bytes(raw[:keep] if keep >= 0 else raw[:keep])
    return damage


def corrupt_json(cache):
    (cache / "card.json").write_text('{"format": "vaekit-lat')


def data_offset(cache):
    return 8 + header_length(part_path(cache, 1))


def flip_data(cache):
    flip_byte(part_path(cache, 1), data_offset(cache) + 5)


def flip_in(region):
    def damage(cache):
        path = index_path(cache, 1)
        raw = path.read_bytes()
        # The schema is written twice; readers read the footer's copy (the last).
        where = {"metadata": raw.rfind(b"signature"), "columns": raw.find(b"photo_002.png") + 3,
                 "footer": len(raw) - 12}[region]
        flip_byte(path, where)
    return damage


# (name, damage, what catches it: "read" = every read checks it, "verify" = only hashing finds it,
#  expected verify finding: ("unit", n) | ("card",) | ("catalog",) | ("none",))
CORPUS = [
    ("part-data-byte", flip_data, "verify", ("unit", 1)),
    ("part-last-byte", lambda c: flip_byte(part_path(c, 1), -1), "verify", ("unit", 1)),
    ("part-sibling-copied-over", sibling_part, "verify", ("unit", 1)),
    ("part-header-byte", lambda c: flip_byte(part_path(c, 1), 20), "read", ("unit", 1)),
    ("part-truncated", cut(lambda c: part_path(c, 1), -100), "read", ("unit", 1)),
    ("part-truncated-to-4", cut(lambda c: part_path(c, 1), 4), "read", ("unit", 1)),
    ("part-extended", lambda c: part_path(c, 1).open("ab").write(b"\0" * 64), "read", ("unit", 1)),
    ("part-missing", lambda c: part_path(c, 1).unlink(), "read", ("unit", 1)),
    ("part-header-length-2^63", set_length(2**63), "read", ("unit", 1)),
    ("part-header-length-2^64-1", set_length(2**64 - 1), "read", ("unit", 1)),
    ("part-header-length-6e9", set_length(6_000_000_000), "read", ("unit", 1)),
    ("part-header-length-0", set_length(0), "read", ("unit", 1)),
    ("part-dtype-bf16", header_edit(set_dtype), "read", ("unit", 1)),
    ("part-shape-grown", header_edit(grow_shape), "read", ("unit", 1)),
    ("part-offsets-beyond", header_edit(offsets_beyond), "read", ("unit", 1)),
    ("part-offsets-overlap", header_edit(overlapping), "read", ("unit", 1)),
    ("part-mean-logvar-swapped", header_edit(swap_kinds), "read", ("unit", 1)),
    ("part-group-renamed", header_edit(rename_group), "read", ("unit", 1)),
    ("part-logvar-dropped", header_edit(drop_logvar), "read", ("unit", 1)),
    ("part-count-edited", header_edit(more_count), "read", ("unit", 1)),
    ("part-link-outside", link_part_outside, "read", ("unit", 1)),
    ("part-is-folder", part_to_folder, "read", ("unit", 1)),
    ("index-metadata-byte", flip_in("metadata"), "read", ("unit", 1)),
    ("index-column-byte", flip_in("columns"), "read", ("unit", 1)),
    ("index-footer-byte", flip_in("footer"), "read", ("unit", 1)),
    ("index-truncated", cut(lambda c: index_path(c, 1), 100), "read", ("unit", 1)),
    ("index-empty", cut(lambda c: index_path(c, 1), 0), "read", ("unit", 1)),
    ("index-link-outside", index_to_link, "read", ("unit", 1)),
    ("index-of-another-unit", other_units_index, "read", ("unit", 1)),
    ("index-negative-offset", edit_index(column_edit("offset", -3)), "read", ("unit", 1)),
    ("index-offset-beyond", edit_index(column_edit("offset", 99)), "read", ("unit", 1)),
    ("index-null-key", edit_index(column_edit("key", None)), "read", ("unit", 1)),
    ("index-part-beyond", edit_index(column_edit("part", 7)), "read", ("unit", 1)),
    ("index-offsets-swapped", edit_index(swap_offsets), "read", ("unit", 1)),
    ("index-offsets-swapped-digest-forged", edit_index(swap_offsets, "forge"), "read", ("unit", 1)),
    ("index-offsets-swapped-all-digests-forged", edit_index(swap_offsets, "forge-all"), "read", ("catalog",)),
    ("index-claims-more-rows", edit_index(meta_edit("rows", 5)), "read", ("unit", 1)),
    ("index-absolute-part-name", edit_index(part_name_edit("/etc/hostname")), "read", ("unit", 1)),
    ("index-dotdot-part-name", edit_index(part_name_edit("../card.json")), "read", ("unit", 1)),
    ("index-other-units-part-name", edit_index(part_name_edit("u-00000002.p000.00.safetensors")), "read",
     ("unit", 1)),
    ("index-part-hash-edited", edit_index(lambda c, m: m["part_files"][0].update(bytes=3)), "read", ("unit", 1)),
    ("index-card-hash-edited", edit_index(meta_edit("card", "0" * 16)), "read", ("unit", 1)),
    ("index-missing", lambda c: index_path(c, 1).unlink(), "read", ("unit", 1)),
    ("card-unparseable", corrupt_json, "read", ("card",)),
    ("card-without-key", edit_card(lambda card: card.pop("key")), "read", ("card",)),
    ("card-scaling-not-a-number", edit_card(lambda card: card["key"].update(scaling_factor="abc")), "read",
     ("card",)),
    ("card-scaling-changed", edit_card(lambda card: card["key"].update(scaling_factor=0.5)), "read", ("card",)),
    ("card-store-mode", edit_card(lambda card: card["key"].update(store="mode")), "read", ("card",)),
    ("card-dtype-bf16", edit_card(lambda card: card["key"].update(dtype="bf16")), "read", ("card",)),
    ("card-channels", edit_card(lambda card: card["vae"].update(latent_channels=8)), "read", ("card",)),
    ("catalog-rows", edit_catalog("rows", 3), "read", ("catalog",)),
    ("catalog-token", edit_catalog("token", "ab"), "read", ("catalog",)),
    ("catalog-index-size", edit_catalog("index_bytes", 10), "read", ("catalog",)),
    ("catalog-truncated", cut(lambda c: c / "catalog.arrow", 200), "read", ("catalog",)),
    ("catalog-missing", lambda c: (c / "catalog.arrow").unlink(), "read", ("none",)),
]


@pytest.fixture(scope="session")
def corpus(clean_cache, tmp_path_factory):
    """{case name: damaged copy of the clean cache}, written once."""
    root = tmp_path_factory.mktemp("corpus")
    caches = {}
    for name, damage, _, _ in CORPUS:
        cache = copy_cache(clean_cache[0], root / name / "cache")
        damage(cache)
        caches[name] = cache
    return caches


@contextlib.contextmanager
def opened_files():
    """Record every path this process opens (an audit hook; installed once, switched on here)."""
    opened.clear()
    watching[0] = True
    try:
        yield opened
    finally:
        watching[0] = False


opened, watching = [], [False]


def audit(event, args):
    if watching[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        opened.append((os.path.abspath(os.fsdecode(args[0])), flags))


sys.addaudithook(audit)


def every_read(cache, verify=False):
    """Read the cache every way a user can: {(key, flip): (mean, logvar)} of what came back, and the errors."""
    found, errors = {}, []
    try:
        dataset = LatentDataset(cache, sample=False, normalize=False, flips="all", verify=verify)
    except VaekitError as e:
        return found, [str(e)]
    for i in range(len(dataset)):
        try:
            item = dataset[i]
            found[(item["key"], item["flip"])] = dataset.stored(i // 2, item["flip"])
        except VaekitError as e:
            errors.append(str(e))
    for call in (lambda: list(LatentStream(cache, batch_size=2, flips="all", sample=False)),
                 lambda: cache_statistics(cache)):
        try:
            call()
        except VaekitError as e:
            errors.append(str(e))
    return found, errors


def check_reads(name, cache, reference, verify):
    """Every read is bit-identical to the clean cache or a VaekitError naming the unit (or the card);
    nothing is opened outside the cache folder, nor through a link."""
    with opened_files() as files:
        found, errors = every_read(cache, verify)
    for key, (mean, logvar) in found.items():
        assert torch.equal(mean, reference[key][0]) and torch.equal(logvar, reference[key][1]), (name, key)
    for message in errors:
        assert "u-00000001" in message or "card.json" in message or "the cache" in message, (name, message)
        assert "\n" not in message
    inside = str(cache.resolve())
    for path, flags in files:
        if path.startswith(inside):
            assert flags & os.O_NOFOLLOW or not path.startswith(inside + "/units"), (name, path)
        else:
            assert path.startswith((sys.prefix, sys.base_prefix, "/proc", "/sys", "/dev", "/usr", "/etc/ld")), \
                (name, path)
    return found, errors


@pytest.mark.parametrize("name", [case[0] for case in CORPUS])
def test_every_read_of_a_damaged_cache_is_whole_or_one_error_naming_the_unit(name, corpus, reference, tmp_path):
    catches = {case[0]: case[2] for case in CORPUS}[name]
    cache = copy_cache(corpus[name], tmp_path / "cache")  # a reader may rebuild the catalog: keep the corpus as made
    found, errors = check_reads(name, cache, reference, verify=True)
    if catches == "read":
        found, errors = check_reads(name, cache, reference, verify=False)
    if name == "catalog-missing":
        assert not errors and found.keys() == reference.keys()
    elif name.startswith("catalog-"):
        assert found.keys() == reference.keys() or errors, name  # units listed instead, or the unit refused
    else:
        assert errors, f"{name}: nothing noticed the damage"


@pytest.mark.parametrize("name", [case[0] for case in CORPUS])
def test_verify_names_the_damage_of_each_case(name, corpus, tmp_path):
    expected = {case[0]: case[3] for case in CORPUS}[name]
    cache = copy_cache(corpus[name], tmp_path / "cache")
    try:
        report = verify_cache(cache, jobs=2, progress=False)
    except VaekitError as e:  # no card and no confirmed copy of it
        assert expected == ("card",) and "card.json" in str(e)
        return
    damaged = {d["unit"] for d in report["damaged"]}
    if expected[0] == "unit":
        assert damaged == {expected[1]}, (name, report["damaged"])
    elif expected[0] == "card":
        assert report["card"] and not damaged, (name, report)
    elif expected[0] == "catalog":
        assert report["catalog"] and not damaged, (name, report)
    else:
        assert not damaged and not report["card"]


def test_the_clean_cache_verifies_whole_and_reads_identically(clean_cache, reference, capsys):
    cache = clean_cache[0]
    assert cli.main(["cache", "verify", str(cache), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 units" in out and "the cache is whole" in out
    found, errors = check_reads("clean", cache, reference, verify=True)
    assert found.keys() == reference.keys() and not errors


# ----------------------------------------------------------------------------------------------
# Repair


def damage_every_unit(cache):
    """Latent data changed in unit 0, a part cut short in unit 1, an image and its mirror exchanged in unit 2's
    index, the card's scaling factor edited, the catalog's token edited, and a leftover part of a killed run."""
    flip_data_of(cache, 0)
    cut(lambda c: part_path(c, 1, 1), -50)(cache)
    edit_index_of(cache, 2, swap_offsets)
    edit_card(lambda card: card["key"].update(scaling_factor=0.5))(cache)
    edit_catalog("token", "ab")(cache)
    shutil.copy(part_path(cache, 0), cache / "units" / "u-00000000.p000.ffffffffffffffff0000.safetensors")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    staging = cache / "units" / f".u-00000001.h{host_tag()}p{dead.pid}.staging"  # a killed writer's
    staging.mkdir()
    (staging / "index.arrow").write_bytes(b"\0" * 10)


def flip_data_of(cache, unit):
    path = part_path(cache, unit)
    flip_byte(path, 8 + header_length(path) + 5)


def edit_index_of(cache, unit, change):
    path = index_path(cache, unit)
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns, None)
    new = pa.table({n: pa.array(v, table.schema.field(n).type) for n, v in columns.items()})
    path.unlink()
    write_index(path, new.replace_schema_metadata(table.schema.metadata))


def assert_same(cache, reference):
    found = latents(cache, verify=True)
    assert found.keys() == reference.keys()
    for key, (mean, logvar) in found.items():
        assert torch.equal(mean, reference[key][0]) and torch.equal(logvar, reference[key][1]), key


def test_verify_repair_moves_damage_aside_and_encodes_it_again_to_the_undamaged_cache(clean_cache, reference,
                                                                                     tmp_path, capsys):
    cache = copy_cache(clean_cache[0], tmp_path / "cache")
    damage_every_unit(cache)
    assert cli.main(["cache", "verify", str(cache), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert all(f"damaged: unit u-0000000{u}" in out for u in range(3)), out
    assert "card: " in out and "catalog: " in out and "leftovers: 1 file" in out and "--repair" in out

    assert cli.main(["cache", "verify", str(cache), "--repair", "--quiet", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "restored card.json" in out and "encoded again: 3 unit(s)" in out, out
    assert_same(cache, reference)
    assert cli.main(["cache", "verify", str(cache), "--quiet"]) == 0
    assert "the cache is whole" in capsys.readouterr().out
    (stamp,) = (cache / "quarantine").iterdir()
    assert sorted(p.name for p in stamp.iterdir()) == ["leftovers", "u-00000000", "u-00000001", "u-00000002"]
    moved = stamp / "u-00000001"
    assert (moved / "u-00000001.index.arrow").is_file() and len(list(moved.glob("*.safetensors"))) == 2
    assert "cut short" in json.loads((moved / "reason.json").read_text())["reason"]


def test_a_repair_killed_midway_is_finished_by_the_next_one(clean_cache, reference, tmp_path):
    cache = copy_cache(clean_cache[0], tmp_path / "cache")
    cut(lambda c: part_path(c, 1), -50)(cache)
    flip_data_of(cache, 2)
    command = [sys.executable, "-m", "vaekit.cli", "cache", "verify", str(cache), "--repair", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAEKIT_KILL_AT": "repair-moved:2"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr[-2000:]  # killed after unit 2's index moved, before its parts
    assert 1 not in scan_units(cache).indices and 2 not in scan_units(cache).indices

    assert cli.main(["cache", "verify", str(cache), "--quiet"]) == 1, "the moved units are missing"
    assert cli.main(["cache", "verify", str(cache), "--repair", "--quiet"]) == 0
    assert_same(cache, reference)
    assert cli.main(["cache", "verify", str(cache), "--quiet"]) == 0


def test_units_whose_source_is_gone_are_listed_as_lost_and_repaired_once_it_is_back(clean_cache, reference,
                                                                                    tmp_path, capsys):
    cache = copy_cache(clean_cache[0], tmp_path / "cache")
    cut(lambda c: part_path(c, 1), -50)(cache)
    assert cli.main(["cache", "verify", str(cache), "--repair", "--quiet", "--data", str(tmp_path / "gone")]) == 1
    out = capsys.readouterr().out
    assert "lost: unit u-00000001" in out and "Data not found" in out, out
    assert cli.main(["cache", "verify", str(cache), "--quiet"]) == 1
    assert "missing: unit u-00000001 was moved aside" in capsys.readouterr().out
    dataset = LatentDataset(cache, sample=False, normalize=False, flips="all")
    assert len(dataset) == 8, "the other units read on"
    assert cli.main(["cache", "verify", str(cache), "--repair", "--quiet"]) == 0  # the recorded source again
    assert_same(cache, reference)


def test_rerunning_encode_repairs_what_the_cheap_checks_find(clean_cache, reference, tmp_path, capsys):
    cache, vae, images = clean_cache
    cache = copy_cache(cache, tmp_path / "cache")
    cut(lambda c: part_path(c, 0), -50)(cache)
    header_edit(set_dtype)(cache)  # unit 1
    part_path(cache, 2, 1).unlink()
    capsys.readouterr()
    assert encode(vae, images, cache) == 0
    out = capsys.readouterr().out
    assert "3 unit(s) failed their checks and were encoded again" in out, out
    assert_same(cache, reference)
    summary = json.loads((cache / "summary.json").read_text())
    assert summary["units_repaired"] == 3 and summary["encoded"] == 6

    flip_data_of(cache, 1)  # content only: sizes and headers intact, so encode's cheap checks pass it
    assert encode(vae, images, cache) == 0
    assert json.loads((cache / "summary.json").read_text())["units_unchanged"] == 3
    assert [d["unit"] for d in verify_cache(cache, progress=False)["damaged"]] == [1], "verify's hashes find it"


def strip_checksums(cache):
    """The cache as vaekit wrote it before checksums (format 2.0): no minor version, no part records or digests,
    a catalog of (unit, rows, token)."""
    card = json.loads((cache / "card.json").read_text())
    for field in ("minor", "encode"):
        card.pop(field, None)
    (cache / "card.json").write_text(json.dumps(card))
    for unit in range(3):
        path = index_path(cache, unit)
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        meta = json.loads(table.schema.metadata[b"vaekit"])
        for field in ("minor", "part_files", "digest", "meta_digest", "card"):
            meta.pop(field)
        path.unlink()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table.replace_schema_metadata({"vaekit": json.dumps(meta)}))
    old = pa.table({"unit": pa.array([0, 1, 2], pa.int64()), "rows": pa.array([2, 2, 2], pa.int64()),
                    "token": pa.array([read_unit_meta(index_path(cache, u))["token"] for u in range(3)])})
    (cache / "catalog.arrow").unlink()
    with pa.OSFile(str(cache / "catalog.arrow"), "wb") as sink, pa.ipc.new_file(sink, old.schema) as writer:
        writer.write_table(old)


def test_a_cache_written_before_checksums_opens_with_a_note_and_resumes_without_redoing(clean_cache, reference,
                                                                                        tmp_path, capsys):
    cache, vae, images = clean_cache
    cache = copy_cache(cache, tmp_path / "cache")
    strip_checksums(cache)
    with pytest.warns(UserWarning, match="before cache checksums") as notes:
        found = latents(cache)
    assert len(notes) == 1, "one note per cache"
    assert found.keys() == reference.keys()
    assert all(torch.equal(found[k][0], reference[k][0]) for k in found)
    cut(lambda c: part_path(c, 1), -50)(cache)  # sizes and headers are still checked
    with pytest.raises(VaekitError, match="u-00000001"):
        latents(cache)
    assert encode(vae, images, cache) == 0
    summary = json.loads((cache / "summary.json").read_text())
    assert (summary["units_unchanged"], summary["units_repaired"]) == (2, 1), "only the damaged unit redone"
    report = verify_cache(cache, progress=False)
    assert report["without_checksums"] and not report["damaged"]


def test_verify_of_what_is_no_cache_is_one_line_saying_so(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("not a cache")
    (tmp_path / "empty").mkdir()
    for path, said in ((tmp_path / "missing", "is no folder"), (tmp_path / "file.txt", "is no folder"),
                       (tmp_path / "empty", "is not a latent cache")):
        assert cli.main(["cache", "verify", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
