"""Encode and decode images of any size, tiled when memory asks for it, with fp32 fallback for fp16/bf16.

Size rule: an image (B, 3, H, W) is padded on the bottom and right (reflect; replicate when the image
is smaller than the pad) to a multiple of the downsampling factor f, so its latents are
(B, C, ceil(H / f), ceil(W / f)). `decode(..., size=(H, W))` crops the decoded image back to (H, W);
without `size` it returns (h * f, w * f).

Tiling (see docs/tiling.md): the global part of each network, the mid-block with its attention, runs
untiled at latent resolution, where it is small. The high-resolution convolutional part runs tile by
tile, and every GroupNorm in it normalises with statistics gathered over the whole image, so tiles do
not normalise independently (the cause of diffusers' seams and colour drift):

    pass 0   each tile normalises with its own statistics; every GroupNorm's input moments are
             accumulated over the tile's core (the part of the image the tile owns), exactly once
    pass k   each tile normalises with the image-wide statistics of pass k-1; moments accumulate again
    last     tiles run with the final statistics and their cores are pasted into the output

After pass k the first k+1 GroupNorms have exactly the untiled statistics (layer j's input depends only
on the statistics of layers before it), and the rest converge much faster than that in practice; passes
stop when no statistic moves by more than `STATS_TOLERANCE` of its standard deviation. Each tile runs
with `overlap` extra pixels of context on every inner side, so convolutions near its core see the same
neighbourhood as untiled; cores are cropped, never blended.
"""

import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import VaekitError

# A pass stops the iteration when no GroupNorm mean or std moves by more than this many stds.
STATS_TOLERANCE = 1e-3
# Statistic passes at most, before the output pass (each pass makes at least one more layer exact).
MAX_STAT_PASSES = 4
# Default context around each tile core, in image pixels, when `overlap` is not given (rounded to f).
DEFAULT_OVERLAP = 32
# Default window for tile="auto" when the budget allows any size: large windows waste less on overlap.
MAX_AUTO_TILE = 1024
# Peak memory of a forward pass, in units of its largest activation tensor: measured with
# scripts/bench_tiling.py --calibrate on CPU (input, GroupNorm output, SiLU output and conv output
# of a ResNet block are alive together).
PEAK_ACTIVATIONS = 4.0


# ---------------------------------------------------------------------------------------------------
# Model geometry and checks


def downsample_factor(vae):
    """Pixels per latent along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def model_dtype(vae):
    """The dtype of the model's weights."""
    return next(vae.parameters()).dtype


def model_device(vae):
    """The device of the model's weights."""
    return next(vae.parameters()).device


