"""`vaekit reconstruct`, `vaekit sample`, `vaekit interpolate`: images through a VAE, to PNG files."""

import math

from vaekit.cli.args import add_command, add_model_arguments, load_model_from_args
from vaekit.config import DTYPE_NAMES
from vaekit.errors import VaekitError


def register(subparsers):
    """Add reconstruct, sample and interpolate."""
    p = add_command(
        subparsers, "reconstruct", "encode and decode images of any size (tiled, seam-free) and write the PNGs",
        "Encode and decode image files of any size, and the images in folders, and write <stem>.png for each "
        "(<folder>/<path>.png for images found in a folder argument); tiles are exact and only used when needed "
        "(--tile auto), and a half-precision pass that overflows is redone in fp32. What cannot be read is "
        "skipped with its reason. Launched with torchrun --nproc_per_node N, the processes share each image's "
        "tiles and rank 0 writes the PNGs.",
    )
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("images", nargs="+", help="image files or folders of images (searched recursively)")
    p.add_argument("--out", required=True,
                   help="folder for the reconstructions: <stem>.png for each file, <folder>/<path>.png inside folders")
    p.add_argument("--tile", default="auto",
                   help="auto (default: tile when the untiled pass would not fit memory), off, or a tile size in px")
    p.add_argument("--overlap", type=int,
                   help="context pixels around each tile, a multiple of the factor (default: each stage's receptive "
                        "field, which makes tiles exact; smaller is faster and approximate)")
    p.add_argument("--tile_mode", choices=("exact", "fast"), default="exact",
                   help="exact (default: tiles equal the untiled result, one pass per GroupNorm) or fast (GroupNorm "
                        "statistics of the full-resolution stages estimated from subsampled runs, then one pass: faster, "
                        "approximate)")
    p.add_argument("--memory_budget",
                   help="memory an untiled pass may use with --tile auto, e.g. 4G (default: free GPU or system memory)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="inference precision; a non-finite half-precision result is redone in fp32")
    p.add_argument("--sample", action="store_true", help="decode a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.set_defaults(func=run_reconstruct)

    p = add_command(subparsers, "sample", "decode z ~ N(0, I) from the normalised latent space to a PNG grid")
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    p.add_argument("--batch_size", type=int, default=8, help="latents decoded at once (default 8)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--out", default="samples.png", help="PNG path (default samples.png)")
    p.set_defaults(func=run_sample)

    p = add_command(subparsers, "interpolate", "decode a path between the latents of two images to a PNG strip")
    add_model_arguments(p, name="vae", positional=False)
    p.add_argument("a", help="first image")
    p.add_argument("b", help="second image")
    p.add_argument("--steps", type=int, default=8, help="decoded frames, both ends included (default 8)")
    p.add_argument("--slerp", action="store_true", help="spherical instead of linear interpolation")
    p.add_argument("--size", type=int, default=256, help="both images are resized and centre-cropped to this side")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--out", default="interpolation.png", help="PNG path (default interpolation.png)")
    p.set_defaults(func=run_interpolate)


def run_reconstruct(args):
    """Reconstruct each image file into --out."""
    # torch and diffusers: only once the command runs
    from vaekit.codec.inference import tile_option
    from vaekit.device import DTYPES, launched_processes, process_state, resolve_device
    from vaekit.eval.reconstruct import reconstruct_files

    group, rank = None, 0
    if launched_processes() > 1:  # torchrun: every process runs a share of each image's tiles
        import torch.distributed as dist

        state = process_state()
        device, group, rank = state.device, dist.group.WORLD, state.process_index
    else:
        device = resolve_device(args.device)
    vae = load_model_from_args(args, name="vae", device=device, dtype=DTYPES[args.dtype])
    tile = tile_option(vae, args.tile, args.overlap, args.tile_mode)
    failed, results = [], 0
    for result in reconstruct_files(vae, args.images, args.out, tile, args.overlap, args.memory_budget,
                                    args.sample, args.seed, args.tile_mode, group):
        if rank != 0:  # rank 0 reports and writes
            continue
        results += 1
        if "error" in result:
            failed.append(result)
            print(f"skipped {result['image']}: {result['error']}")
            continue
        for warning in result["warnings"]:
            print(f"warning: {warning}")
        width, height = result["size"]
        shown = "inf" if math.isinf(result["psnr"]) else f"{result['psnr']:.2f}"
        print(f"{result['image']} -> {result['path']}  {width}x{height}  {result['seconds']:.2f} s  PSNR {shown} dB")
    if rank != 0:  # rank 0 reports what was written
        return 0
    if results == 0:
        raise VaekitError("No images found in the arguments (folders are searched for image files); pass image files "
                          "or folders that hold some.")
    if len(failed) == results:
        raise VaekitError(f"Image not found or not readable, none of {len(failed)} written (first: "
                          f"{failed[0]['error']})")
    if failed:
        print(f"{len(failed)} of {results} image(s) could not be read and were skipped: "
              f"{', '.join(str(r['image']) for r in failed)}; the others were written.")
        return 1
    return 0


def run_sample(args):
    """Decode samples of the prior to a PNG grid."""
    from vaekit.device import resolve_device  # torch: only once the command runs
    from vaekit.eval.sampling import grid_png, sample_images

    if args.n < 1 or args.size < 8:
        raise VaekitError("--n must be at least 1 and --size at least 8.")
    vae = load_model_from_args(args, name="vae", device=resolve_device(args.device))
    images = sample_images(vae, args.n, args.size, args.seed, args.batch_size)
    grid_png(images, math.ceil(math.sqrt(args.n)), args.out)
    print(f"wrote {args.out}: {args.n} samples of z ~ N(0, I) in the normalised latent space, decoded")
    return 0


def run_interpolate(args):
    """Decode a path between two images' latents to a PNG strip."""
    import torch  # only once the command runs

    from vaekit.device import resolve_device
    from vaekit.eval.sampling import grid_png, interpolate_images, read_image

    vae = load_model_from_args(args, name="vae", device=resolve_device(args.device))
    a, b = read_image(args.a, args.size), read_image(args.b, args.size)
    frames = interpolate_images(vae, a, b, args.steps, spherical=args.slerp)
    strip = torch.cat([a, frames, b])  # A as given | decodes from A to B | B as given
    grid_png(strip, len(strip), args.out)
    kind = "slerp" if args.slerp else "linear"
    print(f"wrote {args.out}: A, {args.steps} decodes ({kind} in the normalised latent space), B")
    return 0
