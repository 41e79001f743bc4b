"""Memory: an estimate of the untiled peak, the memory budget, and the choice of tile for tile="auto"."""

import math
import os

import torch

from vaekit.codec.options import parse_bytes
from vaekit.codec.tiling import minimum_tile, stage_groups
from vaekit.model.architecture import downsample_factor, model_dtype


# Default window for tile="auto" when the budget allows any size: large windows waste less on context.
MAX_AUTO_TILE = 1024


# Peak memory of a forward pass, in units of its largest activation tensor: a ResNet block's input,
# GroupNorm output, SiLU output and convolution output can be alive together. An estimate for
# tile="auto" only; scripts/bench_tiling.py measures the real peaks.
PEAK_ACTIVATIONS = 4.0


def level_shapes(vae, direction):
    """Per level, from the config alone: (input channels, widest channels, output channels, scale).

    Mirrors encoder_levels / decoder_levels: down block i has a downsampler unless it is the last;
    up block i > 0 starts with the previous block's upsampler, and the last one ends in 3 channels.
    """
    c = list(vae.config.block_out_channels)
    n = len(c)
    if direction == "encode":
        return [(3 if i == 0 else c[i - 1], max(c[i], c[max(0, i - 1)]), c[i], 0.5 if i < n - 1 else 1.0)
                for i in range(n)]
    rev = c[::-1]
    return [(rev[max(0, i - 1)], max(rev[i], rev[max(0, i - 1)]), 3 if i == n - 1 else rev[i], 2.0 if i else 1.0)
            for i in range(n)]


def largest_activation(vae, height, width, direction):
    """Elements per image of the largest activation an untiled pass over (height, width) pixels holds."""
    resolution = 1.0 if direction == "encode" else 1.0 / downsample_factor(vae)  # level input / image
    largest = 0.0
    for _, widest, _, scale in level_shapes(vae, direction):
        # Encoder convolutions run at the level's input resolution, decoder ones at its output's.
        work = resolution * (scale if direction == "decode" else 1.0)
        largest = max(largest, widest * height * work * width * work)
        resolution *= scale
    return largest


def estimate_memory(vae, batch, height, width, direction, tile=None, dtype=None):
    """Estimated peak bytes of an encode or decode of (height, width) images, untiled or with `tile`."""
    itemsize = torch.empty((), dtype=dtype or model_dtype(vae)).element_size()
    if tile is None:
        return int(PEAK_ACTIVATIONS * largest_activation(vae, height, width, direction) * batch * itemsize)
    f = downsample_factor(vae)
    # Untiled at latent resolution: the mid-block (with its attention) and the encoder's output convs.
    peak = PEAK_ACTIVATIONS * vae.config.block_out_channels[-1] * math.ceil(height / f) * math.ceil(width / f)
    shapes = level_shapes(vae, direction)
    resolution = 1.0 if direction == "encode" else 1.0 / f  # of the current stage input, relative to the image
    for group in stage_groups([shape[3] for shape in shapes], resolution):
        area = height * resolution * width * resolution  # stage input pixels
        window = min(tile, height) * resolution * min(tile, width) * resolution  # one tile, in input pixels
        held = shapes[group[0]][0] * area  # the stage input, held whole ...
        level_res, work = 1.0, 0.0
        for i in group:
            _, widest, _, scale = shapes[i]
            # Encoder convolutions run at the level's input resolution, decoder ones at its output's.
            work_res = level_res * (scale if direction == "decode" else 1.0)
            work = max(work, widest * window * work_res**2)
            level_res *= scale
        held += shapes[group[-1]][2] * area * level_res**2  # ... and its output
        peak = max(peak, held + PEAK_ACTIVATIONS * work)
        resolution *= level_res
    if direction == "encode":
        peak += 3 * height * width  # the caller's image stays alive throughout
    return int(peak * batch * itemsize)


def memory_budget_bytes(device, memory_budget=None):
    """The memory an encode or decode may use: the argument, $VAEKIT_MEMORY_BUDGET, free GPU or system memory."""
    if memory_budget is None:
        memory_budget = os.environ.get("VAEKIT_MEMORY_BUDGET") or None
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(0.9 * (free + cached))
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        return int(0.8 * available)
    except (OSError, StopIteration):
        return None


def choose_tile(vae, batch, height, width, direction, budget, dtype=None):
    """None when the untiled pass fits `budget` bytes, else the largest tile (pixels) whose estimate fits."""
    if budget is None or estimate_memory(vae, batch, height, width, direction, dtype=dtype) <= budget:
        return None
    f = downsample_factor(vae)
    smallest = minimum_tile(vae)
    tile = min(MAX_AUTO_TILE, max(height, width)) // f * f
    while tile > smallest and estimate_memory(vae, batch, height, width, direction, tile, dtype) > budget:
        tile -= f
    return max(tile, smallest)


def is_out_of_memory(error):
    """True for a CUDA or CPU allocation failure."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
