"""Encode and decode images of any size, tiled when memory asks for it, with fp32 fallback for fp16/bf16.

Size rule: an image (B, 3, H, W) is padded on the bottom and right (reflect; replicate when the image
is smaller than the pad) to a multiple of the downsampling factor f, so its latents are
(B, C, ceil(H / f), ceil(W / f)). `decode(..., size=(H, W))` crops the decoded image back to (H, W);
without `size` it returns (h * f, w * f).

Tiling is exact: a tiled pass gives the untiled result up to float rounding (see docs/tiling.md).
diffusers' tiling blends overlapping tiles that each normalise with their own GroupNorm statistics,
which shows as seams and colour drift; here no tile ever normalises on its own:

- The global part of each network, the mid-block with its attention, runs untiled at latent
  resolution, where it is small.
- The high-resolution convolutional part is a chain of resolution levels (the encoder's down
  blocks; the decoder's up blocks, each with the upsampler before it), grouped into stages. A
  stage's output is assembled whole and is the next stage's input; a stage ends only where its
  output is at most a quarter of the image's resolution, so what is held whole is small next to
  the full-resolution activations the tiles work on.
- Inside a stage, tiles of the stage input run once per GroupNorm: pass k normalises the first k
  GroupNorms with image-wide statistics measured in earlier passes, adds the moments of the (k+1)-th
  GroupNorm's input over each tile's core (the part of the image the tile owns), and stops there.
  After the last GroupNorm is measured, a final pass writes each tile's core into the stage output.
- Each tile carries context around its core at least as wide as the stage's receptive field, so its
  core sees exactly the neighbourhood it has untiled; cores are pasted, never blended.

The price is compute: a stage with n GroupNorms runs its tiles partially n times and fully once,
about 2-4x the untiled cost in all. Memory is bounded by the tile, plus the whole stage inputs and
outputs at their (lower) resolutions.
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
from vaekit.model import cast_vae, downsample_factor

# Default window for tile="auto" when the budget allows any size: large windows waste less on context.
MAX_AUTO_TILE = 1024
# Peak memory of a forward pass, in units of its largest activation tensor: a ResNet block's input,
# GroupNorm output, SiLU output and convolution output can be alive together. An estimate for
# tile="auto" only; scripts/bench_tiling.py measures the real peaks.
PEAK_ACTIVATIONS = 4.0


# ---------------------------------------------------------------------------------------------------
# Model geometry and checks


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


def check_tiling(vae, tile, overlap=None):
    """Validate a tile size and overlap in image pixels; raise VaekitError saying what to pass instead."""
    factor = downsample_factor(vae)
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise VaekitError(f"tile must be 'auto', 'off' or a size in pixels, got {tile!r}.")
    if tile <= 0 or tile % factor:
        raise VaekitError(f"tile={tile} must be a positive multiple of the downsampling factor {factor}.")
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0
                                or overlap % factor):
        raise VaekitError(
            f"overlap={overlap!r} must be a non-negative multiple of the downsampling factor {factor} "
            "(or left unset: each stage then takes the context that makes tiles exact)."
        )
    check_tile_fits(vae, tile, overlap)


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


# ---------------------------------------------------------------------------------------------------
# Tile layout


@dataclass(frozen=True)
class Tile:
    """A window of the stage input and the core inside it that this tile owns, as (y0, y1, x0, x1)."""

    window: tuple
    core: tuple  # relative to the window


def split_axis(length, tile, overlap, align):
    """Split [0, length) into equal windows of at most `tile` pixels and the cores they own.

    As few windows as `tile` allows, each as small as that count allows; equal windows make every
    tile allocate the same buffer sizes, so the allocator reuses them instead of fragmenting.
    Window starts are multiples of `align`, spread evenly from 0 to length - size, with at least
    2 * overlap in common between neighbours; the core boundary lies in the middle of that common
    part, so every inner core edge is at least `overlap` from its window's edge. `length`, `tile` and `overlap` are multiples of `align`. Returns [((w0, w1), (c0, c1))].
    """
    if length <= tile:
        return [((0, length), (0, length))]

    def windows_needed(size):
        stride = (size - 2 * overlap) // align * align  # the largest spacing that keeps 2 * overlap in common
        return 1 + math.ceil((length - size) / stride) if stride > 0 else math.inf

    count = windows_needed(tile)
    # The smallest window that still needs no more than `count` windows: no pixel computed in vain.
    size = math.ceil((length + (count - 1) * 2 * overlap) / count / align) * align
    while windows_needed(size) > count:
        size += align
    tile = min(tile, size)
    stride = (tile - 2 * overlap) // align * align
    count = 1 + math.ceil((length - tile) / stride)
    spacing = (length - tile) / (count - 1)
    starts = [int(i * spacing // align) * align for i in range(count - 1)] + [length - tile]
    bounds = [0] + [(starts[i + 1] + starts[i] + tile) // 2 // align * align for i in range(count - 1)] + [length]
    return [((start, start + tile), (bounds[i], bounds[i + 1])) for i, start in enumerate(starts)]


def plan_tiles(height, width, tile, overlap, align):
    """Tiles covering a (height, width) stage input, in row-major order."""
    tiles = []
    for (wy0, wy1), (cy0, cy1) in split_axis(height, tile, overlap, align):
        for (wx0, wx1), (cx0, cx1) in split_axis(width, tile, overlap, align):
            tiles.append(Tile((wy0, wy1, wx0, wx1), (cy0 - wy0, cy1 - wy0, cx0 - wx0, cx1 - wx0)))
    return tiles


# ---------------------------------------------------------------------------------------------------
# The networks, split where global attention ends and the high-resolution convolutions begin


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


def run_levels(levels, h):
    """The levels in sequence, untiled: the same modules, in the same order, as the diffusers forward."""
    for level in levels:
        h = level.run(h)
    return h


def encode_moments(vae, x):
    """Untiled: (B, 3, H, W) padded images -> (mean, logvar) of the posterior."""
    return encoder_tail(vae, run_levels(encoder_levels(vae), x))


def decode_latents(vae, z):
    """Untiled: (B, C, h, w) latents -> (B, 3, h * f, w * f) images."""
    return run_levels(decoder_levels(vae), decoder_head(vae, z))


def check_supported(vae):
    """Raise VaekitError for AutoencoderKL variants this module does not split correctly."""
    if getattr(vae.decoder, "conv_norm_out", None) is not None and not isinstance(vae.decoder.conv_norm_out, nn.GroupNorm):
        raise VaekitError("This VAE's decoder uses spatial normalisation (MoVQ style); vaekit tiling supports GroupNorm VAEs.")
    blocks = list(vae.encoder.down_blocks) + list(vae.decoder.up_blocks)
    if any(getattr(block, "attentions", None) for block in blocks):
        # Attention outside the mid-block is global at high resolution: tiles cannot reproduce it.
        raise VaekitError("This VAE has attention in its down/up blocks; vaekit tiling supports AutoencoderKL's "
                          "DownEncoderBlock2D / UpDecoderBlock2D only. Use tile='off'.")


# ---------------------------------------------------------------------------------------------------
# Stages: the tiled part of each network, a few resolution levels at a time


@dataclass
class Level:
    """One resolution level: a down block, or an up block with the upsampler before it."""

    run: object  # (B, C, h, w) -> (B, C', h * scale, w * scale)
    modules: list  # the modules it calls (for its GroupNorms and convolutions)
    scale: float  # output resolution / input resolution: 0.5 (downsampler), 1 or 2 (upsampler)
    radius: float  # receptive field in input pixels: how far a convolution chain reaches


@dataclass
class Stage:
    """Consecutive levels run tile by tile; only the stage's input and output are held whole."""

    levels: list
    scale: float  # output resolution / input resolution
    align: int  # tile cores are multiples of this many input pixels (2 per stride-2 downsampler)
    radius: int  # context in input pixels that makes a tile core exact

    @property
    def modules(self):
        return [m for level in self.levels for m in level.modules]

    def run(self, h):
        return run_levels(self.levels, h)


