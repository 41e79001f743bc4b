"""Tiled reconstruction of a large photo: vaekit's exact and fast tiling against diffusers' enable_tiling().

One run, the same trained weights, image, dtype and tile size for every variant:

  untiled          vaekit.codec.encode / decode with tile="off" (the reference)
  vaekit exact     tile=--tile, tile_mode="exact": image-wide GroupNorm statistics measured pass by
                   pass, tiles resuming from checkpoints (spilled to a temporary file on the CPU)
  vaekit fast      tile=--tile, tile_mode="fast": statistics estimated once, one pass
  diffusers tiled  AutoencoderKL.enable_tiling() with tile_sample_min_size=--tile (overlap factor 0.25),
                   the named baseline

Each variant runs in its own process, so that its peak memory is its own: on the CPU the growth of
the process's peak RSS (VmHWM, reset after a warm-up) over its RSS just before the reconstruction,
model and image already loaded; on the GPU torch.cuda.max_memory_allocated growth. Bytes the process
wrote (/proc/self/io wchar: vaekit's spill file) are reported beside it. With --repeat N the
variants run in turn N times (A B C D A B C D ...), so drift of a shared machine hits all alike;
the table gives the median time and the largest peak. PSNR is against the untiled reconstruction.

    python scripts/bench_tiling.py --vae checkpoints/demo/vae --image ../shared/data/photos/eval/baboon.png
    python scripts/bench_tiling.py --vae DIR --image photo.png --size 4096 --tile 1024 --device cuda --json out.json
"""

import argparse
import datetime
import json
import os
import platform
import statistics
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
VARIANTS = ("untiled", "vaekit exact", "vaekit fast", "diffusers tiled")


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", default=str(ROOT / "checkpoints" / "demo" / "vae"),
                        help="trained VAE (default: the `make demo` export)")
    parser.add_argument("--image", help="photo to reconstruct (default: the first of ../shared/data/photos/eval)")
    parser.add_argument("--size", type=int, default=2048, help="the photo is resized to size x size (default 2048)")
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels for every tiled variant")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all variants, interleaved (default 1)")
    parser.add_argument("--json", help="write one row per variant to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def written_bytes():
    """Bytes this process has written through write calls (/proc/self/io wchar), 0 where unavailable."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))
    except (OSError, StopIteration):
        return 0


def photo_path(args):
    """The photo to use: --image, or the first photo of the shared held-out set."""
    if args.image:
        return Path(args.image)
    if not PHOTOS.is_dir():
        sys.exit(f"{PHOTOS} not found: pass --image with any photo.")
    return next(p for p in sorted(PHOTOS.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def load_photo(args):
    """The benchmark photo as (1, 3, size, size) in [-1, 1], resized with Lanczos."""
    from PIL import Image

    from vaekit.data import decode_image, to_tensor

    path = photo_path(args)
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
    mode = "off" if variant == "untiled" else tile
    tile_mode = "fast" if variant == "vaekit fast" else "exact"
    mean, _ = inference.encode(vae, x, tile=mode, tile_mode=tile_mode)
    return inference.decode(vae, mean, tile=mode, size=tuple(x.shape[-2:]), tile_mode=tile_mode)


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
    before_rss, before_written = process_memory_bytes("VmRSS"), written_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        y = reconstruct(vae, x, args.worker, args.tile)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = process_memory_bytes("VmHWM") - before_rss
    seconds = time.perf_counter() - start
    written = written_bytes() - before_written
    work = Path(args.workdir)
    torch.save(y.cpu(), work / f"{args.worker}.pt")
    (work / f"{args.worker}.json").write_text(json.dumps({"seconds": seconds, "peak_bytes": peak, "written": written}))


def run_variant(args, variant, workdir):
    """Run one variant in a fresh process; return its reconstruction and measurements."""
    command = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir), "--vae", args.vae,
               "--size", str(args.size), "--tile", str(args.tile), "--dtype", args.dtype, "--device", args.device,
               "--threads", str(args.threads), "--image", str(photo_path(args))]
    subprocess.run(command, check=True)
    result = json.loads((workdir / f"{variant}.json").read_text())
    return torch.load(workdir / f"{variant}.pt", weights_only=True), result


def machine(args):
    """One line naming the machine, the software and the date."""
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where = f"{model}, {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} threads"
    return f"{where}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


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
    x, photo = load_photo(args)
    images, runs = {}, {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeat):
            for variant in variants:
                print(f"round {round_ + 1}/{args.repeat}: {variant} ...", flush=True)
                images[variant], info = run_variant(args, variant, Path(tmp))
                runs[variant].append(info)
    reference = images["untiled"].clamp(-1, 1)
    vae = load_vae(args.vae)
    rows = []
    for variant in variants:
        y = images[variant].clamp(-1, 1)
        seconds = [r["seconds"] for r in runs[variant]]
        rows.append({
            "variant": variant,
            "psnr_vs_untiled": None if variant == "untiled" else round(float(psnr(reference, y, max_db=200)[0]), 2),
            "peak_mib": round(max(r["peak_bytes"] for r in runs[variant]) / 2**20, 1),
            "seconds": round(statistics.median(seconds), 2),
            "tile": None if variant == "untiled" else args.tile,
            "seconds_runs": [round(s, 2) for s in seconds],
            "written_mib": round(max(r["written"] for r in runs[variant]) / 2**20, 1),
            "max_abs_diff": float((reference - y).abs().max()),
            "psnr_vs_photo": round(float(psnr(x, y)[0]), 2),
        })
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    print()
    print(f"- photo: `{photo}` resized to {args.size}x{args.size}; VAE `{args.vae}` ({params:.2f}M parameters, "
          f"f{2 ** (len(vae.config.block_out_channels) - 1)}); tile {args.tile} px, {args.dtype}")
    print(f"- machine: {machine(args)}; {args.repeat} round(s), variants interleaved; time: median; peak memory: "
          + ("max_memory_allocated growth" if args.device.startswith("cuda")
             else "largest growth of peak RSS over the RSS after loading") + "; written: bytes the process wrote")
    print()
    print("| variant | PSNR vs untiled (dB) | peak memory (MiB) | time (s) | written (MiB) | PSNR vs photo (dB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        label = row["variant"] if row["tile"] is None else f"{row['variant']} {row['tile']}"
        shown = "(reference)" if row["psnr_vs_untiled"] is None else f"{row['psnr_vs_untiled']:.2f}"
        print(f"| {label} | {shown} | {row['peak_mib']:.0f} | {row['seconds']:.1f} | {row['written_mib']:.0f} | "
              f"{row['psnr_vs_photo']:.2f} |")
    if args.json:
        meta = {"photo": photo, "size": args.size, "tile": args.tile, "dtype": args.dtype, "vae": args.vae,
                "machine": machine(args), "repeat": args.repeat}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
