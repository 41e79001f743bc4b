"""`vaekit reconstruct`: encode and decode image files of any size, tiled when needed, to PNGs.

Each image goes through vaekit.tiling: padded to the downsampling factor and cropped back, tiled with
image-wide GroupNorm statistics (`--tile auto` tiles when the untiled pass would not fit the memory
budget, or after an out-of-memory error), and a half-precision batch that overflows is redone in fp32.
"""

import math
import time
import warnings
from pathlib import Path


from vaekit.errors import VaekitError


def output_path(out, image, used):
    """`out/<stem>.png`, with the parent folder's name added when two inputs share a stem."""
    path = Path(out) / f"{Path(image).stem}.png"
    if path in used:
        path = Path(out) / f"{Path(image).parent.name}_{Path(image).stem}.png"
    index = 1
    while path in used:
        path = Path(out) / f"{Path(image).stem}_{index}.png"
        index += 1
    used.add(path)
    return path


def check_options(vae, tile, overlap):
    """Validate --tile and --overlap against the model before any image is read."""
    from vaekit import tiling

    tile = tiling.parse_tile(tile)
    factor = tiling.downsample_factor(vae)
    if overlap is not None and (overlap < 0 or overlap % factor):
        raise VaekitError(f"--overlap {overlap} must be a non-negative multiple of the downsampling factor {factor}.")
    if isinstance(tile, int):
        tiling.check_tiling(vae, tile, overlap)
    return tile


def run_reconstruct(args):
    """`vaekit reconstruct`."""
    from vaekit.commands import load_model_from_args
    from vaekit.config import DTYPES
    from vaekit.data import ImageError, decode_image, to_pil, to_tensor
    from vaekit.evaluate import encode_decode, resolve_device
    from vaekit.metrics import psnr
    from vaekit.model import cast_vae
    from vaekit.report import save_png

    device = resolve_device(args.device)
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise VaekitError(f"Image not found: {missing[0]}. Pass existing image files.")
    vae = cast_vae(load_model_from_args(args, name="vae"), device=device, dtype=DTYPES[args.dtype])
    tile = check_options(vae, args.tile, args.overlap)
    used, failed = set(), []
    for image in args.images:
        try:
            x = to_tensor(decode_image(image))[None].to(device)  # (1, 3, H, W)
        except ImageError as e:
            failed.append(image)
            print(f"skipped {image}: {e}")
            continue
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = encode_decode(vae, x, args.sample, [args.seed], tile, args.overlap, args.memory_budget)
        seconds = time.perf_counter() - start
        for w in caught:
            print(f"warning: {w.message}")
        path = output_path(args.out, image, used)
        save_png(to_pil(y[0]), path)
        value = float(psnr(x.cpu(), y.cpu().clamp(-1, 1))[0])
        shown = "inf" if math.isinf(value) else f"{value:.2f}"
        print(f"{image} -> {path}  {x.shape[-1]}x{x.shape[-2]}  {seconds:.2f} s  PSNR {shown} dB")
    if failed:
        print(f"{len(failed)} of {len(args.images)} image(s) could not be read; the others were written.")
        return 1
    return 0


def add_commands(subparsers):
    """Register reconstruct."""
    from vaekit.commands import add_model_arguments
    from vaekit.config import DTYPES

    p = subparsers.add_parser(
        "reconstruct", help="encode and decode images of any size (tiled, seam-free) and write the PNGs",
    )
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="folder for the reconstructions (<stem>.png each)")
    p.add_argument("--tile", default="auto",
                   help="auto (default: tile when the untiled pass would not fit memory), off, or a tile size in px")
    p.add_argument("--overlap", type=int,
                   help="context pixels around each tile, a multiple of the factor (default: each stage's receptive "
                        "field, which makes tiles exact; smaller is faster and approximate)")
    p.add_argument("--memory_budget", "--memory-budget", dest="memory_budget",
                   help="memory an untiled pass may use with --tile auto, e.g. 4G (default: free GPU or system memory)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="inference precision; a non-finite half-precision result is redone in fp32")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.set_defaults(func=run_reconstruct)
