"""Where exact tiling keeps each tile's activations between its passes: memory, then a spill file.

Exact tiling runs the tiles of a stage once per GroupNorm (vaekit.codec.tiling). Each tile's pass
resumes from the activations its previous pass stopped at, its *checkpoint*, instead of recomputing
them from the stage input. A checkpoint is kept in the device's memory while the store's memory
allowance lasts; beyond it, on the CPU, it is written to a temporary file and read back by the next
pass (a few hundred MB/s of page-cache copies against convolutions that take seconds); where it can
be neither, the tile resumes from the last checkpoint it has, or the stage input.

The spill file is created unlinked (tempfile.TemporaryFile, in $TMPDIR), so nothing is left behind
when the process is killed. Two files take turns: the pass that moves every tile to its next
checkpoint writes into one while it reads from the other, which is then emptied. A write that fails
(full disk) switches spilling off with a warning; the tile then resumes from an earlier point.
"""

import tempfile
import warnings
from dataclasses import dataclass

import torch

from vaekit.errors import VaekitError


WRITE_CHUNK_BYTES = 4 << 20  # a spilled tensor is copied out and written this much at a time


@dataclass
class Spilled:
    """Where one tensor of a checkpoint lies in a spill file."""

    file: int  # which of the two files
    offset: int
    shape: tuple
    dtype: torch.dtype
    channels_last: bool


def tensor_bytes(tensors):
    """Bytes held by a tuple of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def owned(tensor):
    """`tensor`, or a compact copy when it is a view of a larger buffer (a crop) that it would keep alive."""
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone(memory_format=torch.preserve_format)
    return tensor


class CheckpointStore:
    """Checkpoints by tile: tuples of tensors, in memory up to `keep_bytes`, then (CPU) in a spill file."""

    def __init__(self, device, keep_bytes=0, spill=None):
        self.device = torch.device(device)
        self.keep_bytes = max(0, int(keep_bytes or 0))
        # Spilling pays on the CPU, where convolutions are slow next to copying memory; on a GPU,
        # recomputing beats a round trip over PCIe (see docs/tiling.md).
        self.spill = self.device.type == "cpu" if spill is None else bool(spill)
        self.kept = {}  # key -> tuple of tensors in memory
        self.spilled = {}  # key -> tuple of Spilled
        self.held = 0  # bytes in memory
        self.files = [None, None]
        self.ends = [0, 0]  # bytes written to each file
        self.live = [0, 0]  # checkpoints with a tensor in each file
        self.current = 0
        self.bytes_spilled = 0  # written in all, for reports

    def __contains__(self, key):
        return key in self.kept or key in self.spilled

    def get(self, key):
        """The tensors stored under `key`."""
        if key in self.kept:
            return self.kept[key]
        return tuple(self.read(part) for part in self.spilled[key])

    def drop(self, key):
        """Forget the checkpoint under `key` (its memory is freed, its file space released with the file)."""
        tensors = self.kept.pop(key, None)
        if tensors is not None:
            self.held -= tensor_bytes(tensors)
        parts = self.spilled.pop(key, None)
        if parts:
            self.live[parts[0].file] -= 1

    def put(self, key, tensors, spill_ok=True):
        """Store `tensors` under `key`, replacing what was there; False when neither memory nor the file takes them.

        The caller keeps its previous checkpoint on False, so it is dropped only on success.
        `spill_ok`: whether writing these tensors to disk is worth it (recomputing them costs more).
        """
        size = tensor_bytes(tensors)
        old = self.kept.get(key)
        freed = tensor_bytes(old) if old is not None else 0
        if self.held - freed + size <= self.keep_bytes:
            self.drop(key)
            self.kept[key] = tuple(owned(t) for t in tensors)
            self.held += size
            return True
        if not (self.spill and spill_ok):
            return False
        parts = self.write(tensors)
        if parts is None:
            return False
        self.drop(key)
        self.spilled[key] = parts
        self.live[parts[0].file] += 1
        return True

    def begin_pass(self):
        """Called before a pass: new spills go to the file that holds no live checkpoint, emptied first."""
        other = 1 - self.current
        if self.live[other] == 0:
            self.empty(other)
            self.current = other
        if self.live[self.current] == 0:
            self.empty(self.current)

    def empty(self, index):
        """Truncate one spill file (its checkpoints are all dropped)."""
        if self.files[index] is not None and self.ends[index]:
            self.files[index].truncate(0)
        self.ends[index] = 0

    def write(self, tensors):
        """Append tensors to the current file; None (and spilling off) when the write fails."""
        index = self.current
        try:
            if self.files[index] is None:
                self.files[index] = tempfile.TemporaryFile(prefix="vaekit-tiles-")
            f = self.files[index]
            parts = []
            for t in tensors:
                channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                    memory_format=torch.channels_last)
                # Raw bytes in memory order: NCHW, or NHWC for a channels-last tensor (read back as such).
                ordered = t.permute(0, 2, 3, 1) if channels_last else t
                f.seek(self.ends[index])
                parts.append(Spilled(index, self.ends[index], tuple(t.shape), t.dtype, channels_last))
                # A checkpoint is usually a crop (a strided view): written a few MiB at a time, so the
                # compact copy that writing needs never doubles the checkpoint's memory.
                step = max(1, WRITE_CHUNK_BYTES // max(1, ordered[0, :1].numel() * t.element_size()))
                for b in range(ordered.shape[0]):
                    for c in range(0, ordered.shape[1], step):
                        chunk = ordered[b, c : c + step].contiguous().cpu()
                        f.write(memoryview(chunk.view(torch.uint8).reshape(-1).numpy()))
                self.ends[index] += t.numel() * t.element_size()
            self.bytes_spilled += tensor_bytes(tensors)
            return tuple(parts)
        except OSError as e:
            warnings.warn(f"vaekit: tiling could not spill activations to {tempfile.gettempdir()} ({e.strerror or e}); "
                          f"recomputing them instead (slower, same result).", stacklevel=4)
            self.spill = False
            return None

    def read(self, part):
        """One spilled tensor, on the store's device."""
        shape = part.shape
        stored = (shape[0], shape[2], shape[3], shape[1]) if part.channels_last else shape
        out = torch.empty(stored, dtype=part.dtype)
        f = self.files[part.file]
        f.seek(part.offset)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        if f.readinto(view) != view.nbytes:
            raise VaekitError(f"vaekit tiling: a spilled activation could not be read back from "
                              f"{tempfile.gettempdir()} (the file was truncated). Rerun; set TMPDIR to a local disk.")
        if part.channels_last:
            out = out.permute(0, 3, 1, 2)
        return out.to(self.device, non_blocking=True)

    def close(self):
        """Free memory and close the spill files (they were never linked into a folder)."""
        self.kept.clear()
        self.spilled.clear()
        self.held = 0
        for f in self.files:
            if f is not None:
                f.close()
        self.files = [None, None]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
