"""The one inference entry: `encode`, `decode` and `encode_decode` for images of any size.

Size rule: an image (B, 3, H, W) is padded on the bottom and right (reflect; replicate when the image
is smaller than the pad) to a multiple of the downsampling factor f, so its latents are
(B, C, ceil(H / f), ceil(W / f)). `decode(..., size=(H, W))` crops the decoded image back to (H, W);
without `size` it returns (h * f, w * f).

tile: 'off', 'auto' (tile when the untiled pass would exceed the memory budget, or after an
out-of-memory error) or a tile size in pixels. tile_mode: 'exact' (the default: tiles equal the
untiled result up to float rounding) or 'fast' (full-resolution stages' GroupNorm statistics estimated, one pass; see
vaekit.codec.tiling). group: a torch.distributed process group whose processes share one image's
tiles (vaekit.codec.parallel); the decoded image is returned on its rank 0. A half-precision batch
whose result is not finite is redone in fp32 with a warning. `BulkEncoder` is the encoder set
up for throughput (device, dtype, channels-last, compile) that bulk caching and statistics use.

An AutoencoderTiny (TAESD) takes the same calls untiled (`tile="auto"` runs it whole; a tile size is
refused: vaekit's tiles follow AutoencoderKL's GroupNorm stages). Its encoder is deterministic: its
posterior is its latents with the log-variance floor diffusers clamps every posterior to
(`TINY_LOGVAR`, a standard deviation of 3e-7), so code that reads posteriors works unchanged.
"""

import math
import warnings

import torch

from vaekit.codec import memory, tiling
from vaekit.codec.options import parse_tile, parse_tile_mode
from vaekit.codec.parallel import Processes
from vaekit.errors import VaekitError
from vaekit.model.architecture import cast_vae, downsample_factor, is_tiny, model_device, model_dtype

# diffusers' DiagonalGaussianDistribution clamps log-variances to [-30, 20]; a deterministic encoder sits at the floor.
TINY_LOGVAR = -30.0


def tile_option(vae, tile, overlap=None, tile_mode="exact"):
    """The one check of --tile, --overlap and --tile_mode against a model, before any image is read; returns the parsed tile."""
    tile = parse_tile(tile)
    parse_tile_mode(tile_mode)
    if is_tiny(vae):
        check_tiny_tiling(tile, overlap)
        return tile
    tiling.check_overlap(vae, overlap)
    if isinstance(tile, int):
        tiling.check_tiling(vae, tile, overlap)
    return tile


def all_finite(*tensors):
    """True when every element of every tensor is finite."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def run_with_fallback(vae, fn, *inputs, processes=None):
    """Run fn(vae, *inputs) in the model's dtype; if a reduced-precision result is not finite, redo it in fp32.

    With several processes, they agree on the retry (only rank 0 may hold a decoded image).
    """
    dtype = model_dtype(vae)
    processes = processes or Processes()
    with torch.no_grad():
        out = fn(vae, *[t.to(dtype) for t in inputs])
        outs = [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]
        if dtype == torch.float32 or processes.agree(all_finite(*outs)):
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


def checkpoint_allowance(vae, batch, height, width, direction, tile, budget):
    """Memory exact tiling may give to checkpoints: what the budget leaves beside the tile's own estimate."""
    if budget is None:
        return 0
    return max(0, budget - memory.estimate_memory(vae, batch, height, width, direction, tile))


