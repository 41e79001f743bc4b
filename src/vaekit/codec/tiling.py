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
- Inside a stage, exact mode (the default) runs the tiles once per GroupNorm: pass k normalises
  the first k GroupNorms with image-wide statistics measured in earlier passes, adds the moments of
  the (k+1)-th GroupNorm's input over each tile's core (the part of the image the tile owns), and
  stops there. Each pass resumes every tile from the activations its previous pass stopped at (its
  checkpoint: in memory up to an allowance, then in a spill file on the CPU, else recomputed; see
  vaekit.codec.checkpoints). After the last GroupNorm is measured, a final pass writes each tile's
  core into the stage output.
- Fast mode measures the low-resolution stages as exact mode does, estimates the statistics of
  the full-resolution stages from the stage run over subsampled inputs, then runs their tiles once
  (approximate; docs/tiling.md says where it drifts).
- Each tile carries context around its core at least as wide as the stage's receptive field, so its
  core sees exactly the neighbourhood it has untiled; cores are pasted, never blended.
- With a process group (vaekit.codec.parallel), each process runs a share of every stage's tiles;
  moments and stage outputs are summed across processes exactly.

Memory is bounded by the tile, plus the whole stage inputs and outputs at their (lower)
resolutions, plus the checkpoint allowance. The size rule, padding, tile="auto" and the fp32
retry live in vaekit.codec.inference.
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaekit.codec.checkpoints import CheckpointStore
from vaekit.codec.parallel import Processes
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

    @property
    def core_abs(self):
        """The core in stage-input pixels, (y0, y1, x0, x1)."""
        return (self.window[0] + self.core[0], self.window[0] + self.core[1],
                self.window[2] + self.core[2], self.window[2] + self.core[3])


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


def run_units(units, h):
    """The units in sequence, untiled (each GroupNorm measures its own input, as in the diffusers forward)."""
    state = [h]
    del h  # the units consume their inputs: each is freed as soon as nothing further needs it
    for unit in units:
        state = unit.run(state, None)
    return state[0]


def encode_untiled(vae, x):
    """Untiled: (B, 3, H, W) padded images -> (mean, logvar) of the posterior."""
    return encoder_tail(vae, run_units(encoder_units(vae), x))


def decode_untiled(vae, z):
    """Untiled: (B, C, h, w) latents -> (B, 3, h * f, w * f) images."""
    return run_units(decoder_units(vae), decoder_head(vae, z))


def plain_resnet(resnet):
    """Whether a diffusers ResnetBlock2D is the VAE kind: no time embedding, no resampling inside."""
    return (getattr(resnet, "time_emb_proj", None) is None and getattr(resnet, "upsample", None) is None
            and getattr(resnet, "downsample", None) is None and isinstance(resnet.norm1, nn.GroupNorm)
            and isinstance(resnet.norm2, nn.GroupNorm))


def check_supported(vae):
    """Raise VaekitError for AutoencoderKL variants this module does not split correctly."""
    if getattr(vae.decoder, "conv_norm_out", None) is not None and not isinstance(vae.decoder.conv_norm_out, nn.GroupNorm):
        raise VaekitError("This VAE's decoder uses spatial normalisation (MoVQ style); vaekit tiling supports GroupNorm VAEs.")
    blocks = list(vae.encoder.down_blocks) + list(vae.decoder.up_blocks)
    if any(getattr(block, "attentions", None) for block in blocks):
        # Attention outside the mid-block is global at high resolution: tiles cannot reproduce it.
        raise VaekitError("This VAE has attention in its down/up blocks; vaekit tiling supports AutoencoderKL's "
                          "DownEncoderBlock2D / UpDecoderBlock2D only. Use tile='off'.")
    if not all(plain_resnet(r) for block in blocks for r in block.resnets):
        raise VaekitError("This VAE's resnet blocks take a time embedding or resample inside; vaekit tiling supports "
                          "AutoencoderKL's plain ResnetBlock2D only. Use tile='off'.")


# ---------------------------------------------------------------------------------------------------
# Units: the modules of the tiled part, cut so that every GroupNorm starts a unit


