"""Batching decoded images: the one loop evaluation, inspection and validation read images with."""

import torch

from vaekit.data.decode import ImageError


def batched(items, size):
    """Lists of up to `size` consecutive items of an iterable."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def decoded_batches(source, indices, load, batch_size, skipped):
    """Yield (indices, keys, (B, 3, H, W) images) for the records of `source` at `indices`.

    `load(record)` decodes one record to a (3, H, W) tensor; a record it cannot decode (ImageError) is
    appended to `skipped` as {"key", "reason"} and left out, so batches can be short.
    """

    def decoded():
        for index in indices:
            record = source[index]
            try:
                yield index, record.key, load(record)
            except ImageError as e:
                skipped.append({"key": record.key, "reason": e.reason})

    for batch in batched(decoded(), batch_size):
        yield [b[0] for b in batch], [b[1] for b in batch], torch.stack([b[2] for b in batch])