def run_tiling(vae, untiled, tiled, x, direction, pixels_hw, tile, overlap, memory_budget, tile_mode="exact",
               group=None):
    """Dispatch on `tile`: untiled, tiled with a given size, or auto (by budget, and after out-of-memory).

    Checkpoints of exact tiling may use memory up to the budget (tile='auto', or an explicit
    memory_budget); with an explicit tile and no budget they take none beyond the tile's and spill
    (CPU) or are recomputed (GPU).
    """
    f = downsample_factor(vae)
    tile, mode = parse_tile(tile), parse_tile_mode(tile_mode)
    processes = Processes(group)
    height, width = pixels_hw
    if processes.parallel and tile == "off":
        raise VaekitError("Several processes share an image's tiles: use --tile auto or a tile size, not 'off'.")
    if tile == "off":
        return run_with_fallback(vae, untiled, x)
    budget = None
    if tile == "auto" or memory_budget is not None:
        budget = memory.memory_budget_bytes(model_device(vae), memory_budget)
    if tile == "auto":
        tile = memory.choose_tile(vae, x.shape[0], height, width, direction, budget)
        if processes.parallel:
            # Every process must cut the same tiles; the one with the least memory decides.
            tile = processes.smallest(tile or min(memory.MAX_AUTO_TILE, max(height, width)) // f * f)
        if tile is None:
            try:
                return run_with_fallback(vae, untiled, x)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not memory.is_out_of_memory(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                tile = max(tiling.minimum_tile(vae, overlap), min(memory.MAX_AUTO_TILE, max(height, width) // 2) // f * f)
                warnings.warn(f"vaekit: untiled {direction} ran out of memory; retrying in tiles of {tile} px.", stacklevel=3)
    tiling.check_tiling(vae, tile, overlap)
    if tile >= max(height, width) and not processes.parallel:
        return run_with_fallback(vae, untiled, x)
    processes.same("image size and tiling", (tuple(x.shape), str(x.dtype), tile, overlap, mode))
    options = tiling.TileOptions(mode, checkpoint_allowance(vae, x.shape[0], height, width, direction, tile, budget),
                                 processes=processes)
    return run_with_fallback(vae, lambda v, t: tiled(v, t, tile, overlap, options), x, processes=processes)


def encode(vae, x, tile="off", overlap=None, memory_budget=None, tile_mode="exact", group=None):
    """Images (B, 3, H, W) in [-1, 1] -> (mean, logvar), each (B, C, ceil(H/f), ceil(W/f)), in float32.

    tile: 'off', 'auto' (tile when the untiled pass would exceed the memory budget or runs out of
    memory) or a tile size in pixels. overlap: context pixels around each tile core; None (default)
    gives each stage its receptive field, which makes the tiled result equal the untiled one.
    tile_mode: 'exact' or 'fast'; group: processes sharing the tiles (every one gets the latents).
    """
    tiling.check_images(x, vae)
    if is_tiny(vae):
        return encode_tiny(vae, x, tile, overlap)
    tiling.check_supported(vae)
    f = downsample_factor(vae)
    h, w = math.ceil(x.shape[-2] / f), math.ceil(x.shape[-1] / f)
    x = tiling.pad_to_multiple(x.to(model_device(vae)), f)
    mean, logvar = run_tiling(vae, tiling.encode_untiled, tiling.encode_tiled, x, "encode", x.shape[-2:], tile, overlap,
                              memory_budget, tile_mode, group)
    return mean[..., :h, :w].float(), logvar[..., :h, :w].float()


def decode(vae, z, tile="off", overlap=None, memory_budget=None, size=None, tile_mode="exact", group=None):
    """Latents (B, C, h, w) -> images (B, 3, h*f, w*f) in float32, cropped to `size` (H, W) when given.

    tile, overlap, memory_budget, tile_mode as for `encode`, in image pixels. With a process group
    the image is assembled on its rank 0; the other processes get None.
    """
    tiling.check_latents(z, vae)
    if is_tiny(vae):  # small enough to run whole on each process; the image is returned on rank 0, as below
        images = decode_tiny(vae, z, tile, overlap, size)
        return images if Processes(group).rank == 0 else None
    tiling.check_supported(vae)
    f = downsample_factor(vae)
    pixels = (z.shape[-2] * f, z.shape[-1] * f)
    images = run_tiling(vae, tiling.decode_untiled, tiling.decode_tiled, z.to(model_device(vae)), "decode", pixels,
                        tile, overlap, memory_budget, tile_mode, group)
    if images is None:
        return None
    images = images.float()
    if size is not None:
        images = images[..., : size[0], : size[1]]
    return images


def encode_decode(vae, x, sample=False, seeds=None, tile="off", overlap=None, memory_budget=None, tile_mode="exact",
                  group=None):
    """Images (B, 3, H, W) in [-1, 1], any size -> reconstructions (B, 3, H, W) in float32.

    Padded to the downsampling factor and cropped back, with the fp32 retry when fp16/bf16 overflows.
    `sample` decodes z ~ q(z|x) drawn with one generator per image seeded by `seeds` (its position in
    the source), so a re-run, or a second pass, draws the same sample for the same image. tile_mode and
    group as for `encode` and `decode` (with a group, rank 0 gets the images, the others None).
    """
    with torch.no_grad():
        mean, logvar = encode(vae, x, tile=tile, overlap=overlap, memory_budget=memory_budget, tile_mode=tile_mode,
                              group=group)
        z = mean
        if sample:
            noise = torch.stack([
                torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds
            ]).to(mean.device)  # (B, C, h, w)
            z = mean + (0.5 * logvar).exp() * noise
        return decode(vae, z, tile=tile, overlap=overlap, memory_budget=memory_budget, size=tuple(x.shape[-2:]),
                      tile_mode=tile_mode, group=group)


def check_tiny_tiling(tile, overlap):
    """An AutoencoderTiny runs untiled: refuse a tile size or an overlap, saying why."""
    if isinstance(tile, int) or overlap is not None:
        raise VaekitError("vaekit's exact tiles follow AutoencoderKL's GroupNorm stages; an AutoencoderTiny (TAESD) "
                          "runs untiled. Use --tile off or auto, without --overlap.")


def encode_tiny(vae, x, tile="off", overlap=None):
    """`encode` for an AutoencoderTiny: (latents, the constant TINY_LOGVAR), each (B, C, ceil(H/f), ceil(W/f))."""
    check_tiny_tiling(parse_tile(tile), overlap)
    f = downsample_factor(vae)
    h, w = math.ceil(x.shape[-2] / f), math.ceil(x.shape[-1] / f)
    x = tiling.pad_to_multiple(x.to(model_device(vae)), f)
    latents = run_with_fallback(vae, lambda v, t: v.encoder(t), x)[..., :h, :w].float()  # takes [-1, 1] itself
    return latents, torch.full_like(latents, TINY_LOGVAR)


def decode_tiny(vae, z, tile="off", overlap=None, size=None):
    """`decode` for an AutoencoderTiny: latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32."""
    check_tiny_tiling(parse_tile(tile), overlap)
    images = run_with_fallback(vae, lambda v, t: v.decoder(t), z.to(model_device(vae))).float()
    return images[..., : size[0], : size[1]] if size is not None else images


class BulkEncoder:
    """The VAE's encoder ready for bulk inference: device, dtype, memory format, optional compile."""

    def __init__(self, vae, device, compute_dtype, channels_last=True, compile=False, tile="off"):
        self.vae = cast_vae(vae, device=device, dtype=compute_dtype)
        self.device, self.dtype, self.tile, self.channels_last = device, compute_dtype, tile, channels_last
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        if compile and is_tiny(self.vae):
            self.vae.encoder.compile()  # in place; the codec calls the whole encoder
        elif compile:
            # Block by block, in place (state-dict keys stay AutoencoderKL's): the codec calls the
            # encoder's parts directly, which would bypass a compiled Encoder.forward.
            encoder = self.vae.encoder
            for module in [encoder.conv_in, *encoder.down_blocks, encoder.mid_block, encoder.conv_out]:
                module.compile()

    @torch.inference_mode()
    def __call__(self, pixels, flip=False):
        """uint8 pixels (B, 3, H, W) -> float (mean, logvar), each (B', C, h, w); B' = 2B with flips appended."""
        x = pixels.to(self.device, non_blocking=True).float().div_(127.5).sub_(1.0)  # as vaekit.data.crops.to_tensor
        if flip:
            x = torch.cat([x, x.flip(-1)])  # (2B, 3, H, W): mirrored copies after the originals
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return encode(self.vae, x, tile=self.tile)
