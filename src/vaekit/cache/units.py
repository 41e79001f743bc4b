"""How a source is cut into units of work, and the DataLoader stream that reads and prepares them.

A plan is deterministic from the source alone: every rank that opens the same `--data` sees the
same units, and unit u belongs to rank u % world. A WebDataset shard is one unit (its samples are
read once, front to back, by one DataLoader worker); an indexed source (folder, Hugging Face data
set) is cut into blocks of `unit_size` consecutive images, whose batches any worker may prepare.
"""

import hashlib
import math
import os
import threading
import time

import numpy as np
import torch

from vaekit.data.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_READ_TIMEOUT
from vaekit.data.crops import nearest_bucket, prepare_image
from vaekit.data.decode import ImageError, decode_image
from vaekit.data.shards import expand_shards, shard_identity, shard_name, shard_samples
from vaekit.data.sources import display_text
from vaekit.errors import describe_exception


class IndexedPlan:
    """Units of `unit_size` consecutive images of an indexed Source (picklable: workers get a copy)."""

    kind = "indexed"

    def __init__(self, source, unit_size, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        self.source = source
        self.unit_size = unit_size
        self.max_bytes = max_bytes
        self.description = source.description
        self.count = math.ceil(len(source) / unit_size)
        self.skipped = source.skipped

    def positions(self, unit):
        """The source positions of a unit."""
        return range(unit * self.unit_size, min((unit + 1) * self.unit_size, len(self.source)))

    def signature(self, unit):
        """What the unit's result depends on: its keys, and for local files their sizes and mtimes."""
        digest = hashlib.sha256()
        for position in self.positions(unit):
            record = self.source[position]
            digest.update(record.key.encode("utf-8", "surrogateescape") + b"\0")
            if record.path is not None:
                try:
                    stat = os.stat(record.path)
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}\0".encode())
                except OSError:
                    digest.update(b"missing\0")
        return digest.hexdigest()

    def label(self, unit):
        """What a unit covers, for messages."""
        span = self.positions(unit)
        return f"images {span.start}-{span.stop - 1} of {self.description}"

    def chunks(self, unit, batch_size):
        """[(start, stop)] position ranges of the unit's batches."""
        span = self.positions(unit)
        return [(s, min(s + batch_size, span.stop)) for s in range(span.start, span.stop, batch_size)]

    def read(self, position):
        """(key, path, bytes or ImageError) of one image."""
        record = self.source[position]
        return record.key, record.path, read_record(record, self.max_bytes)


class ShardPlan:
    """One unit per WebDataset shard (URL, pipe: command or local .tar / .tar.gz)."""

    kind = "shards"

    def __init__(self, spec, field=None, max_bytes=DEFAULT_MAX_IMAGE_BYTES, read_timeout=DEFAULT_READ_TIMEOUT):
        self.urls = expand_shards(spec)
        self.field = field
        self.max_bytes, self.read_timeout = max_bytes, read_timeout
        self.description = f"webdataset {spec} ({len(self.urls)} shards)"
        self.count = len(self.urls)
        self.skipped = []

    def signature(self, unit):
        """The shard's URL, and for a local file its size and mtime."""
        url = self.urls[unit]
        try:
            return hashlib.sha256(f"{url}\0{shard_identity(url)}".encode()).hexdigest()
        except OSError:
            return hashlib.sha256(f"{url}\0missing".encode()).hexdigest()

    def label(self, unit):
        """What a unit covers, for messages."""
        return f"shard {self.urls[unit]}"

    def samples(self, unit, on_read=None):
        """(key, None, bytes or ImageError) of the shard's samples, in order; `on_read(bytes so far)` as it is read."""
        for key, data in shard_samples(self.urls[unit], self.field, self.max_bytes, self.read_timeout, on_read):
            yield display_text(key), None, data