def pad_to_multiple(x, multiple):
    """Pad (B, C, H, W) on the bottom and right to multiples of `multiple` (reflect; replicate when too small)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def check_images(x, vae):
    """Raise VaekitError unless `x` is an image batch (B, in_channels, H, W)."""
    channels = vae.config.in_channels
    if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise VaekitError(f"Expected images shaped (B, {channels}, H, W) in [-1, 1], got {shape}.")


def check_latents(z, vae):
    """Raise VaekitError unless `z` is a latent batch (B, latent_channels, h, w)."""
    channels = vae.config.latent_channels
    if not torch.is_tensor(z) or z.ndim != 4 or z.shape[1] != channels:
        shape = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
        raise VaekitError(f"Expected latents shaped (B, {channels}, h, w), got {shape}.")


def check_tiling(tile, overlap, factor):
    """Validate a tile size and overlap in image pixels; raise VaekitError saying what to pass instead."""
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise VaekitError(f"tile must be 'auto', 'off' or a size in pixels, got {tile!r}.")
    if tile <= 0 or tile % factor:
        raise VaekitError(f"tile={tile} must be a positive multiple of the downsampling factor {factor}.")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0 or overlap % factor:
        raise VaekitError(f"overlap={overlap!r} must be a non-negative multiple of the downsampling factor {factor}.")
    if 2 * overlap >= tile:
        raise VaekitError(
            f"overlap={overlap} must be less than half the tile ({tile}): each tile keeps tile - 2 * overlap "
            f"pixels of its own. Use a larger tile or a smaller overlap."
        )


def parse_tile(value):
    """'auto', 'off' or an int from a CLI or API value."""
    if isinstance(value, str):
        if value in ("auto", "off"):
            return value
        if value.isdigit():
            return int(value)
        raise VaekitError(f"tile must be 'auto', 'off' or a size in pixels, got '{value}'.")
    if value is None:
        return "off"
    return value


def default_overlap(tile, factor):
    """DEFAULT_OVERLAP rounded up to the factor, shrunk to fit under half the tile."""
    overlap = math.ceil(DEFAULT_OVERLAP / factor) * factor
    while overlap and 2 * overlap >= tile:
        overlap -= factor
    return overlap


# ---------------------------------------------------------------------------------------------------
# Tile layout


@dataclass(frozen=True)
class Tile:
    """A window of the segment input and the core inside it that this tile owns, as (y0, y1, x0, x1)."""

    window: tuple
    core: tuple  # relative to the window


def split_axis(length, tile, overlap, align):
    """Split [0, length) into cores (multiples of `align`) with windows core +- overlap of at most `tile`.

    Border windows have no context on their outer side, so their cores may be `tile - overlap` long;
    inner cores at most `tile - 2 * overlap`. Returns [((w0, w1), (c0, c1))] in absolute coordinates.
    """
    if length <= tile:
        return [((0, length), (0, length))]
    border, inner = tile - overlap, tile - 2 * overlap
    count = 2 + max(0, math.ceil((length - 2 * border) / inner))
    caps = [border] + [inner] * (count - 2) + [border]
    # Share the length out in proportion to each core's capacity, in whole alignment units.
    units = length // align
    sizes = [cap * units // sum(caps) for cap in caps]
    for i in sorted(range(count), key=lambda i: sizes[i] * align - caps[i]):
        if sum(sizes) == units:
            break
        sizes[i] += 1
    spans, start = [], 0
    for size in sizes:
        end = start + size * align
        spans.append(((max(0, start - overlap), min(length, end + overlap)), (start, end)))
        start = end
    return spans


def plan_tiles(height, width, tile, overlap, align):
    """Tiles covering a (height, width) segment input, in row-major order."""
    tiles = []
    for (wy0, wy1), (cy0, cy1) in split_axis(height, tile, overlap, align):
        for (wx0, wx1), (cx0, cx1) in split_axis(width, tile, overlap, align):
            tiles.append(Tile((wy0, wy1, wx0, wx1), (cy0 - wy0, cy1 - wy0, cx0 - wx0, cx1 - wx0)))
    return tiles


# ---------------------------------------------------------------------------------------------------
# Image-wide GroupNorm statistics


class Moments:
    """Count, mean and sum of squared deviations per (batch, group), merged across tiles in float64."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, x, groups):
        """Add a region (B, C, h, w) of a GroupNorm input."""
        batch, channels, h, w = x.shape
        if h * w == 0:
            return
        var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)  # (B, C) each
        mean_c = mean_c.double().view(batch, groups, channels // groups)  # (B, G, C/G)
        var_c = var_c.double().view(batch, groups, channels // groups)
        mean = mean_c.mean(-1)  # (B, G)
        m2 = (var_c.sum(-1) + (mean_c - mean[..., None]).pow(2).sum(-1)) * (h * w)
        self.merge(h * w * (channels // groups), mean, m2)

    def merge(self, count, mean, m2):
        """Merge another set of moments: the parallel variance update of Chan, Golub and LeVeque (1979)."""
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * count / total)
        self.count = total

    def result(self):
        """(mean, var), each (B, G) float64."""
        return self.mean, self.m2 / self.count


class SharedGroupNorms:
    """Forward-patches every GroupNorm under some modules so that tiles share image-wide statistics.

    While active, each GroupNorm (a) adds the moments of its input over the current tile's core to
    `gathered`, when gathering, and (b) normalises with image-wide statistics. diffusers' modules are
    used unchanged; only `forward` of the norm instances is shadowed, and restored on exit.

    How (b) works: a tile normalises with its own window statistics (mean_t, std_t) corrected by how the
    image-wide statistics (mean, std) differed from them in the previous pass, in units of std_t:
        offset = (mean - mean_t) / std_t,  ratio = std / std_t      (remembered per tile and layer)
        normalise with  mean_t' + offset * std_t',  ratio * std_t'  (std_t' measured now)
    At the fixed point this is exactly (mean, std). Unlike normalising with last pass's (mean, std)
    directly, it keeps GroupNorm's invariance to the scale and shift of its input, so an error upstream
    is cancelled here instead of compounding through the depth of the network.
    """

    def __init__(self, modules, relative=True):
        self.norms = [m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.relative = relative
        self.fixed = {}  # norm -> (mean, var) (B, G) float64, image-wide, from the last gathering pass
        self.local = {}  # (norm, tile index) -> (mean, std) of the tile window when gathered
        self.gathered = None
        self.window_hw = None
        self.core = None
        self.index = None

    def __enter__(self):
        for norm in self.norms:
            norm.forward = self.make_forward(norm)
        return self

    def __exit__(self, *exc):
        for norm in self.norms:
            del norm.forward

    def select(self, index, window_hw, core):
        """Set the current tile: its index, window size at the segment input and core inside the window."""
        self.index, self.window_hw, self.core = index, window_hw, core

    def make_forward(self, norm):
        """The replacement forward of one GroupNorm."""

        def forward(x):
            if x.ndim != 4:  # an attention block's norm on (B, C, N): stays per tile (see docs/tiling.md)
                return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
            if self.gathered is not None:
                self.gathered[norm].add(self.core_of(x), norm.num_groups)
            stats = self.fixed.get(norm)
            if stats is not None and not self.relative:
                return normalize_fixed(x, norm, *stats)
            window = Moments()
            window.add(x, norm.num_groups)
            mean_t, var_t = window.result()
            std_t = var_t.sqrt()
            previous = self.local.get((norm, self.index))
            if self.gathered is not None:
                self.local[(norm, self.index)] = (mean_t, std_t)
            if stats is None or previous is None:
                return normalize_fixed(x, norm, mean_t, var_t)
            mean, var = stats
            prev_mean, prev_std = previous
            tiny = 1e-12
            offset = (mean - prev_mean) / prev_std.clamp_min(tiny)
            ratio = var.sqrt() / prev_std.clamp_min(tiny)
            return normalize_fixed(x, norm, mean_t + offset * std_t, (ratio * std_t).pow(2))

        return forward

    def core_of(self, x):
        """The part of activation x (at any resolution inside the segment) that the current tile owns."""
        (wh, ww), (y0, y1, x0, x1) = self.window_hw, self.core
        h, w = x.shape[-2:]
        # Windows and cores are aligned to the total resampling factor, so these divisions are exact.
        return x[..., y0 * h // wh : y1 * h // wh, x0 * w // ww : x1 * w // ww]

    def gather_begin(self):
        """Start accumulating fresh moments for every norm."""
        self.gathered = {norm: Moments() for norm in self.norms}

    def gather_end(self):
        """Stop accumulating; return the largest change against the previous statistics, in stds."""
        new = {norm: moments.result() for norm, moments in self.gathered.items() if moments.mean is not None}
        change = math.inf
        if self.fixed and new.keys() == self.fixed.keys():
            change = 0.0
            for norm, (mean, var) in new.items():
                old_mean, old_var = self.fixed[norm]
                std = var.sqrt().clamp_min(1e-12)
                shift = ((mean - old_mean).abs() / std).max()
                stretch = ((std - old_var.sqrt()).abs() / std).max()
                change = max(change, float(shift), float(stretch))
        self.fixed, self.gathered = new, None
        return change


def normalize_fixed(x, norm, mean, var):
    """GroupNorm of x (B, C, h, w) with given per-(batch, group) mean and var (B, G), then the affine."""
    batch, channels = x.shape[:2]
    per_group = channels // norm.num_groups
    mean_c = mean.repeat_interleave(per_group, dim=1)  # (B, C)
    scale_c = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
    if norm.weight is not None:
        scale_c = scale_c * norm.weight.double()
    y = x - mean_c.to(x.dtype)[..., None, None]
    y.mul_(scale_c.to(x.dtype)[..., None, None])
    if norm.bias is not None:
        y.add_(norm.bias.to(x.dtype)[None, :, None, None])
    return y


# ---------------------------------------------------------------------------------------------------
# The networks, split where global attention ends and the high-resolution convolutions begin


def encoder_head(vae, x):
    """Tiled part of the encoder: conv_in and the down blocks, (B, 3, H, W) -> (B, C, H/f, W/f)."""
    enc = vae.encoder
    h = enc.conv_in(x)
    for block in enc.down_blocks:
        h = block(h)
    return h


def encoder_tail(vae, h):
    """Untiled part of the encoder at latent resolution: mid-block (attention), output convs -> (mean, logvar)."""
    enc = vae.encoder
    h = enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
    if getattr(vae, "quant_conv", None) is not None:
        h = vae.quant_conv(h)
    mean, logvar = h.chunk(2, dim=1)
    # The clamp diffusers' DiagonalGaussianDistribution applies, so logvar matches vae.encode().
    return mean, logvar.clamp(-30.0, 20.0)


def decoder_head(vae, z):
    """Untiled part of the decoder at latent resolution: post_quant_conv, conv_in, mid-block (attention)."""
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    dec = vae.decoder
    return dec.mid_block(dec.conv_in(z), None)


def decoder_tail(vae, h):
    """Tiled part of the decoder: the up blocks and output convs, (B, C, h, w) -> (B, 3, h*f, w*f)."""
    dec = vae.decoder
    for block in dec.up_blocks:
        h = block(h, None)
    return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))


def encode_moments(vae, x):
    """Untiled: (B, 3, H, W) padded images -> (mean, logvar) of the posterior."""
    return encoder_tail(vae, encoder_head(vae, x))


def decode_latents(vae, z):
    """Untiled: (B, C, h, w) latents -> (B, 3, h * f, w * f) images."""
    return decoder_tail(vae, decoder_head(vae, z))


def check_supported(vae):
    """Raise VaekitError for AutoencoderKL variants this module does not split correctly."""
    if getattr(vae.decoder, "conv_norm_out", None) is not None and not isinstance(vae.decoder.conv_norm_out, nn.GroupNorm):
        raise VaekitError("This VAE's decoder uses spatial normalisation (MoVQ style); vaekit tiling supports GroupNorm VAEs.")


def run_segment_tiled(segment, x, tiles, modules, scale, max_passes=MAX_STAT_PASSES, relative=True):
    """Run segment(x) tile by tile with image-wide GroupNorm statistics; `scale` = output size / input size."""
    batch, _, height, width = x.shape
    out = None
    with SharedGroupNorms(modules, relative=relative) as norms:
        for _ in range(max_passes):
            norms.gather_begin()
            for i, t in enumerate(tiles):
                y0, y1, x0, x1 = t.window
                norms.select(i, (y1 - y0, x1 - x0), t.core)
                segment(x[..., y0:y1, x0:x1])
            if norms.gather_end() < STATS_TOLERANCE:
                break
        for i, t in enumerate(tiles):
            y0, y1, x0, x1 = t.window
            norms.select(i, (y1 - y0, x1 - x0), t.core)
            y = segment(x[..., y0:y1, x0:x1])
            if out is None:
                out = y.new_empty(batch, y.shape[1], int(height * scale), int(width * scale))
            cy0, cy1, cx0, cx1 = (int(v * scale) for v in t.core)
            oy, ox = int(y0 * scale), int(x0 * scale)
            out[..., oy + cy0 : oy + cy1, ox + cx0 : ox + cx1] = y[..., cy0:cy1, cx0:cx1]
            del y
    return out


def encode_tiled(vae, x, tile, overlap):
    """(B, 3, H, W) padded images -> (mean, logvar), the down blocks run in tiles of `tile` pixels."""
    f = downsample_factor(vae)
    tiles = plan_tiles(x.shape[-2], x.shape[-1], tile, overlap, f)
    enc = vae.encoder
    h = run_segment_tiled(lambda t: encoder_head(vae, t), x, tiles, [enc.conv_in, enc.down_blocks], 1 / f)
    return encoder_tail(vae, h)


def decode_tiled(vae, z, tile, overlap):
    """(B, C, h, w) latents -> (B, 3, h*f, w*f) images, the up blocks run in tiles of `tile` pixels."""
    f = downsample_factor(vae)
    h = decoder_head(vae, z)
    tiles = plan_tiles(h.shape[-2], h.shape[-1], tile // f, overlap // f, 1)
    dec = vae.decoder
    return run_segment_tiled(
        lambda t: decoder_tail(vae, t), h, tiles, [dec.up_blocks, dec.conv_norm_out], f
    )


# ---------------------------------------------------------------------------------------------------
# Memory: an estimate of the untiled peak, the budget, and the choice of tile


def parse_bytes(value):
    """Bytes from an int or a string like '512M', '4G', '2.5GB'."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not match:
        raise VaekitError(f"Memory budget '{value}' is not a size: use bytes or a number with K, M, G or T.")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


def largest_activation(vae, height, width, direction):
    """Elements per image of the largest activation an untiled pass over (height, width) pixels holds."""
    channels = list(vae.config.block_out_channels)
    sizes = []
    if direction == "encode":
        for i, c in enumerate(channels):  # down block i works at 1 / 2^i, its input has the previous width
            pixels = math.ceil(height / 2**i) * math.ceil(width / 2**i)
            sizes.append(max(c, channels[max(0, i - 1)]) * pixels)
    else:
        top = len(channels) - 1
        rev = channels[::-1]
        for i, c in enumerate(rev):  # up block i works at 1 / 2^(top - i); its upsampler doubles the size
            pixels = math.ceil(height / 2 ** (top - i)) * math.ceil(width / 2 ** (top - i))
            sizes.append(max(c, rev[max(0, i - 1)]) * pixels)
            if i < top:
                sizes.append(c * pixels * 4)
    return max(sizes)


def estimate_memory(vae, batch, height, width, direction, tile=None, dtype=None):
    """Estimated peak bytes of an encode or decode of (height, width) images, untiled or with `tile`."""
    itemsize = torch.empty((), dtype=dtype or model_dtype(vae)).element_size()
    f = downsample_factor(vae)
    window_h, window_w = (height, width) if tile is None else (min(tile, height), min(tile, width))
    peak = PEAK_ACTIVATIONS * largest_activation(vae, window_h, window_w, direction)
    if tile is not None:
        # Held whole while tiles run: the image and the latent-resolution activations around the mid-block.
        latent = vae.config.block_out_channels[-1] * math.ceil(height / f) * math.ceil(width / f)
        peak += 3 * height * width + PEAK_ACTIVATIONS * latent
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
    smallest = 2 * default_overlap(4 * f, f) + 2 * f
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


# ---------------------------------------------------------------------------------------------------
# Precision fallback and the public API


def all_finite(*tensors):
    """True when every element of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def run_with_fallback(vae, fn, *inputs):
    """Run fn(vae, *inputs) in the model's dtype; if a reduced-precision result is not finite, redo it in fp32."""
    dtype = model_dtype(vae)
    with torch.no_grad():
        out = fn(vae, *[t.to(dtype) for t in inputs])
        outs = out if isinstance(out, tuple) else (out,)
        if dtype == torch.float32 or all_finite(*outs):
            return out
        del out, outs
        warnings.warn(
            f"vaekit: {str(dtype).removeprefix('torch.')} inference gave non-finite values (activations overflow "
            f"this precision); redoing the batch in float32.",
            stacklevel=3,
        )
        # Casting fp16/bf16 weights up and back down is exact, so the caller's model is unchanged.
        try:
            vae.to(torch.float32)
            return fn(vae, *[t.to(torch.float32) for t in inputs])
        finally:
            vae.to(dtype)


def run_tiling(vae, untiled, tiled, x, direction, pixels_hw, tile, overlap, memory_budget):
    """Dispatch on `tile`: untiled, tiled with a given size, or auto (by budget, and after out-of-memory)."""
    f = downsample_factor(vae)
    tile = parse_tile(tile)
    if tile == "off":
        return run_with_fallback(vae, untiled, x)
    height, width = pixels_hw
    if tile == "auto":
        budget = memory_budget_bytes(model_device(vae), memory_budget)
        tile = choose_tile(vae, x.shape[0], height, width, direction, budget)
        if tile is None:
            try:
                return run_with_fallback(vae, untiled, x)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                tile = min(MAX_AUTO_TILE, max(height, width) // 2) // f * f
                warnings.warn(f"vaekit: untiled {direction} ran out of memory; retrying in tiles of {tile} px.", stacklevel=3)
    overlap = default_overlap(tile, f) if overlap is None else overlap
    check_tiling(tile, overlap, f)
    if tile >= max(height, width):
        return run_with_fallback(vae, untiled, x)
    return run_with_fallback(vae, lambda v, t: tiled(v, t, tile, overlap), x)


def encode(vae, x, tile="off", overlap=None, memory_budget=None):
    """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, C, ceil(H/f), ceil(W/f)), in float32.

    tile: 'off', 'auto' (tile when the untiled pass would exceed the memory budget or runs out of
    memory) or a tile size in pixels; overlap: context pixels around each tile core.
    """
    check_images(x, vae)
    check_supported(vae)
    f = downsample_factor(vae)
    h, w = math.ceil(x.shape[-2] / f), math.ceil(x.shape[-1] / f)
    x = pad_to_multiple(x.to(model_device(vae)), f)
    mean, logvar = run_tiling(
        vae, encode_moments, encode_tiled, x, "encode", x.shape[-2:], tile, overlap, memory_budget
    )
    return mean[..., :h, :w].float(), logvar[..., :h, :w].float()


def decode(vae, z, tile="off", overlap=None, memory_budget=None, size=None):
    """Latents (B, C, h, w) -> images (B, 3, h*f, w*f) in float32, cropped to `size` (H, W) when given.

    tile, overlap and memory_budget as for `encode`, in image pixels.
    """
    check_latents(z, vae)
    check_supported(vae)
    f = downsample_factor(vae)
    pixels = (z.shape[-2] * f, z.shape[-1] * f)
    images = run_tiling(
        vae, decode_latents, decode_tiled, z.to(model_device(vae)), "decode", pixels, tile, overlap, memory_budget
    ).float()
    if size is not None:
        images = images[..., : size[0], : size[1]]
    return images
