"""The background thread that turns encoded batches into a unit's parts and, last, its index.

Publishing a unit, step by step (each step is a `fault_point`, so tests can pause or kill there):

1. parts are written, hashed and kept in this writer's own staging folder as the unit fills
   (`part-written`); nobody else removes that folder while this process lives;
2. at the unit's end the index, naming the parts with their sizes and hashes, is staged
   (`index-staged`);
3. the fence: the unit's lock must still hold this process's record, and is renewed
   (`index-fenced`). A writer that lost its lease (paused longer than --lock_timeout, so another
   process took the unit over) discards its work with a note instead of publishing it;
4. the catalog is removed, the parts renamed into units/ (`parts-published`), then the index
   (`index-published`): from that rename on the unit is done;
5. the post-check: if the lease was lost between the fence and the rename and a part the index
   names is gone, the index is withdrawn (only while it is still ours), so a published index never
   names a missing part; then the previous version's parts are removed (never one that the index in
   place names), the catalog removed again, and the lock released.
"""

import os
import queue
import shutil
import threading

import torch

from vaekit.cache.format import (FORMAT, FORMAT_VERSION, NON_FINITE, bucket_name, current_parts, index_path,
                                 index_table, invalidate_catalog, lock_path, part_digest, part_name, publish,
                                 read_unit_meta, remove_parts, staging_dir, write_index)
from vaekit.errors import VaekitError
from vaekit.faults import fault_point
from vaekit.io import ensure_folder, owner_tag, save_safetensors
from vaekit.locks import live_tokens, release, renew


