"""Tiled reconstruction of a large photo: vaekit's tiling and diffusers' enable_tiling() against untiled.

One run, the same trained weights, image, dtype and tile size for every variant:

  untiled          vaekit.codec.encode / decode with tile="off" (the reference)
  vaekit tiled     vaekit.codec with tile=--tile (image-wide GroupNorm statistics, exact context),
                   and again with each of --smaller_tiles, to compare at no more memory than diffusers
  diffusers tiled  AutoencoderKL.enable_tiling() with tile_sample_min_size=--tile (overlap factor 0.25)

Each variant runs in its own process so that its peak memory is its own: on CPU the growth of the
process's peak RSS over its RSS just before the reconstruction (model and image already loaded); on
GPU torch.cuda.max_memory_allocated over the memory allocated before. The table gives PSNR against
the untiled reconstruction (the target: at least 40 dB), the memory ratio to untiled (the target: at
most 0.25), the PSNR against the original photo, and the time.

    make demo && python scripts/bench_tiling.py                # checkpoints/demo/vae, 2048 px, tile 512
    python scripts/bench_tiling.py --vae DIR --size 4096 --tile 1024 --device cuda --dtype bf16
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import process_memory_bytes, reset_peak_memory  # noqa: E402
from vaekit.device import DTYPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "photos" / "eval"
VARIANTS = ("untiled", "vaekit tiled", "diffusers tiled")  # "vaekit tiled N" runs vaekit with tile N


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", default=str(ROOT / "checkpoints" / "demo" / "vae"),
                        help="trained VAE (default: the `make demo` export)")
    parser.add_argument("--image", help="photo to reconstruct (default: the first of ../shared/data/photos/eval)")
    parser.add_argument("--size", type=int, default=2048, help="the photo is resized to size x size (default 2048)")
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels for both tiled variants")
    parser.add_argument("--smaller_tiles", default="384", help="more vaekit tile sizes, comma-separated ('' for none)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_photo(args):
    """The benchmark photo as (1, 3, size, size) in [-1, 1], resized with Lanczos."""
    from PIL import Image

    from vaekit.data import decode_image, to_tensor

    path = args.image or next(p for p in sorted(PHOTOS.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    img = decode_image(path).resize((args.size, args.size), Image.LANCZOS)
    return to_tensor(img)[None], str(path)


def reconstruct(vae, x, variant, tile):
    """Encode and decode x with one variant; posterior mean, images in float32."""
    from vaekit.codec import inference
    from vaekit.model.architecture import downsample_factor

    if variant == "diffusers tiled":
        f = downsample_factor(vae)
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // f
        z = vae.encode(x.to(vae.dtype)).latent_dist.mean
        return vae.decode(z).sample.float()
    mode = "off" if variant == "untiled" else int(variant.rsplit(" ", 1)[1]) if variant[-1].isdigit() else tile
    mean, _ = inference.encode(vae, x, tile=mode)
    return inference.decode(vae, mean, tile=mode, size=tuple(x.shape[-2:]))


def run_worker(args):
    """Run one variant in this process and write its reconstruction and measurements to the workdir."""
    from vaekit.model import load_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = load_vae(args.vae, device=device, dtype=DTYPES[args.dtype])
    x, _ = load_photo(args)
    x = x.to(device)
    with torch.no_grad():  # warm-up on a small crop: one-time allocations are not the variant's
        reconstruct(vae, x[..., :args.tile, :args.tile].contiguous(), "untiled", args.tile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    reset_peak_memory(torch.device("cpu"))
    before_rss = process_memory_bytes("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        y = reconstruct(vae, x, args.worker, args.tile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = process_memory_bytes("VmHWM") - before_rss
    seconds = time.perf_counter() - start
    work = Path(args.workdir)
    torch.save(y.cpu(), work / f"{args.worker}.pt")
    (work / f"{args.worker}.json").write_text(json.dumps({"seconds": seconds, "peak_bytes": peak}))


def run_variant(args, variant, workdir):
    """Run one variant in a fresh process; return its reconstruction and measurements."""
    command = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir), "--vae", args.vae,
               "--size", str(args.size), "--tile", str(args.tile), "--dtype", args.dtype, "--device", args.device,
               "--threads", str(args.threads)] + (["--image", args.image] if args.image else [])
    subprocess.run(command, check=True)
    result = json.loads((workdir / f"{variant}.json").read_text())
    return torch.load(workdir / f"{variant}.pt", weights_only=True), result


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    if not Path(args.vae).exists():
        sys.exit(f"{args.vae} not found: run `make demo` first, or pass --vae with a trained VAE.")
    from vaekit.eval.metrics import psnr
    from vaekit.model import load_vae

    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or "untiled" not in variants:
        sys.exit(f"--variants must include 'untiled' and name only: {', '.join(VARIANTS)}")
    if "vaekit tiled" in variants:
        smaller = [f"vaekit tiled {int(t)}" for t in args.smaller_tiles.split(",") if t.strip()]
        at = variants.index("vaekit tiled") + 1
        variants[at:at] = smaller
    x, photo = load_photo(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            print(f"running {variant} ...", flush=True)
            results[variant] = run_variant(args, variant, Path(tmp))
    reference = results["untiled"][0]
    base_peak = results["untiled"][1]["peak_bytes"]
    vae = load_vae(args.vae)
    print()
    print(f"- photo: `{photo}` resized to {args.size}x{args.size}; VAE `{args.vae}` "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters, f{2 ** (len(vae.config.block_out_channels) - 1)})")
    print(f"- tile {args.tile} px, {args.dtype}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else f" ({platform.processor() or platform.machine()}, "
             f"{args.threads or torch.get_num_threads()} threads)")
          + f"; torch {torch.__version__}; peak memory = "
          + ("max_memory_allocated growth" if args.device.startswith("cuda") else "peak RSS growth over the RSS after loading"))
    print()
    print("| variant | PSNR vs untiled (dB) | max abs diff | peak memory (MiB) | memory vs untiled | PSNR vs photo (dB) | time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = reference.clamp(-1, 1)
    for variant, (y, info) in results.items():
        y = y.clamp(-1, 1)
        against_untiled = float(psnr(reference, y, max_db=200)[0])
        diff = float((reference - y).abs().max())
        label = variant if variant == "untiled" or variant[-1].isdigit() else f"{variant} {args.tile}"
        print(f"| {label} | {'(reference)' if variant == 'untiled' else f'{against_untiled:.2f}'} | "
              f"{diff:.2e} | {info['peak_bytes'] / 2**20:.0f} | {info['peak_bytes'] / base_peak:.3f} | "
              f"{float(psnr(x, y)[0]):.2f} | {info['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
