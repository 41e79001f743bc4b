"""The one seed derivation: every random stream is keyed by integers (seed, epoch, step, index, ...).

All three helpers hash the parts with numpy's SeedSequence, so a stream depends only on its key, never
on global RNG state, worker count or process count: item i of epoch e is the same everywhere and
after a resume.
"""

import numpy as np


def derive_seed(*parts):
    """A 63-bit seed mixed from integers."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(*parts):
    """A numpy Generator keyed by integers (np.random.default_rng([parts]) hashes them with SeedSequence)."""
    return np.random.default_rng([int(p) for p in parts])


def torch_generator(*parts):
    """A CPU torch.Generator keyed by integers."""
    import torch  # numpy-only users of this module (data geometry) need not load torch

    return torch.Generator().manual_seed(derive_seed(*parts))


class EpochSeeded:
    """Mixin for datasets and samplers whose randomness is keyed by (seed, epoch, index).

    `set_epoch(e)` selects the epoch of the next items; a dataset may also be indexed with
    (index, epoch) pairs, which is what a sampler that knows the epoch yields.
    """

    epoch = 0

    def set_epoch(self, epoch):
        """Select the epoch whose random crops, flips or samples the next items get."""
        self.epoch = int(epoch)

    def index_and_epoch(self, index):
        """(index, epoch) from an int index (this dataset's epoch) or an (index, epoch) pair."""
        if isinstance(index, (tuple, list)):
            return int(index[0]), int(index[1])
        return int(index), self.epoch