def conv_reach(modules):
    """Sum over the convolutions of kernel // 2 * dilation: how many of its own pixels a chain reaches."""
    reach = 0
    for module in modules:
        for conv in module.modules():
            if isinstance(conv, nn.Conv2d):
                reach += (conv.kernel_size[0] // 2) * conv.dilation[0] * conv.stride[0]
    return reach


def encoder_levels(vae):
    """The encoder's down blocks as levels, conv_in folded into the first."""
    enc = vae.encoder
    levels = []
    for i, block in enumerate(enc.down_blocks):
        modules = ([enc.conv_in] if i == 0 else []) + [block]

        def run(h, block=block, first=(i == 0)):
            if first:
                h = enc.conv_in(h)
            return block(h)

        # Convolutions run at the input resolution, the stride-2 one reaching 2 pixels; +1 for the
        # asymmetric zero padding of diffusers' downsampler.
        down = bool(block.downsamplers)
        levels.append(Level(run, modules, 0.5 if down else 1.0, conv_reach(modules) + (1 if down else 0)))
    return levels


def decoder_levels(vae):
    """The decoder's up blocks as levels, each starting with the previous block's upsampler (if any)."""
    dec = vae.decoder
    blocks = list(dec.up_blocks)
    levels = []
    for i, block in enumerate(blocks):
        upsamplers = blocks[i - 1].upsamplers if i > 0 else None
        last = i == len(blocks) - 1

        def run(h, block=block, upsamplers=upsamplers, last=last):
            for upsampler in upsamplers or ():
                h = upsampler(h)
            for resnet in block.resnets:
                h = resnet(h, None)
            if last:
                h = dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))
            return h

        modules = ([upsamplers] if upsamplers else []) + [block.resnets]
        modules += [dec.conv_norm_out, dec.conv_out] if last else []
        scale = 2.0 if upsamplers else 1.0
        # Every convolution runs at the output resolution, where a pixel is 1 / scale input pixels.
        levels.append(Level(run, modules, scale, conv_reach(modules) / scale))
    return levels