class UnitWriter:
    """Fills each unit's parts on a background thread and publishes the unit's index when it ends.

    Messages (see `put`): ("latents", unit, metas, mean, logvar) with one meta per image and, for a
    cache with flips, the mirrored images' rows after the plain ones; ("errors", unit, entries); and
    ("end", unit, {"signature", "label", "failure"}). Every latent is checked for NaN/inf after the
    cast to the storage dtype (so fp16 overflow counts); such an image is dropped whole and listed.

    `leases` maps each unit to the lock record this process holds for it (from `vaekit.locks.try_lock`),
    checked before publishing; `card_hash` is written into every index; `stale_after` is the lock
    timeout, which decides whose leftovers may be removed.
    """

    def __init__(self, out, token, shard_size, store, heartbeat=None, leases=None, card_hash=None, stale_after=None):
        self.out, self.token, self.shard_size, self.store = out, token, shard_size, store
        self.heartbeat, self.leases, self.card_hash, self.stale_after = heartbeat, leases, card_hash, stale_after
        self.queue = queue.Queue(maxsize=8)  # bounds memory (and GPU memory) held by batches in flight
        self.thread = threading.Thread(target=self._loop, name="vaekit-unit-writer", daemon=True)
        self.error = None
        self.units = {}  # unit -> its state while open
        self.counts = {"units_encoded": 0, "units_failed": 0, "units_lost": 0, "non_finite": 0, "parts": 0}
        self.failed = []  # [{"unit", "label", "reason", "detail"}]
        self.lost = []  # [{"unit", "label", "reason"}]: units whose lease another process took over

    def start(self):
        """Start the writer thread (after DataLoader workers have forked: forking a threaded process is unsafe)."""
        self.thread.start()
        return self

    def put(self, item):
        """Queue a message; raises if the writer failed."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self):
        """Finish queued work and stop; re-raises a writer failure."""
        if self.thread.is_alive():
            self.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self):
        try:
            while (item := self.queue.get()) is not None:
                kind, unit = item[0], item[1]
                state = self.units.setdefault(unit, {"groups": {}, "pending": 0, "parts": [], "records": [],
                                                     "rows": [], "errors": []})
                if kind == "errors":
                    state["errors"].extend(item[2])
                elif kind == "latents":
                    self._add(state, *item[2:])
                    if state["pending"] >= self.shard_size:
                        self._write_part(unit, state)
                else:
                    self._end(unit, self.units.pop(unit), item[2])
        except BaseException as e:  # handed to the main thread by put/close
            self.error = e
            while True:  # drain so a producer blocked on a full queue wakes up and sees the error
                try:
                    self.queue.get_nowait()
                except queue.Empty:
                    break

    def _add(self, state, metas, mean, logvar):
        mean = mean.cpu()  # (N or 2N, C, h, w); waits for the device here, not in the main thread
        logvar = logvar.cpu() if logvar is not None else None
        count = len(metas)
        flipped = mean.shape[0] == 2 * count
        finite = torch.isfinite(mean).flatten(1).all(1)
        if logvar is not None:
            finite &= torch.isfinite(logvar).flatten(1).all(1)
        if flipped:
            finite = finite[:count] & finite[count:]
        for i, meta in enumerate(metas):
            if not finite[i]:  # drop every variant of such an image, so it is encoded again (whole) or not at all
                self.counts["non_finite"] += 1
                state["errors"].append({"key": meta["key"], "path": meta["path"], "reason": NON_FINITE,
                                        "detail": None})
                continue
            group = state["groups"].setdefault(bucket_name(*meta["bucket"]), {"mean": [], "logvar": []})
            rows = [i, count + i] if flipped else [i]
            offsets = [len(group["mean"]) + j for j in range(len(rows))]
            for r in rows:
                group["mean"].append(mean[r])
                if logvar is not None:
                    group["logvar"].append(logvar[r])
            crop = meta["crop"]
            (ow, oh), (rw, rh), box = crop["original_size"], crop["resized_size"], crop["box"]
            state["rows"].append({
                "key": meta["key"], "path": meta["path"], "sha256": bytes.fromhex(meta["sha256"]),
                "part": len(state["parts"]), "bucket_w": meta["bucket"][0], "bucket_h": meta["bucket"][1],
                "offset": offsets[0], "flip_offset": offsets[1] if flipped else -1,
                "original_w": ow, "original_h": oh, "resized_w": rw, "resized_h": rh,
                "crop_left": box[0], "crop_top": box[1], "crop_right": box[2], "crop_bottom": box[3],
            })
            state["pending"] += len(rows)

    def _write_part(self, unit, state):
        """Write the unit's pending samples as its next part, in this writer's staging folder, and hash it."""
        name = part_name(unit, len(state["parts"]), self.token)
        tensors = {}
        for group, data in state["groups"].items():
            tensors[f"mean/{group}"] = torch.stack(data["mean"])  # (N, C, h, w)
            if data["logvar"]:
                tensors[f"logvar/{group}"] = torch.stack(data["logvar"])
        staging = ensure_folder(staging_dir(self.out, unit))
        metadata = {"format": FORMAT, "count": str(state["pending"]), "store": self.store}
        save_safetensors(tensors, staging / name, metadata=metadata)  # tmp file, fsync, rename
        # Hashed from the file just written (the page cache): what readers will find, not what we meant.
        state["records"].append({"name": name, **part_digest(staging / name)})
        state["parts"].append(name)
        state["groups"], state["pending"] = {}, 0
        self.counts["parts"] += 1
        fault_point("part-written", unit)

    def _lease(self, unit):
        """None while this process still holds the unit's lock (renewing it), else why not."""
        record = (self.leases or {}).get(unit)
        return renew(lock_path(self.out, unit), record) if record is not None else None

    def _end(self, unit, state, info):
        staging = staging_dir(self.out, unit)
        try:
            if info.get("failure") is not None:  # a shard that could not be read to its end: no index, redo next run
                self.failed.append({"unit": unit, "label": info["label"], **info["failure"]})
                self.counts["units_failed"] += 1
            elif (lost := self._lease(unit)) is not None:
                self._discard(unit, info, lost)
            else:
                self._publish(unit, state, info, staging)
        finally:  # this writer's staging folder goes, whatever happened
            shutil.rmtree(staging, ignore_errors=True)
            if self.heartbeat is not None:
                self.heartbeat.discard(lock_path(self.out, unit))
            release(lock_path(self.out, unit), (self.leases or {}).get(unit))

    def _discard(self, unit, info, lost):
        self.lost.append({"unit": unit, "label": info["label"], "reason": f"not published: {lost}"})
        self.counts["units_lost"] += 1

    def _publish(self, unit, state, info, staging):
        if state["pending"]:
            self._write_part(unit, state)
        meta = {"format": FORMAT_VERSION, "unit": unit, "label": info["label"], "signature": info["signature"],
                "token": self.token, "parts": state["parts"], "part_files": state["records"],
                "rows": len(state["rows"]), "card": self.card_hash, "errors": state["errors"],
                # An overflow may pass with another --compute_dtype (not part of the key): such units are redone.
                "retry": any(e["reason"] == NON_FINITE for e in state["errors"])}
        staged = staging / "index.arrow"
        rows = sorted(state["rows"], key=lambda row: row["key"])  # batches were grouped by bucket; rows by key
        write_index(staged, index_table(rows, meta))
        fault_point("index-staged", unit)
        if (lost := self._lease(unit)) is not None:  # the fence: publish only while the lease is ours
            self._discard(unit, info, lost)
            return
        fault_point("index-fenced", unit)
        units = self.out / "units"
        replaced = current_parts(self.out, unit)  # the version this one replaces, removed once it is in place
        invalidate_catalog(self.out)  # before the unit changes: a reader never trusts an outdated catalog
        for name in state["parts"]:
            publish(staging / name, units / name)
        fault_point("parts-published", unit)
        publish(staged, index_path(self.out, unit))
        fault_point("index-published", unit)
        if not self._post_check(unit, info, state["parts"]):
            return
        # The previous version's parts go; a paused writer's (its lock taken over, its process alive) stay:
        # it may still rename its index in, and that index must find them.
        remove_parts(self.out, unit, replaced, keep=set(state["parts"]),
                     keep_tokens=live_tokens((self.leases or {}).get(unit)))
        invalidate_catalog(self.out)  # a finaliser may have listed the units between the two removals
        self.counts["units_encoded"] += 1

    def _post_check(self, unit, info, parts):
        """After the index rename: keep it unless the lease was lost meanwhile and a part it names is gone."""
        lost = self._lease(unit)
        if lost is None:
            return True
        missing = [name for name in parts if not (self.out / "units" / name).is_file()]
        if missing:
            withdraw_index(self.out, unit, self.token)
        self._discard(unit, info, lost + (" (its index was withdrawn: another process removed its parts)"
                                          if missing else " (published before the loss was seen)"))
        return False


def withdraw_index(out, unit, token):
    """Remove the unit's index if it is still the one run `token` published; another run's is put back."""
    path = index_path(out, unit)
    aside = path.with_name(f".{path.name}.{owner_tag()}.withdrawn.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    try:
        theirs = read_unit_meta(aside).get("token") != token
    except VaekitError:
        theirs = False
    if theirs:
        try:
            os.link(aside, path)  # unless a newer index is in place already
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
