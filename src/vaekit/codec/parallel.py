"""Patch parallelism: one image's tiles split across the processes of a torch.distributed group.

Every process holds the model and the whole stage inputs; each runs its share of the tiles (a
contiguous run of them) and the processes meet once per GroupNorm pass and once per stage:

- GroupNorm moments: each process fills the (count, mean, M2) of its own tiles into a float64
  buffer indexed by tile, zeros elsewhere; a SUM all-reduce then gives every process every tile's
  moments exactly (x + 0 = x), and each merges them in tile order, as one process does. So the
  image-wide statistics, and everything after them, are the same bits as a single process's.
- Stage outputs: each process writes its tiles' cores into a zeroed tensor; a SUM all-reduce (or,
  for the last stage of a decode, a reduce onto rank 0) assembles them, exactly again.

A process that dies or stops answering makes the collective raise on the others (gloo at once when
the peer's socket closes; any backend after the group's timeout); that error becomes one
VaekitError on every surviving process. `Processes()` without a group is the single-process case,
through the same code.
"""

import torch

from vaekit.errors import VaekitError
from vaekit.moments import RunningMoments


class Processes:
    """The processes sharing one image's tiles: this one alone, or every rank of `group`."""

    def __init__(self, group=None):
        self.group = group
        if group is None:
            self.rank, self.world = 0, 1
        else:
            import torch.distributed as dist  # only patch-parallel runs touch torch.distributed

            self.dist = dist
            self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    @property
    def parallel(self):
        return self.world > 1

    def share(self, count):
        """The indices of `count` tiles this process runs: a contiguous, balanced part."""
        start, stop = count * self.rank // self.world, count * (self.rank + 1) // self.world
        return range(start, stop)

    def collective(self, what, call, *args, **kwargs):
        """Run one torch.distributed collective; a peer that died or timed out becomes one VaekitError."""
        try:
            return call(*args, group=self.group, **kwargs)
        except Exception as e:  # gloo raises RuntimeError, NCCL DistBackendError: any failure ends the run
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise VaekitError(
                f"Tiled inference across {self.world} processes stopped while {what}: another process left the "
                f"group or did not answer within the timeout ({reason}). Every process stops; look for the first "
                f"error in the launcher's output and rerun."
            ) from None

    @property
    def device(self):
        """Where collectives take their tensors: the GPU for NCCL, the CPU for gloo."""
        if self.parallel and self.dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def merge_moments(self, parts, batch, groups):
        """Image-wide moments from per-tile (count, mean, m2), each (batch, groups), None for tiles run elsewhere.

        Merged in tile order on every process, so the result does not depend on how tiles were shared.
        """
        if self.parallel:
            parts = self.exchange_moments(parts, batch, groups)
        merged = RunningMoments()
        for count, mean, m2 in parts:
            merged.merge(count, mean, m2)
        return merged

    def exchange_moments(self, parts, batch, groups):
        """Every tile's moments on every process: a float64 SUM over a buffer whose rows only one process fills."""
        buffer = torch.zeros(len(parts), 3, batch, groups, dtype=torch.float64, device=self.device)
        for i, part in enumerate(parts):
            if part is not None:
                count, mean, m2 = part
                buffer[i, 0] = count
                buffer[i, 1] = mean
                buffer[i, 2] = m2
        self.collective("exchanging GroupNorm statistics", self.dist.all_reduce, buffer)
        return [(int(buffer[i, 0, 0, 0]), buffer[i, 1], buffer[i, 2]) for i in range(len(parts))]

    def assemble(self, out, to_all=True):
        """Combine the cores each process wrote into a zeroed `out`: on every process, or on rank 0 only (None elsewhere)."""
        if not self.parallel:
            return out
        # gloo reduces only some dtypes; sums with zeros are exact in float32, and so is the cast back.
        wire = out if out.dtype in (torch.float32, torch.float64) or out.is_cuda else out.float()
        wire = wire.to(self.device)
        if to_all:
            self.collective("assembling a stage's tiles", self.dist.all_reduce, wire)
        else:
            self.collective("gathering the result", self.dist.reduce, wire, dst=self.first)
        if not to_all and self.rank != 0:
            return None
        return wire if wire is out else wire.to(device=out.device, dtype=out.dtype)

    @property
    def first(self):
        """The global rank of the group's rank 0 (reduce addresses global ranks)."""
        return self.dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def agree(self, flag):
        """True when `flag` is true on every process."""
        if not self.parallel:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=self.device)
        self.collective("agreeing on the result", self.dist.all_reduce, value, op=self.dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    def smallest(self, value):
        """The smallest of every process's integer `value`."""
        if not self.parallel:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.collective("agreeing on the tile size", self.dist.all_reduce, tensor, op=self.dist.ReduceOp.MIN)
        return int(tensor.item())

    def same(self, what, value):
        """Raise one VaekitError on every process unless all pass the same small picklable `value`."""
        if not self.parallel:
            return
        values = [None] * self.world
        self.collective(f"checking that every process has the same {what}", self.dist.all_gather_object, values,
                        value)
        if any(v != values[0] for v in values):
            raise VaekitError(f"The processes of a tiled run disagree on the {what}: "
                              + ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
                              + ". Give every process the same input and options.")