@dataclass
class Unit:
    """A step of a stage: (state, stats) -> state, a list of tensors sharing one spatial extent.

    A unit consumes its input list (it empties it), so a tensor the caller no longer holds is freed
    as soon as the unit is done with it, not when the unit returns: a tile's peak memory is then
    the tensors alive at once inside one unit.
    A unit that starts with a GroupNorm normalises `state[norm_input]` with `stats` (image-wide
    mean and variance) or, given None, with the norm module itself (untiled). A tile's pass can stop
    before any unit and resume there from the state it kept.
    """

    name: str
    run: object
    modules: list  # the modules it calls
    scale: float  # output resolution / input resolution: 0.5 (downsampler), 1 or 2 (upsampler)
    reach: float  # receptive reach of its convolutions, in its input pixels
    norm: object = None  # the GroupNorm it starts with
    norm_input: int = 0

    @property
    def macs(self):
        """Multiply-adds per input pixel (convolutions only): what recomputing this unit costs."""
        total = 0.0
        for conv in convolutions(self.modules):
            per_output = conv.in_channels // conv.groups * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            # Upsampler convolutions run at 4x the unit's input pixels, a stride-2 one at 1/4.
            total += per_output * (self.scale**2 if self.scale > 1 else 1.0) / conv.stride[0] ** 2
        return total


def convolutions(modules):
    """The Conv2d layers inside `modules`, each once."""
    return list(dict.fromkeys(c for m in modules for c in m.modules() if isinstance(c, nn.Conv2d)))