def read_record(record, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """The bytes of a Record (refused unread over `max_bytes`), or the ImageError that says why they cannot be had."""
    try:
        return record.read_bytes(max_bytes=max_bytes)
    except ImageError as e:
        return e
    except FileNotFoundError:
        return ImageError("file not found")
    except OSError as e:
        return ImageError("unreadable file", None, describe_exception(e))


class Preparer:
    """Decodes and sizes one image by the cache's size policy: (3, H, W) uint8 pixels, crop and bucket."""

    def __init__(self, policy, background=(255, 255, 255), max_pixels=None):
        self.policy = policy
        self.background = tuple(int(c) for c in background)
        self.max_pixels = max_pixels
        self.buckets = [tuple(b) for b in policy["buckets"]] if policy["mode"] == "buckets" else None

    def __call__(self, key, path, data):
        """A prepared item {"key", "path", "sha256", "pixels", "bucket", "crop"} or an error item."""
        base = {"key": key, "path": path}
        if isinstance(data, ImageError):
            return {**base, "error": data.reason, "detail": data.detail}
        digest = hashlib.sha256(data).hexdigest()
        try:
            img = decode_image(data, background=self.background, max_pixels=self.max_pixels, max_bytes=None)
            pixels, crop, bucket = prepare_pixels(img, self.policy, self.buckets, self.background)
        except ImageError as e:
            return {**base, "error": e.reason, "detail": e.detail}
        return {**base, "sha256": digest, "pixels": pixels, "bucket": bucket, "crop": crop.to_dict()}


def prepare_pixels(img, policy, buckets=None, background=(255, 255, 255)):
    """A decoded RGB image as the encoder sees it -> ((3, H, W) uint8 tensor, Crop, [W, H] bucket)."""
    if policy["mode"] == "buckets":
        buckets = buckets or [tuple(b) for b in policy["buckets"]]
        size = nearest_bucket(*img.size, buckets)
    else:
        size = (policy["resolution"], policy["resolution"])
    img, crop = prepare_image(img, size, "center", small_images=policy["small_images"], min_size=policy["min_size"],
                              background=background)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return pixels, crop, list(size)


def collate_prepared(items):
    """Group prepared items by bucket -> {"groups": {"WxH": (pixels (N, 3, H, W), metas)}, "errors"}."""
    groups, errors = {}, []
    for item in items:
        if "error" in item:
            errors.append({"key": item["key"], "path": item["path"], "reason": item["error"], "detail": item["detail"]})
        else:
            pixels, metas = groups.setdefault(f"{item['bucket'][0]}x{item['bucket'][1]}", ([], []))
            pixels.append(item.pop("pixels"))
            metas.append(item)
    return {"groups": {name: (torch.stack(p), m) for name, (p, m) in groups.items()}, "errors": errors}


class UnitStream(torch.utils.data.IterableDataset):
    """Prepared chunks of the given units, in DataLoader workers.

    Yields {"unit", "groups", "errors", "last", "chunks", "failure"}: `last` marks a unit's final
    chunk, whose `chunks` is how many that unit sent in all (the main process knows then that the
    unit is complete). An indexed unit's chunks are dealt round-robin to all workers; a shard is
    streamed whole by one worker. `failure` is set when a shard could not be read to its end.
    While a shard is read, its row of `reading` (shared with the main process) holds (1, bytes read,
    time of the last byte); 2 in the first column once it is done.
    """

    def __init__(self, plan, units, preparer, batch_size):
        self.plan, self.units, self.preparer, self.batch_size = plan, list(units), preparer, batch_size
        # (units, 3) float64 in shared memory, so DataLoader workers can report to the progress line.
        self.reading = torch.zeros(len(self.units), 3, dtype=torch.float64).share_memory_() \
            if plan.kind == "shards" else None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if self.plan.kind == "indexed":
            yield from self._indexed(worker, workers)
        else:
            for slot in range(worker, len(self.units), workers):
                yield from self._shard(self.units[slot], slot)

    def _indexed(self, worker, workers):
        jobs = []
        for unit in self.units:
            spans = self.plan.chunks(unit, self.batch_size)
            jobs.extend((unit, i, len(spans), span) for i, span in enumerate(spans))
        for unit, i, total, (start, stop) in jobs[worker::workers]:
            items = [self.preparer(*self.plan.read(p)) for p in range(start, stop)]
            # Every chunk says which it is; the last one of a unit also says how many there are.
            yield {"unit": unit, **collate_prepared(items), "last": i == total - 1, "chunks": total, "failure": None}

    def _shard(self, unit, slot):
        url = self.plan.urls[unit]
        row = self.reading[slot].numpy()  # a view of the shared row

        def on_read(count):
            row[1], row[2] = count, time.monotonic()

        row[:] = (1, 0, time.monotonic())
        sent, items, failure = 0, [], None
        try:
            for key, path, data in self.plan.samples(unit, on_read):
                item = self.preparer(key, path, data)
                if "error" in item:
                    item["path"] = url  # a sample's error names the shard it is in
                items.append(item)
                if len(items) == self.batch_size:
                    yield {"unit": unit, **collate_prepared(items), "last": False, "chunks": None, "failure": None}
                    sent, items = sent + 1, []
        except ImageError as e:
            failure = {"key": None, "path": url, "reason": e.reason, "detail": e.detail}
        row[0] = 2
        yield {"unit": unit, **collate_prepared(items), "last": True, "chunks": sent + 1, "failure": failure}


def show_reading(stream, bar, every=1.0):
    """Show on `bar`, every `every` seconds from a thread, the shards being read: name, bytes so far, and
    how long since their last byte once that is a while. Returns an Event that stops it."""
    stop = threading.Event()
    if stream.reading is None or bar.disable:
        return stop

    def loop():
        while not stop.wait(every):
            bar.set_postfix_str(reading_text(stream), refresh=True)

    threading.Thread(target=loop, name="vaekit-read-progress", daemon=True).start()
    return stop


def reading_text(stream, shown=2):
    """'reading shard-003.tar 12.3 MB, x.tar 0 B (no data for 41 s)': the shards being read, the quietest first."""
    rows = stream.reading.numpy()
    now = time.monotonic()
    active = sorted((rows[slot, 2], slot) for slot in np.flatnonzero(rows[:, 0] == 1))  # numpy: units may be many
    parts = []
    for last, slot in active[:shown]:
        text = f"{shard_name(stream.plan.urls[stream.units[slot]], 30)} {format_bytes(rows[slot][1])}"
        if now - last >= 10:
            text += f" (no data for {now - last:.0f} s)"
        parts.append(text)
    if len(active) > shown:
        parts.append(f"{len(active) - shown} more")
    return "reading " + ", ".join(parts) if parts else ""


def format_bytes(count):
    """12 B, 3.4 kB, 12.3 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
