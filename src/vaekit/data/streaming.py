"""Training crops streamed from WebDataset shards: never indexed, split by process and DataLoader worker, resumable.

Order. Epoch e permutes the shards with a generator seeded by (seed, e); process r of w takes every
w-th shard of that order from r, and worker k of its K workers every K-th of those from k. So each
epoch reads every shard once, on exactly one process and worker, and the processes need not agree
on where an epoch ends (they may run through epochs at slightly different steps). Crops and flips
derive from (data seed, epoch, shard, sample), as the indexed trainer's from (seed, epoch, index).

Position. A worker's stream is endless, epoch after epoch. Each item carries its worker and the
position just after it, (epoch, slot in the worker's shard list, samples read from that shard).
The trainer keeps the position of the last batch it consumed from each worker; a stream resumed
there skips whole shards by slot and then reads (without decoding) past the samples already used,
so it continues with exactly the next sample. DataLoader workers hand out batches in turn, so the
trainer also rotates which worker plays which stream: the first batch after a resume comes from
the stream whose turn it was.

Held-out images of a streamed run are the first `holdout` samples of the last shard (in the order
the spec lists them); training skips those samples.
"""

from pathlib import Path

import torch

from vaekit.data.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_READ_TIMEOUT, IMAGE_EXTENSIONS
from vaekit.data.crops import TrainCrop
from vaekit.data.decode import ImageError, decode_image
from vaekit.data.shards import COMPRESSED_SUFFIXES, expand_shards, is_local, looks_like_shards, shard_samples
from vaekit.data.sources import Source
from vaekit.errors import VaekitError
from vaekit.seeds import numpy_rng, torch_generator



def is_streamed(spec, mode="auto", source="auto"):
    """Whether `data.path` is read as a stream: `mode` on/off, or auto for what cannot be indexed.

    auto streams `pipe:` commands, URLs and compressed shards (gzip, bzip2, xz) (a file, pattern or a folder of
    only them); plain local `.tar` shards, image folders and data sets stay indexed as before.
    """
    if mode in ("on", "off"):
        return mode == "on"
    spec = str(spec)
    if source not in ("auto", "webdataset") or spec.startswith(("builtin:", "hf:")):
        return False
    if looks_like_shards(spec) and not is_local(spec):
        return True  # pipe:, http(s)://, s3://
    if spec.lower().endswith(COMPRESSED_SUFFIXES):
        return True
    path = Path(spec)
    if path.is_dir():
        names = [p.name.lower() for p in path.iterdir() if not p.name.startswith(".")]
        indexed = (".tar", *IMAGE_EXTENSIONS)
        return any(n.endswith(COMPRESSED_SUFFIXES) for n in names) and not any(n.endswith(indexed) for n in names)
    return False


def epoch_shards(shard_count, seed, epoch, rank, world, worker, workers):
    """Indices of the shards that (rank, worker) reads in `epoch`, in reading order."""
    order = torch.randperm(shard_count, generator=torch_generator(seed, epoch)).tolist()
    return order[rank::world][worker::workers]