def stage_groups(scales, image_scale):
    """Level indices per stage: a stage ends only where its output is at most 1/4 of the image's size.

    A stage boundary is a tensor held whole, so none is kept at half the image resolution, where it
    would weigh as much as the activations the tiles save. `scales`: each level's output / input
    resolution; `image_scale`: the first input's resolution relative to the image (1 for the
    encoder, 1 / f for the decoder).
    """
    groups, current, scale = [], [], image_scale
    for i, level_scale in enumerate(scales):
        current.append(i)
        scale *= level_scale
        if scale <= 0.25 or i == len(scales) - 1:
            groups.append(current)
            current = []
    return groups


def group_levels(levels, image_scale):
    """The levels grouped into stages (see stage_groups)."""
    return [make_stage([levels[i] for i in group]) for group in stage_groups([l.scale for l in levels], image_scale)]


def make_stage(levels):
    """A Stage of levels, with its alignment and receptive radius in its input pixels."""
    align, radius, pixels = 1, 0.0, 1.0  # pixels: stage-input pixels per pixel of the current level's input
    for level in levels:
        radius += level.radius * pixels
        pixels /= level.scale
        if level.scale < 1:
            align *= round(1 / level.scale)
    radius = math.ceil(radius) + 1  # a pixel of margin
    scale = math.prod(level.scale for level in levels)
    return Stage(levels, scale, align, math.ceil(radius / align) * align)


def encoder_stages(vae):
    """The tiled part of the encoder: image -> (B, C, H/f, W/f)."""
    return group_levels(encoder_levels(vae), 1.0)


def decoder_stages(vae):
    """The tiled part of the decoder: (B, C, h, w) after the mid-block -> image."""
    return group_levels(decoder_levels(vae), 1.0 / downsample_factor(vae))


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


class StopPass(Exception):
    """Ends a tile's partial pass once the GroupNorm being measured has seen its input."""


