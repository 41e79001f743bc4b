"""The background thread that turns encoded batches into a unit's parts and, last, its index."""

import queue
import threading

import torch

from vaekit.cache.format import (FORMAT, FORMAT_VERSION, NON_FINITE, bucket_name, clean_unit, index_path, index_table,
                                 current_parts, invalidate_catalog, lock_path, publish, staging_dir, unit_name,
                                 write_index)
from vaekit.io import ensure_folder, save_safetensors
from vaekit.locks import release


class UnitWriter:
    """Fills each unit's parts on a background thread and publishes the unit's index when it ends.

    Messages (see `put`): ("latents", unit, metas, mean, logvar) with one meta per image and, for a
    cache with flips, the mirrored images' rows after the plain ones; ("errors", unit, entries); and
    ("end", unit, {"signature", "label", "failure"}). Every latent is checked for NaN/inf after the
    cast to the storage dtype (so fp16 overflow counts); such an image is dropped whole and listed.
    """

    def __init__(self, out, token, shard_size, store, heartbeat=None):
        self.out, self.token, self.shard_size, self.store = out, token, shard_size, store
        self.heartbeat = heartbeat
        self.queue = queue.Queue(maxsize=8)  # bounds memory (and GPU memory) held by batches in flight
        self.thread = threading.Thread(target=self._loop, name="vaekit-unit-writer", daemon=True)
        self.error = None
        self.units = {}  # unit -> its state while open
        self.counts = {"units_encoded": 0, "units_failed": 0, "non_finite": 0, "parts": 0}
        self.failed = []  # [{"unit", "label", "reason", "detail"}]

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
                state = self.units.setdefault(unit, {"groups": {}, "pending": 0, "parts": [], "rows": [],
                                                     "errors": []})
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
        name = f"{unit_name(unit)}.p{len(state['parts']):03d}.{self.token}.safetensors"
        tensors = {}
        for group, data in state["groups"].items():
            tensors[f"mean/{group}"] = torch.stack(data["mean"])  # (N, C, h, w)
            if data["logvar"]:
                tensors[f"logvar/{group}"] = torch.stack(data["logvar"])
        staging = ensure_folder(staging_dir(self.out, unit))
        metadata = {"format": FORMAT, "count": str(state["pending"]), "store": self.store}
        save_safetensors(tensors, staging / name, metadata=metadata)  # tmp file, fsync, rename
        publish(staging / name, self.out / "units" / name)
        state["parts"].append(name)
        state["groups"], state["pending"] = {}, 0
        self.counts["parts"] += 1

    def _end(self, unit, state, info):
        if info.get("failure") is not None:  # a shard that could not be read to its end: no index, redo next run
            clean_unit(self.out, unit, keep=current_parts(self.out, unit))
            self.failed.append({"unit": unit, "label": info["label"], **info["failure"]})
            self.counts["units_failed"] += 1
        else:
            if state["pending"]:
                self._write_part(unit, state)
            meta = {"format": FORMAT_VERSION, "unit": unit, "label": info["label"], "signature": info["signature"],
                    "token": self.token, "parts": state["parts"], "rows": len(state["rows"]),
                    "errors": state["errors"],
                    # An overflow may pass with another --compute_dtype (not part of the key): such units are redone.
                    "retry": any(e["reason"] == NON_FINITE for e in state["errors"])}
            staged = staging_dir(self.out, unit) / "index.arrow"
            rows = sorted(state["rows"], key=lambda row: row["key"])  # batches were grouped by bucket; rows by key
            write_index(staged, index_table(rows, meta))
            invalidate_catalog(self.out)  # before the unit changes: a reader never trusts an outdated catalog
            publish(staged, index_path(self.out, unit))
            clean_unit(self.out, unit, keep=set(state["parts"]))  # the parts of the unit's previous version
            self.counts["units_encoded"] += 1
        if self.heartbeat is not None:
            self.heartbeat.discard(lock_path(self.out, unit))
        release(lock_path(self.out, unit))