def conv_reach(modules):
    """Sum over the convolutions of kernel // 2 * dilation * stride: how many of its own pixels a chain reaches."""
    return sum((c.kernel_size[0] // 2) * c.dilation[0] * c.stride[0] for c in convolutions(modules))


def group_norm(norm, x, stats):
    """A GroupNorm (and the SiLU a fused GroupNormAct carries) with image-wide `stats`, or the module itself."""
    if stats is None:
        return norm(x)
    y = normalize_fixed(x, norm, *stats)
    return F.silu(y) if getattr(norm, "silu", False) else y


def activation(module, h):
    """module(h), in place on `h` (a fresh buffer of the caller's) for a SiLU in inference: one buffer fewer.

    In place gives the same bits; with gradients on, autograd needs the input, so it runs as usual.
    """
    if isinstance(module, nn.SiLU) and not torch.is_grad_enabled():
        return F.silu(h, inplace=True)
    return module(h)


def module_unit(name, module, scale=1.0):
    """A module without GroupNorm called whole: conv_in, a downsampler or an upsampler."""
    if scale > 1:
        reach = conv_reach([module]) / scale  # its convolution runs after the nearest upsampling
    elif scale < 1:
        reach = conv_reach([module]) + 1  # +1: diffusers' downsampler pads asymmetrically (right and bottom)
    else:
        reach = conv_reach([module])
    return Unit(name, lambda state, stats: [module(state.pop())], [module], scale, reach)


def resnet_units(name, resnet):
    """A ResnetBlock2D as two units, one per GroupNorm; the second carries the block input for the residual.

    The same calls in the same order as diffusers' forward, so the untiled result is its bits.
    """
    def first(state, stats):
        x = state.pop()
        h = activation(resnet.nonlinearity, group_norm(resnet.norm1, x, stats))
        return [x, resnet.conv1(h)]

    def second(state, stats):
        h = state.pop()
        x = state.pop()
        h = group_norm(resnet.norm2, h, stats)  # one statement each: the buffer a name held is freed at once
        h = activation(resnet.nonlinearity, h)
        h = resnet.conv2(resnet.dropout(h))
        if resnet.conv_shortcut is not None:
            x = resnet.conv_shortcut(x)
        # In place on the fresh conv output: the bits of diffusers' (x + h) / factor without two more buffers.
        return [h.add_(x).div_(resnet.output_scale_factor)]

    modules_a = [resnet.norm1, resnet.conv1]
    modules_b = [resnet.norm2, resnet.conv2] + ([resnet.conv_shortcut] if resnet.conv_shortcut is not None else [])
    return [Unit(f"{name}.norm1", first, modules_a, 1.0, conv_reach(modules_a), resnet.norm1, 0),
            Unit(f"{name}.norm2", second, modules_b, 1.0, conv_reach(modules_b), resnet.norm2, 1)]


def output_unit(dec):
    """The decoder's output: conv_norm_out, conv_act, conv_out."""
    def run(state, stats):
        return [dec.conv_out(dec.conv_act(group_norm(dec.conv_norm_out, state.pop(), stats)))]

    modules = [dec.conv_norm_out, dec.conv_out]
    return Unit("decoder.out", run, modules, 1.0, conv_reach(modules), dec.conv_norm_out, 0)


def encoder_levels(vae):
    """The encoder's down blocks as lists of units, conv_in folded into the first."""
    enc = vae.encoder
    levels = []
    for i, block in enumerate(enc.down_blocks):
        units = [module_unit("encoder.conv_in", enc.conv_in)] if i == 0 else []
        for j, resnet in enumerate(block.resnets):
            units += resnet_units(f"encoder.down_blocks.{i}.resnets.{j}", resnet)
        for j, down in enumerate(block.downsamplers or ()):
            units.append(module_unit(f"encoder.down_blocks.{i}.downsamplers.{j}", down, 0.5))
        levels.append(units)
    return levels


def decoder_levels(vae):
    """The decoder's up blocks as lists of units, each starting with the previous block's upsampler (if any)."""
    dec = vae.decoder
    blocks = list(dec.up_blocks)
    levels = []
    for i, block in enumerate(blocks):
        units = []
        if i > 0:
            for j, up in enumerate(blocks[i - 1].upsamplers or ()):
                units.append(module_unit(f"decoder.up_blocks.{i - 1}.upsamplers.{j}", up, 2.0))
        for j, resnet in enumerate(block.resnets):
            units += resnet_units(f"decoder.up_blocks.{i}.resnets.{j}", resnet)
        if i == len(blocks) - 1:
            units.append(output_unit(dec))
        levels.append(units)
    return levels


def encoder_units(vae):
    """Every unit of the encoder's tiled part, in order."""
    return [unit for level in encoder_levels(vae) for unit in level]


def decoder_units(vae):
    """Every unit of the decoder's tiled part, in order."""
    return [unit for level in decoder_levels(vae) for unit in level]


# ---------------------------------------------------------------------------------------------------
# Stages: the units between two tensors held whole


@dataclass
class Stage:
    """Consecutive units run tile by tile; only the stage's input and output are held whole.

    Per unit boundary u (0 = the stage input, len(units) = its output): `res[u]`, the resolution
    relative to the stage input; `margin[u]`, the context in pixels at that resolution that keeps a
    core exact to the end of the stage; `step[u]`, the alignment crops there keep (the product of
    the stride-2 downsamplers still ahead), so every tile samples the untiled pixel grid.
    """

    units: list
    scale: float  # output resolution / input resolution
    align: int  # tile cores are multiples of this many input pixels
    radius: int  # context in input pixels that makes a tile core exact
    res: list
    margin: list
    step: list

    def run(self, h):
        return run_units(self.units, h)

    def region(self, u, core, extent, context=1.0):
        """The crop kept at boundary u for a tile core (stage-input pixels): core plus margin, aligned, clipped.

        `extent`: (height, width) of the stage input; `context` < 1 shrinks every margin alike (an
        explicit overlap below the receptive field: approximate). Returns (y0, y1, x0, x1) at boundary
        u's resolution.
        """
        res, margin, step = self.res[u], self.margin[u] * context, self.step[u]
        out = []
        for lo, hi, size in ((core[0], core[1], extent[0]), (core[2], core[3], extent[1])):
            a = math.floor((lo * res - margin) / step) * step
            b = math.ceil((hi * res + margin) / step) * step
            out += [max(0, int(a)), min(int(size * res), int(b))]
        return tuple(out)


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


def make_stage(units):
    """A Stage of units, with its geometry (see Stage)."""
    res = [1.0]
    for unit in units:
        res.append(res[-1] * unit.scale)
    margin, step = [0.0] * (len(units) + 1), [1] * (len(units) + 1)
    for u in range(len(units) - 1, -1, -1):
        unit = units[u]
        # A conv chain reaching r pixels computes exact values r pixels inside its input crop.
        margin[u] = unit.reach + margin[u + 1] / unit.scale
        step[u] = step[u + 1] * (round(1 / unit.scale) if unit.scale < 1 else 1)
    align = step[0]
    radius = math.ceil((math.ceil(margin[0]) + 1) / align) * align  # + 1: a pixel of slack for the tile plan
    return Stage(units, math.prod(unit.scale for unit in units), align, radius, res, margin, step)


def group_levels(levels, image_scale):
    """The levels (lists of units) grouped into stages (see stage_groups)."""
    scales = [math.prod(unit.scale for unit in level) for level in levels]
    return [make_stage([unit for i in group for unit in levels[i]]) for group in stage_groups(scales, image_scale)]


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
            return self
        var_c, mean_c = torch.var_mean(x.float(), dim=(2, 3), correction=0)  # (B, C) each
        mean_c = mean_c.double().view(batch, groups, channels // groups)  # (B, G, C/G)
        var_c = var_c.double().view(batch, groups, channels // groups)
        mean = mean_c.mean(-1)  # (B, G)
        m2 = (var_c.sum(-1) + (mean_c - mean[..., None]).pow(2).sum(-1)) * (h * w)
        return self.merge(h * w * (channels // groups), mean, m2)


def normalize_fixed(x, norm, mean, var):
    """GroupNorm of x (B, C, h, w) with given per-(batch, group) mean and var (B, G), then the affine.

    Folded into one scale and shift per channel (in float64), applied in one pass over x: the
    activations are large and the pass is memory-bound, so one pass instead of three is what counts.
    """
    per_group = x.shape[1] // norm.num_groups
    scale = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)  # (B, C)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])


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


# ---------------------------------------------------------------------------------------------------
# Running a stage in tiles


# Spill a checkpoint only when recomputing it costs at least this many multiply-adds per byte
# written. Measured on the 2-core CPU of docs/tiling.md: a 32-channel 3x3 convolution runs at ~56 G
# multiply-adds/s, a spilled byte costs ~2 ns to copy out, write, read back and free, so the
# break-even is ~110. So conv_in (7 per byte) and a 32- or 64-channel resnet's first half (36, 72)
# are recomputed, a whole resnet (144 and up) and a 128-channel resnet half (144) are spilled.
SPILL_MACS_PER_BYTE = 96


@dataclass
class TileOptions:
    """How tiles run beyond their size: the mode, the checkpoint memory, spilling, and the processes sharing them."""

    mode: str = "exact"  # "exact": image-wide statistics measured pass by pass; "fast": full-resolution stages estimated
    keep_bytes: int = 0  # exact mode: memory checkpoints may hold between passes
    spill: object = None  # exact mode: spill checkpoints to a temporary file (None: on the CPU only)
    processes: Processes = field(default_factory=Processes)


@dataclass
class TileState:
    """Where a tile's next pass starts: the unit whose input its checkpoint holds (0: the stage input)."""

    unit: int = 0
    stored: bool = False


class StageRun:
    """One stage run in tiles: measuring passes (exact) or statistics given (fast), then the final pass."""

    def __init__(self, stage, x, tile, overlap, options, store):
        self.stage, self.x, self.store, self.options = stage, x, store, options
        self.device, self.batch = x.device, x.shape[0]
        self.extent = tuple(x.shape[-2:])
        self.tiles = plan_tiles(*self.extent, tile, overlap, stage.align)
        self.mine = options.processes.share(len(self.tiles))
        self.states = {i: TileState() for i in self.mine}
        self.stats = {}  # unit index -> (mean, var), each (B, G) float64
        self.context = min(1.0, overlap / stage.radius) if stage.radius else 1.0

    def region(self, i, u):
        """Tile i's crop at boundary u."""
        return self.stage.region(u, self.tiles[i].core_abs, self.extent, self.context)

    def start(self, i):
        """Tile i's state at its checkpoint: (unit, tensors, origin (y, x) at that unit's resolution)."""
        state = self.states[i]
        if state.stored:
            tensors = self.store.get(i)
        else:
            state.unit = 0
            y0, y1, x0, x1 = self.region(i, 0)
            tensors = (self.x[..., y0:y1, x0:x1],)
        if self.store is None and self.device.type == "cpu":
            # Fast mode's single pass runs channels-last on the CPU: oneDNN convolves such tensors as
            # they are, where a contiguous (NCHW) one is reordered into its blocked layout and the
            # output back, two more full-size buffers per convolution. Measured on the benchmark:
            # 25 % less time for the whole fast encode + decode, a lower peak, the same PSNR. (Exact
            # mode stays contiguous: its moments and spill copies ran slower channels-last.)
            tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
        y0, _, x0, _ = self.region(i, state.unit)
        return state.unit, list(tensors), (y0, x0)

    def advance(self, i, target):
        """Run tile i from its checkpoint to the input of unit `target`; keep a checkpoint there if it pays."""
        stage = self.stage
        begin, tensors, origin = self.start(i)
        for u in range(begin, target):
            unit = stage.units[u]
            tensors = unit.run(tensors, self.stats.get(u) if unit.norm is not None else None)
            y0, y1, x0, x1 = self.region(i, u + 1)
            oy, ox = int(origin[0] * unit.scale), int(origin[1] * unit.scale)
            assert y0 >= oy and x0 >= ox, "vaekit.codec.tiling: a crop outside the computed tile (internal error)"
            tensors = [t[..., y0 - oy : y1 - oy, x0 - ox : x1 - ox] for t in tensors]
            if self.store is None:
                # A pass through the whole stage (fast mode) frees buffers of every size as it goes;
                # handed back unit by unit, they do not pile up in the allocator's cache.
                release_free_memory(self.device)
            origin = (y0, x0)
        if self.store is not None and begin < target < len(stage.units):
            if self.store.put(i, tensors, spill_ok=self.worth_spilling(begin, target, tensors)):
                self.states[i] = TileState(target, True)
        return tensors, origin

    def worth_spilling(self, begin, target, tensors):
        """Whether recomputing units begin..target costs more than writing and reading their output back."""
        res = self.stage.res
        macs = sum(self.stage.units[u].macs * (res[u] / res[target]) ** 2 for u in range(begin, target))
        per_pixel = sum(t.shape[1] * t.element_size() for t in tensors)
        return macs >= SPILL_MACS_PER_BYTE * per_pixel

    def measure(self, u):
        """One pass: every tile to unit u's input, the moments of its GroupNorm input over the tile's core."""
        unit, parts = self.stage.units[u], [None] * len(self.tiles)
        if self.store is not None:
            self.store.begin_pass()
        for i in self.mine:
            tensors, origin = self.advance(i, u)
            y0, y1, x0, x1 = self.core_at(i, u, origin)
            moments = GroupMoments().add_region(tensors[unit.norm_input][..., y0:y1, x0:x1], unit.norm.num_groups)
            parts[i] = (moments.count, moments.mean, moments.m2)
            del tensors
            release_free_memory(self.device)
        merged = self.options.processes.merge_moments(parts, self.batch, unit.norm.num_groups)
        self.stats[u] = (merged.mean, merged.variance())
        if self.mine and all(self.states[i].stored for i in self.mine):
            # Every tile resumes from a checkpoint of its own: the stage input is no longer needed
            # here (freed, when the caller handed over its reference: the decoder's last stage
            # input is a quarter of the tiled pass's peak).
            self.x = None

    def core_at(self, i, u, origin):
        """Tile i's core at boundary u, relative to a tensor whose top-left is `origin`."""
        res = self.stage.res[u]
        y0, y1, x0, x1 = self.tiles[i].core_abs
        return (int(y0 * res) - origin[0], int(y1 * res) - origin[0], int(x0 * res) - origin[1],
                int(x1 * res) - origin[1])

    def finish(self, last):
        """The final pass: every tile to the stage output, its core pasted; assembled across processes."""
        end, out = len(self.stage.units), None
        batch, (height, width) = self.batch, self.extent
        for i in self.mine:
            tensors, origin = self.advance(i, end)
            y = tensors[0]
            if out is None:
                shape = (batch, y.shape[1], int(height * self.stage.scale), int(width * self.stage.scale))
                out = y.new_zeros(shape) if self.options.processes.parallel else y.new_empty(shape)
            y0, y1, x0, x1 = self.core_at(i, end, origin)
            oy, ox = y0 + origin[0], x0 + origin[1]
            out[..., oy : oy + y1 - y0, ox : ox + x1 - x0] = y[..., y0:y1, x0:x1]
            del tensors, y
            release_free_memory(self.device)
        if out is None:  # a process without tiles (more processes than tiles) still takes part in the sum
            out = self.empty_output(batch, height, width)
        return self.options.processes.assemble(out, to_all=not last)

    def empty_output(self, batch, height, width):
        """A zero output for a process that ran no tile: its channels and dtype from a run on a tiny input."""
        probe = self.stage.run(self.x[..., : self.stage.align, : self.stage.align])
        return probe.new_zeros(batch, probe.shape[1], int(height * self.stage.scale), int(width * self.stage.scale))


def run_stage_tiled(stage, x, tile, overlap, options, stats=None, last=False):
    """stage.run(x) computed tile by tile with image-wide GroupNorm statistics; tile/overlap in input pixels.

    Exact mode measures every GroupNorm over the whole image, a pass each, tiles resuming from
    their checkpoints; `stats` ({unit index: (mean, var)}) skips the measuring (fast mode).
    `last`: the network's last stage, assembled on the first process only when several share it.
    """
    if max(x.shape[-2:]) <= tile:
        # One tile holds the whole stage: untiled is exact and one pass (every process runs it).
        out = stage.run(x)
        return None if last and options.processes.rank != 0 else out
    keep = stats is None  # measured pass by pass: checkpoints between the passes
    with CheckpointStore(x.device, options.keep_bytes, options.spill) if keep else contextlib.nullcontext() as store:
        run = StageRun(stage, x, tile, overlap, options, store)
        del x  # the run holds the input, and drops it once every tile has a checkpoint
        if stats is not None:
            run.stats = dict(stats)
        for u, unit in enumerate(stage.units):
            if unit.norm is not None and u not in run.stats:
                run.measure(u)
        return run.finish(last)


# Fast mode's statistics, chosen by measurement on the benchmark VAE and three held-out photos
# (docs/tiling.md, "Fast mode"):
# - a stage that runs at most at a quarter of the image's resolution (the encoder's and the
#   decoder's low-resolution stages) is measured exactly, its GroupNorms pass by pass as in exact
#   mode: its pixels are a sixteenth of the image's or fewer, and these stages were most of fast
#   mode's error (the subsampled estimate of a 1/8-resolution latent sees a quarter of few pixels);
# - a full-resolution stage gets its statistics from the stage run, exactly, over every other
#   pixel of its input (x[..., ::2, ::2]: a quarter of the work). Nearest subsampling keeps the
#   local contrast an area average would smooth away;
# - for a stage that upsamples (the decoder's last), the statistics of the stage run on every 4th
#   and every 8th pixel of its input (1/16 and 1/64 of the work) are extrapolated to full
#   resolution, the mean linearly and the variance geometrically in log(step): at 2048 px, 44-49 dB
#   against untiled on three photos (steps 2 and 4: 47-53 dB, 4 s slower; step 4 without the
#   extrapolation: 40-46 dB). On a small input (shorter side under 8 x FAST_MIN_SIDE pixels) steps 2 and 4 are used,
#   so each statistic still sees FAST_MIN_SIDE pixels a side. For the encoder's first stage the
#   extrapolation did not help (worse on two of three photos): it keeps the step-2 statistics.
FAST_SUBSAMPLE = 2
FAST_EXTRAPOLATE_STEP = 4  # the finer of the two steps extrapolated from; the coarser is twice it
FAST_MIN_SIDE = 32
FAST_EXACT_PIXELS = 4  # stages whose finest pixel spans at least this many image pixels are measured exactly


def measure_stats(stage, x, tile, overlap, options):
    """Every GroupNorm's image-wide statistics of the stage run on x in exact tiles: {unit index: (mean, var)}."""
    exact = TileOptions("exact", options.keep_bytes, options.spill, options.processes)
    with CheckpointStore(x.device, options.keep_bytes, options.spill) as store:
        run = StageRun(stage, x, tile, overlap, exact, store)
        for u, unit in enumerate(stage.units):
            if unit.norm is not None:
                run.measure(u)
    return run.stats


def subsampled(stage, x, step):
    """x[..., ::step, ::step], cut to a multiple of the stage's alignment (at least one aligned block)."""
    small = x[..., ::step, ::step]
    h, w = (max(stage.align, n // stage.align * stage.align) for n in small.shape[-2:])
    return small[..., :h, :w]


def extrapolate_stats(near, far, step):
    """Statistics at step 1 from those measured at steps `step` (near) and 2 * `step` (far).

    Linear in log2(step) for the mean, for the log of the variance (a geometric trend); a variance
    that is zero at either step is kept as measured at the near one.
    """
    octaves = math.log2(step)
    out = {}
    for u, (mean_n, var_n) in near.items():
        mean_f, var_f = far[u]
        trend = (var_n / var_f.clamp_min(torch.finfo(var_f.dtype).tiny)) ** octaves
        out[u] = (mean_n + octaves * (mean_n - mean_f), torch.where((var_f > 0) & (var_n > 0), var_n * trend, var_n))
    return out


def estimate_stats(stage, x, tile, overlap, options):
    """Fast mode, a stage reaching full resolution: each GroupNorm's statistics from the stage run on subsampled inputs.

    Measured exactly on x[..., ::2, ::2]; for a stage that upsamples, extrapolated to full
    resolution from x[..., ::4, ::4] and x[..., ::8, ::8] (2 and 4 on a small input). They still
    differ from the image's (docs/tiling.md, drift).
    """
    if max(x.shape[-2:]) <= tile:
        return None  # one tile: run_stage_tiled runs it untiled, exactly, in one pass
    if stage.scale <= 1:
        return measure_stats(stage, subsampled(stage, x, FAST_SUBSAMPLE), tile, overlap, options)
    step = FAST_EXTRAPOLATE_STEP
    while step > 2 and min(x.shape[-2:]) < 2 * step * FAST_MIN_SIDE:
        step //= 2
    near = measure_stats(stage, subsampled(stage, x, step), tile, overlap, options)
    far = measure_stats(stage, subsampled(stage, x, 2 * step), tile, overlap, options)
    return extrapolate_stats(near, far, step)


def stage_geometry(stage, pixels, tile, overlap):
    """(tile, overlap) in stage-input pixels for a stage whose input pixel spans `pixels` image pixels."""
    tile_s = max(stage.align, tile // pixels // stage.align * stage.align)
    if overlap is None:
        overlap_s = stage.radius
    else:
        overlap_s = math.ceil(math.ceil(overlap / pixels) / stage.align) * stage.align
    return tile_s, overlap_s


def run_stages_tiled(stages, x, pixels, tile, overlap, options, last):
    """Run stages in sequence, each tiled; `pixels`: image pixels per pixel of x; `last`: ends the network."""
    for s, stage in enumerate(stages):
        tile_s, overlap_s = stage_geometry(stage, pixels, tile, overlap)
        # Fast mode estimates the statistics of a stage that reaches high resolution, measures the others.
        estimated = options.mode == "fast" and min(pixels, pixels / stage.scale) < FAST_EXACT_PIXELS
        stats = estimate_stats(stage, x, tile_s, overlap_s, options) if estimated else None
        handed = [x]
        del x  # the stage run holds the only reference, so it can free the input when done with it
        x = run_stage_tiled(stage, handed.pop(), tile_s, overlap_s, options, stats, last=last and s == len(stages) - 1)
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


def encode_tiled(vae, x, tile, overlap=None, options=None):
    """(B, 3, H, W) padded images -> (mean, logvar), the down blocks run in tiles of `tile` pixels."""
    options = options or TileOptions()
    h = run_stages_tiled(encoder_stages(vae), x, 1, tile, overlap, options, last=False)
    return encoder_tail(vae, h)


def decode_tiled(vae, z, tile, overlap=None, options=None):
    """(B, C, h, w) latents -> (B, 3, h*f, w*f) images, the up blocks run in tiles of `tile` pixels.

    With several processes, the image is assembled on the group's rank 0; the others return None.
    """
    options = options or TileOptions()
    # The head's output handed over, not kept here: the stages free each input when done with it.
    return run_stages_tiled(decoder_stages(vae), decoder_head(vae, z), downsample_factor(vae), tile, overlap, options,
                            last=True)
