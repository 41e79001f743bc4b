"""Which images each step trains on: a function of (seed, epoch, index) only, so resume is exact."""

import math

import torch

from vaekit.seeds import torch_generator


class StepBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of (index, epoch) pairs, one optimizer step after another, endlessly.

    Epoch e shuffles with a generator seeded from (seed, e). Step s of the epoch takes the s-th block
    of `global_batch` indices; micro-batch m of process r takes slot m * processes + r of that block.
    So the images of a step do not depend on how it is split across processes and micro-batches,
    and a run resumed at (epoch, step) continues with exactly the items it would have used. The
    epoch travels with each index because TrainImageDataset derives crops and flips from
    (data seed, epoch, index).
    """

    def __init__(self, dataset_size, batch_size, grad_accum, num_processes, rank, seed, epoch=0, start_step=0):
        self.n, self.b, self.accum = dataset_size, batch_size, grad_accum
        self.world, self.rank, self.seed, self.epoch, self.start = num_processes, rank, seed, epoch, start_step
        self.global_batch = batch_size * grad_accum * num_processes
        # A data set smaller than one global batch is repeated within the epoch.
        self.repeats = max(1, math.ceil(self.global_batch / self.n))
        self.steps_per_epoch = self.repeats * self.n // self.global_batch

    def __iter__(self):
        epoch, start = self.epoch, self.start
        while True:
            g = torch_generator(self.seed, epoch)
            order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(self.repeats)])
            for s in range(start, self.steps_per_epoch):
                block = order[s * self.global_batch:(s + 1) * self.global_batch]
                for m in range(self.accum):
                    slot = m * self.world + self.rank
                    yield [(i, epoch) for i in block[slot * self.b:(slot + 1) * self.b].tolist()]
            epoch, start = epoch + 1, 0
