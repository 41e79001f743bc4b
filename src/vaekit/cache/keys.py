"""Keys repeated across WebDataset shards: found when a run ends, and made unique by renaming.

Keys are unique in a cache. Inside one shard, the encoder keeps the first sample of a key and lists
any later one (`vaekit.data.shards.tar_samples`). Across shards no unit can know the others' keys
(each may be encoded on another rank, in another run), so the process that finalises a run looks
for keys held by more than one unit: each unit's index is sorted by key, so only units whose key
ranges overlap can share one, and only those units' keys are read (a cache whose shards hold
disjoint key ranges, the usual case, costs one small read per unit). The unit with the lowest
number (the shard listed first) keeps the key; in every later one the sample is renamed
`KEY@SHARD` (`vaekit.data.shards.renamed_key`, the rule indexed tar sources follow as well), its
index rewritten under the unit's lock, and the rename listed in the unit's errors (so in
errors.jsonl). A rewritten index remembers the original keys, so a rename is undone when the
earlier shard no longer has the key; every other column, the parts and the run token stay as they
were.
"""

import json
import shutil
from pathlib import Path

import numpy as np

from vaekit.cache.format import (arrow_errors, index_path, index_table, invalidate_catalog, list_units, lock_path,
                                 open_index, publish, staging_dir, write_index)
from vaekit.data.shards import RENAMED_KEY, renamed_key, shard_labels
from vaekit.errors import VaekitError
from vaekit.io import ensure_folder
from vaekit.locks import release, try_lock


def rename_repeated_keys(out, plan, stale_after=600.0):
    """Rename samples whose key an earlier shard's unit holds (see the module docstring); returns how many
    samples are stored under another key than their own. Units locked by a running process are left
    for the run that finishes them; `stale_after` is the lock timeout."""
    if plan.kind != "shards":
        return 0  # indexed sources give unique keys when they are opened
    labels = shard_labels(plan.urls)
    units = {unit: path for unit, path in list_units(out).items() if unit < len(labels)}
    spans, renamed_before = [], []
    for unit, path in list(units.items()):
        try:
            span, renamed = key_range(path)
        except VaekitError:  # damaged: left to the readers' checks and `vaekit cache verify`
            del units[unit]
            continue
        if span is not None:
            spans.append((*span, unit))
        if renamed:
            renamed_before.append(unit)
    wanted = {}  # unit -> {original key: unit that has it first}
    for group in overlapping(spans):
        for unit, key, first in later_repeats(group, units):
            wanted.setdefault(unit, {})[key] = first
    count = 0
    for unit in sorted(set(wanted) | set(renamed_before)):
        count += rewrite_keys(out, unit, units[unit], wanted.get(unit, {}), plan.urls, labels, stale_after)
    return count


def read_index(path):
    """(index table, metadata, original keys as an Arrow array) of a unit."""
    import pyarrow as pa  # pyarrow is large; only a finalising run needs it here

    try:
        table, _ = open_index(path)
        meta = json.loads(table.schema.metadata[b"vaekit"])
    except arrow_errors() as e:  # damaged: the reader's checks and `vaekit cache verify` report it
        raise VaekitError(f"Cannot read the unit index {path} ({type(e).__name__})") from None
    keys = table.column("key").combine_chunks()
    if meta.get("renamed"):
        keys = pa.array([meta["renamed"].get(k, k) for k in keys.to_pylist()], pa.string())
    return table, meta, keys


def key_range(path):
    """((first, last) original key of a unit or None when it is empty, whether it stores renamed keys)."""
    import pyarrow.compute as pc  # see read_index

    table, meta, keys = read_index(path)
    if not len(keys):
        return None, bool(meta.get("renamed"))
    if meta.get("renamed"):  # stored keys are sorted, original ones need not be
        bounds = pc.min_max(keys)
        return (bounds["min"].as_py(), bounds["max"].as_py()), True
    return (keys[0].as_py(), keys[len(keys) - 1].as_py()), False


def overlapping(spans):
    """Groups (lists of units, two or more) whose key ranges overlap, from (first, last, unit) triples."""
    group, end = [], None
    for first, last, unit in sorted(spans):
        if group and first > end:
            if len(group) > 1:
                yield group
            group = []
        end = last if not group else max(end, last)
        group.append(unit)
    if len(group) > 1:
        yield group


def later_repeats(group, units):
    """(unit, original key, unit that has it first) of every repeat of a key among the units of `group`."""
    import pyarrow as pa  # sorting in Arrow: the keys never become Python objects all at once
    import pyarrow.compute as pc

    columns, owners = [], []
    for unit in group:
        _, _, keys = read_index(units[unit])
        columns.append(keys)
        owners.append(pa.array(np.full(len(keys), unit, np.int64)))
    table = pa.table({"key": pa.chunked_array(columns, pa.string()), "unit": pa.chunked_array(owners, pa.int64())})
    table = table.sort_by([("key", "ascending"), ("unit", "ascending")])
    keys, owner = table.column("key").combine_chunks(), table.column("unit").to_numpy()
    if len(keys) < 2:
        return
    same = np.concatenate([[False], pc.equal(keys.slice(1), keys.slice(0, len(keys) - 1)).to_numpy(
        zero_copy_only=False)])  # same[i]: key i equals key i - 1
    start = np.maximum.accumulate(np.where(same, 0, np.arange(len(keys))))  # where each key's run begins
    for i in same.nonzero()[0]:
        yield int(owner[i]), keys[int(i)].as_py(), int(owner[start[i]])


def rewrite_keys(out, unit, path, wanted, urls, labels, stale_after):
    """Store a unit's samples under their own keys, except those in `wanted` ({original key: unit that has it
    first}), stored as KEY@SHARD; rewrites the index only if that changes it. Returns the number renamed
    (0 when a running process holds the unit: its own run ends with this check)."""
    lock = lock_path(out, unit)
    ensure_folder(Path(lock).parent)
    record = try_lock(lock, stale_after)
    if record is None:
        return 0
    try:
        try:
            table, meta, original = read_index(path)
        except VaekitError:
            return 0  # an unreadable index is redone by the next run, which checks its keys again
        new = {key: renamed_key(key, labels[unit]) for key in wanted}
        keys = [new.get(key, key) for key in original.to_pylist()]
        if keys == table.column("key").to_pylist():
            return len(new)
        rows = table.to_pylist()
        for row, key in zip(rows, keys):
            row["key"] = key
        rows.sort(key=lambda row: row["key"])
        meta["renamed"] = {stored: key for key, stored in new.items()}
        if not new:
            del meta["renamed"]
        meta["errors"] = [e for e in meta.get("errors", []) if e.get("reason") != RENAMED_KEY] + [
            {"key": key, "path": urls[unit], "reason": RENAMED_KEY,
             "detail": f"stored as {new[key]}: the earlier shard {labels[first]} has the key {key}"}
            for key, first in sorted(wanted.items())]
        staging = ensure_folder(staging_dir(out, unit))
        write_index(staging / "index.arrow", index_table(rows, meta))
        invalidate_catalog(out)  # the unit changes: readers list the units until the catalog is written again
        publish(staging / "index.arrow", index_path(out, unit))  # the same rows, parts and token: only keys differ
        shutil.rmtree(staging, ignore_errors=True)
        return len(new)
    finally:
        release(lock, record)
