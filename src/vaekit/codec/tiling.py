"""Exact tiled encode and decode: the networks cut into stages, tiles sharing image-wide GroupNorm statistics.

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
outputs at their (lower) resolutions. The size rule, padding, tile="auto" and the fp32 retry live in
vaekit.codec.inference.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.errors import VaekitError
from vaekit.model.architecture import downsample_factor
from vaekit.moments import RunningMoments


# ---------------------------------------------------------------------------------------------------
# Model geometry and checks


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


def check_overlap(vae, overlap):
    """Raise VaekitError unless `overlap` is None or a non-negative multiple of the downsampling factor."""
    factor = downsample_factor(vae)
    if overlap is not None and (isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0
                                or overlap % factor):
        raise VaekitError(
            f"overlap={overlap!r} must be a non-negative multiple of the downsampling factor {factor} (--overlap "
            f"{overlap} was given), or left unset so that each stage takes the context that makes tiles exact."
        )


def check_tiling(vae, tile, overlap=None):
    """Validate a tile size and overlap in image pixels; raise VaekitError saying what to pass instead."""
    factor = downsample_factor(vae)
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise VaekitError(f"tile must be 'auto', 'off' or a size in pixels, got {tile!r}.")
    if tile <= 0 or tile % factor:
        raise VaekitError(f"tile={tile} must be a positive multiple of the downsampling factor {factor}.")
    check_overlap(vae, overlap)
    check_tile_fits(vae, tile, overlap)


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


def encode_untiled(vae, x):
    """Untiled: (B, 3, H, W) padded images -> (mean, logvar) of the posterior."""
    return encoder_tail(vae, run_levels(encoder_levels(vae), x))


def decode_untiled(vae, z):
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


class GroupMoments(RunningMoments):
    """Moments per (batch, group) of a GroupNorm input, added region by region (tile cores) in float64."""

    def add_region(self, x, groups):
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

    def result(self):
        """(mean, var), each (B, G) float64."""
        return self.mean, self.variance()


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
        silu = getattr(norm, "silu", False)  # vaekit.codec.levers.GroupNormAct folds the block's SiLU into the norm

        def forward(x):
            index = self.calls
            self.calls += 1
            if index < len(self.stats):
                y = normalize_fixed(x, norm, *self.stats[index])
                return F.silu(y) if silu else y
            if self.measuring is None or x.ndim != 4:
                raise RuntimeError("vaekit.codec.tiling: a GroupNorm ran without image-wide statistics (internal error).")
            self.measuring.add_region(self.core_of(x), norm.num_groups)
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
        import ctypes  # the C library, looked up once and only on the CPU
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
        norms.measuring = GroupMoments()
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