class ImageWideNorms:
    """Shadows `forward` of every GroupNorm in a stage so that tiles normalise with image-wide statistics.

    GroupNorms are told apart by call order within the stage, the same in every tile. Call i with
    known statistics (i < len(stats)) normalises with stats[i]. Call len(stats), in a measuring
    pass, adds the moments of its input over the tile's core and ends the pass (StopPass).
    diffusers' modules are used unchanged and restored on exit.
    """

    def __init__(self, modules):
        norms = [m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.norms = list(dict.fromkeys(norms))  # a module reached twice is patched once
        self.stats = []  # (mean, var) (B, G) float64 per call index
        self.measuring = None  # Moments of call len(stats) while a measuring pass runs
        self.calls = 0
        self.window_hw = self.core = None

    def __enter__(self):
        for norm in self.norms:
            norm.forward = self.make_forward(norm)
        return self

    def __exit__(self, *exc):
        for norm in self.norms:
            del norm.forward

    def start_tile(self, window_hw, core):
        """Begin a tile: its window size at the stage input and the core it owns inside the window."""
        self.calls, self.window_hw, self.core = 0, window_hw, core

    def make_forward(self, norm):
        """The replacement forward of one GroupNorm."""
        silu = getattr(norm, "silu", False)  # vaekit.fast.GroupNormAct folds the block's SiLU into the norm

        def forward(x):
            index = self.calls
            self.calls += 1
            if index < len(self.stats):
                y = normalize_fixed(x, norm, *self.stats[index])
                return F.silu(y) if silu else y
            if self.measuring is None or x.ndim != 4:
                raise RuntimeError("vaekit.tiling: a GroupNorm ran without image-wide statistics (internal error).")
            self.measuring.add(self.core_of(x), norm.num_groups)
            raise StopPass

        return forward

    def core_of(self, x):
        """The part of activation x (at any resolution inside the stage) that the current tile owns."""
        (wh, ww), (y0, y1, x0, x1) = self.window_hw, self.core
        h, w = x.shape[-2:]
        # Cores are aligned to the stage's resampling, so these divisions are exact.
        return x[..., y0 * h // wh : y1 * h // wh, x0 * w // ww : x1 * w // ww]


_LIBC_TRIM = []  # [malloc_trim] once looked up; [None] where the C library has none


def release_free_memory(device):
    """On the CPU, hand memory freed by the last tile back to the OS (glibc's malloc_trim).

    glibc keeps freed blocks of tens of MB in its heap and arenas for reuse; with tiles of a few
    sizes run many times over, that grows the process's resident memory well past what is live.
    Written by hand: neither torch nor the standard library exposes malloc_trim.
    """
    if device.type != "cpu":
        return
    if not _LIBC_TRIM:
        import ctypes
        import ctypes.util

        try:
            _LIBC_TRIM.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC_TRIM.append(None)
    if _LIBC_TRIM[0] is not None:
        _LIBC_TRIM[0](0)


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


def stage_geometry(stage, pixels, tile, overlap):
    """(tile, overlap) in stage-input pixels for a stage whose input pixel spans `pixels` image pixels."""
    tile_s = max(stage.align, tile // pixels // stage.align * stage.align)
    if overlap is None:
        overlap_s = stage.radius
    else:
        overlap_s = math.ceil(math.ceil(overlap / pixels) / stage.align) * stage.align
    return tile_s, overlap_s


def run_stage_tiled(stage, x, tile, overlap):
    """stage.run(x) computed tile by tile with image-wide GroupNorm statistics; tile/overlap in input pixels."""
    batch, _, height, width = x.shape
    tiles = plan_tiles(height, width, tile, overlap, stage.align)

    def window(t):
        y0, y1, x0, x1 = t.window
        norms.start_tile((y1 - y0, x1 - x0), t.core)
        return x[..., y0:y1, x0:x1]

    def measure_next():
        """One measuring pass over every tile; False when the stage has no GroupNorm left to measure."""
        norms.measuring = Moments()
        for t in tiles:
            try:
                stage.run(window(t))
            except StopPass:
                continue
            finally:
                release_free_memory(x.device)
            return False  # the tile ran to the end: every GroupNorm already has its statistics
        norms.stats.append(norms.measuring.result())
        return True

    with ImageWideNorms(stage.modules) as norms:
        while measure_next():
            pass
        norms.measuring = None
        out = None
        for t in tiles:
            y = stage.run(window(t))
            release_free_memory(x.device)
            if out is None:
                out = y.new_empty(batch, y.shape[1], int(height * stage.scale), int(width * stage.scale))
            cy0, cy1, cx0, cx1 = (int(v * stage.scale) for v in t.core)
            oy, ox = int(t.window[0] * stage.scale), int(t.window[2] * stage.scale)
            out[..., oy + cy0 : oy + cy1, ox + cx0 : ox + cx1] = y[..., cy0:cy1, cx0:cx1]
            del y
    return out


def run_stages_tiled(stages, x, pixels, tile, overlap):
    """Run stages in sequence, each tiled; `pixels`: image pixels per pixel of x."""
    for stage in stages:
        tile_s, overlap_s = stage_geometry(stage, pixels, tile, overlap)
        x = run_stage_tiled(stage, x, tile_s, overlap_s)
        pixels = round(pixels / stage.scale)
    return x


def minimum_tile(vae, overlap=None):
    """The smallest tile (image pixels, a multiple of f) whose every stage keeps a core beside its context."""
    f = downsample_factor(vae)
    smallest = f
    for stages, pixels in ((encoder_stages(vae), 1), (decoder_stages(vae), f)):
        for stage in stages:
            _, overlap_s = stage_geometry(stage, pixels, f, overlap)
            smallest = max(smallest, math.ceil((2 * overlap_s + stage.align) * pixels))
            pixels = round(pixels / stage.scale)
    return math.ceil(smallest / f) * f


def check_tile_fits(vae, tile, overlap):
    """Raise VaekitError when `tile` is too small for this VAE's context at some stage."""
    smallest = minimum_tile(vae, overlap)
    if tile < smallest:
        what = "the receptive field of each stage" if overlap is None else f"overlap={overlap}"
        raise VaekitError(
            f"tile={tile} is too small for this VAE: with {what}, tiles must be at least {smallest} px "
            f"to keep a core of their own. Use --tile {smallest} or larger, or --tile auto."
        )


def encode_tiled(vae, x, tile, overlap=None):
    """(B, 3, H, W) padded images -> (mean, logvar), the down blocks run in tiles of `tile` pixels."""
    h = run_stages_tiled(encoder_stages(vae), x, 1, tile, overlap)
    return encoder_tail(vae, h)


def decode_tiled(vae, z, tile, overlap=None):
    """(B, C, h, w) latents -> (B, 3, h*f, w*f) images, the up blocks run in tiles of `tile` pixels."""
    h = decoder_head(vae, z)
    return run_stages_tiled(decoder_stages(vae), h, downsample_factor(vae), tile, overlap)


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
            cast_vae(vae, dtype=torch.float32)
            return fn(vae, *[t.to(torch.float32) for t in inputs])
        finally:
            cast_vae(vae, dtype=dtype)


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
                tile = max(minimum_tile(vae, overlap), min(MAX_AUTO_TILE, max(height, width) // 2) // f * f)
                warnings.warn(f"vaekit: untiled {direction} ran out of memory; retrying in tiles of {tile} px.", stacklevel=3)
    check_tiling(vae, tile, overlap)
    if tile >= max(height, width):
        return run_with_fallback(vae, untiled, x)
    return run_with_fallback(vae, lambda v, t: tiled(v, t, tile, overlap), x)


def encode(vae, x, tile="off", overlap=None, memory_budget=None):
    """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, C, ceil(H/f), ceil(W/f)), in float32.

    tile: 'off', 'auto' (tile when the untiled pass would exceed the memory budget or runs out of
    memory) or a tile size in pixels. overlap: context pixels around each tile core; None (default)
    gives each stage its receptive field, which makes the tiled result equal the untiled one.
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