def stream_workers(num_workers, shard_count, world):
    """How many DataLoader worker streams a process runs: every one must get a shard in every epoch."""
    return max(1, min(num_workers, shard_count // world))


class StreamingImages(torch.utils.data.IterableDataset):
    """Random crops of streamed shards as {"pixels" | "error", "key", "worker", "position"}, endlessly.

    Built once from the spec (`open_stream`), then `for_process` gives each process its view; see
    the module docstring for the order and the meaning of positions.
    """

    def __init__(self, urls, field=None, size=256, crop="resize_random", flip=True, small_images="upscale",
                 min_size=16, background=(255, 255, 255), max_pixels=None, seed=0, order_seed=0, held_head=None,
                 max_image_bytes=DEFAULT_MAX_IMAGE_BYTES, read_timeout=DEFAULT_READ_TIMEOUT, colour=(0.0, 0.0),
                 short_side=None):
        self.urls, self.field = list(urls), field
        self.background = tuple(background)
        self.recipe = TrainCrop(size, crop, flip, small_images, min_size, self.background, tuple(colour),
                                None if short_side is None else tuple(short_side))
        self.max_pixels, self.seed, self.order_seed = max_pixels, seed, order_seed
        self.max_image_bytes, self.read_timeout = max_image_bytes, read_timeout
        self.held_head = dict(held_head or {})  # shard index -> leading samples held out for validation
        self.rank, self.world, self.workers, self.rotation = 0, 1, 1, 0
        self.starts = [None]  # per worker stream: (epoch, slot, sample) to start at, None for the beginning

    def for_process(self, rank, world, workers, starts=None, rotation=0):
        """This process's view: its shards, `workers` streams from `starts`, worker k playing stream k + rotation."""
        view = StreamingImages.__new__(StreamingImages)
        view.__dict__.update(self.__dict__)
        view.rank, view.world, view.workers, view.rotation = rank, world, workers, rotation % workers
        view.starts = list(starts) if starts is not None else [None] * workers
        return view

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        stream = ((info.id if info is not None else 0) + self.rotation) % self.workers
        epoch, slot, skip = self.starts[stream] or (0, 0, 0)
        while True:
            shards = epoch_shards(len(self.urls), self.order_seed, epoch, self.rank, self.world, stream, self.workers)
            produced = False
            for j in range(slot, len(shards)):
                for item in self.read_shard(shards[j], epoch, skip):
                    produced = True
                    read = item.pop("read")
                    yield {**item, "worker": stream, "position": (epoch, j, read)}
                skip = 0
            if not produced and slot == 0:
                raise VaekitError(f"Worker stream {stream} of process {self.rank} read no samples in epoch {epoch} "
                                  f"from shards {[self.urls[i] for i in shards]}.")
            epoch, slot = epoch + 1, 0

    def read_shard(self, index, epoch, skip):
        """The items of one shard from sample `skip` on, each with `read`: samples read from the shard so far."""
        url = self.urls[index]
        first = max(skip, self.held_head.get(index, 0))
        read = 0
        try:
            for i, (key, data) in enumerate(shard_samples(url, self.field, self.max_image_bytes, self.read_timeout)):
                read = i + 1
                if i < first:
                    continue  # consumed before the resume, or held out: not decoded
                yield {**self.make_item(key, data, epoch, index, i), "read": read}
        except ImageError as e:  # an unreadable shard is skipped and listed, as a bad image is
            yield {"error": e.reason, "key": url, "read": read}

    def make_item(self, key, data, epoch, index, i):
        """The crop of one sample, seeded by (data seed, epoch, shard, sample)."""
        rng = numpy_rng(self.seed, epoch, index, i)
        try:
            if isinstance(data, ImageError):
                raise data
            img = decode_image(data, background=self.background, max_pixels=self.max_pixels)
            pixels = self.recipe(img, rng)
        except ImageError as e:
            return {"error": e.reason, "key": key}
        return {"pixels": pixels, "key": key}


class _HeldReader:
    """Held-out samples kept in memory (bytes, or the ImageError a sample gave), read by position."""

    def __init__(self, samples):
        self.samples = samples

    def read(self, position, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
        data = self.samples[position]
        if isinstance(data, ImageError):
            raise data
        return data


def open_stream(config, order_seed):
    """(StreamingImages over `config.path`, held-out Source or None) for a DataConfig; reads only held-out samples."""
    urls = expand_shards(config.path)
    holdout = config.holdout
    if 0 < holdout < 1:
        raise VaekitError(f"data.holdout={holdout} is a fraction, which needs the size of the data set; streamed "
                          f"shards have no index. Give a count of samples to hold out from the front of the last "
                          f"shard (e.g. data.holdout=256), or data.holdout=0.")
    if holdout != int(holdout):
        raise VaekitError(f"data.holdout {holdout} is above 1 so it counts images; give a whole number.")
    count, held = int(holdout), None
    if count:
        last = urls[-1]
        keys, samples = [], []
        try:
            for key, data in shard_samples(last, config.image_column, config.max_image_bytes, config.read_timeout):
                if len(keys) == count:
                    break
                keys.append(key)
                samples.append(data)
        except ImageError as e:
            raise VaekitError(f"Cannot read the held-out shard {last}: {e}") from None
        if len(keys) < count:
            raise VaekitError(f"data.holdout={count} needs {count} samples from the last shard {last}, which has "
                              f"{len(keys)}; lower data.holdout.")
        held = Source(f"first {count} samples of {last}", keys, [None] * count, _HeldReader(samples))
    train = StreamingImages(urls, config.image_column, size=config.size, crop=config.crop, flip=config.flip,
                            small_images=config.small_images, min_size=config.min_size, background=config.background,
                            max_pixels=config.max_pixels, seed=config.seed, order_seed=order_seed,
                            held_head={len(urls) - 1: count} if count else None,
                            max_image_bytes=config.max_image_bytes, read_timeout=config.read_timeout,
                            colour=(config.hue_jitter, config.saturation_jitter),
                            short_side=config.short_side)
    return train, held


def check_stream(stream, rank, world):
    """Fail early, with one message, when this process would get no shards or its first shard gives no sample."""
    if len(stream.urls) < world:
        raise VaekitError(f"{len(stream.urls)} shards cannot feed {world} processes: each process streams whole "
                          f"shards. Split the data into at least {world} shards (ideally many per process).")
    first = stream.urls[epoch_shards(len(stream.urls), stream.order_seed, 0, rank, world, 0, 1)[0]]
    samples = shard_samples(first, stream.field, stream.max_image_bytes, stream.read_timeout)
    try:
        next(samples)
    except StopIteration:
        raise VaekitError(f"The shard {first} holds no samples.") from None
    except ImageError as e:
        raise VaekitError(f"Cannot read the shard {first}: {e}") from None
    finally:
        samples.close()  # ends a pipe: command reading the rest of the shard

