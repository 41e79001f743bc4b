"""Benchmark `vaekit encode` end to end against the naive caching loop common trainers use.

Both encode the same images with the same VAE at the same batch size, in one run:

  naive      PIL decode + torchvision resize/crop in the main thread, one batch at a time, fp32,
             one .pt file per image (the way common trainers cache latents)
  vaekit     vaekit.cache.encode.encode_dataset into a fresh cache folder (DataLoader workers, bucketed
             batches, channels-last, writer thread, shards)
  model only (GPU) the encoder alone on batches already on the device: the ceiling for end to end

    python scripts/bench_encode.py                      # preset:tiny on ../shared/data/photos/train, 256 px
    python scripts/bench_encode.py --vae DIR --resolution 512 --limit 64
"""

import argparse
import copy
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


def load_vae(spec):
    """The VAE as `vaekit encode` loads it (presets seeded, so both contenders get the same weights)."""
    from vaekit.cache.config import EncodeConfig
    from vaekit.cache.encode import load_encoder_vae

    return load_encoder_vae(EncodeConfig(vae=spec))


def image_paths(data, limit):
    """The benchmark's images in the order `vaekit encode` sees them."""
    from vaekit.data import open_source

    source = open_source(data)
    paths = [record.path for record in source]
    return paths[:limit] if limit else paths


@torch.inference_mode()
def run_naive(vae, paths, resolution, batch_size, out):
    """The baseline: decode, resize and encode in the main thread, save one file per image; returns seconds."""
    from PIL import Image
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    out.mkdir(parents=True)
    start = time.perf_counter()
    for i in range(0, len(paths), batch_size):
        batch = paths[i:i + batch_size]
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in batch])  # (B, 3, H, W)
        dist = vae.encode(x.to(vae.device)).latent_dist
        for path, mean, logvar in zip(batch, dist.mean.cpu(), dist.logvar.cpu()):
            torch.save({"mean": mean.half().clone(), "logvar": logvar.half().clone()}, out / f"{Path(path).stem}.pt")
    return time.perf_counter() - start


def run_vaekit(vae, args, out, compute_dtype="auto"):
    """`vaekit encode` through its Python entry point into a fresh folder; returns (seconds, summary)."""
    from vaekit.cache.config import EncodeConfig
    from vaekit.cache.encode import encode_dataset

    config = EncodeConfig(data=args.data, out=str(out), vae=args.vae, resolution=args.resolution,
                          batch_size=args.batch_size, num_workers=args.num_workers, limit=args.limit,
                          dtype="fp16", compile=args.compile, compute_dtype=compute_dtype)
    start = time.perf_counter()
    summary = encode_dataset(config, vae=vae, progress=False)
    return time.perf_counter() - start, summary


@torch.inference_mode()
def run_model_only(vae, args, count):
    """The encoder alone on uint8 batches already on the GPU, as vaekit's pipeline feeds it; returns seconds."""
    from vaekit.codec.inference import BulkEncoder
    from vaekit.device import resolve_compute_dtype

    device = torch.device("cuda")
    encoder = BulkEncoder(vae, device, resolve_compute_dtype("auto", device), channels_last=True, compile=args.compile)
    pixels = torch.randint(0, 256, (args.batch_size, 3, args.resolution, args.resolution), dtype=torch.uint8,
                           device=device)
    for _ in range(3):
        encoder(pixels)
    torch.cuda.synchronize()
    batches = max(1, count // args.batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        mean, logvar = encoder(pixels)
        mean.half(), logvar.half()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * count / (batches * args.batch_size)


def warm_up(vae, resolution, batch_size):
    """One encode before timing, so neither contender pays for first-call initialisation."""
    with torch.inference_mode():
        vae.encode(torch.zeros(batch_size, 3, resolution, resolution, device=vae.device))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="preset:tiny")
    photos = Path(__file__).resolve().parents[2] / "shared" / "data" / "photos" / "train"  # ../shared, beside the repo
    parser.add_argument("--data", default=str(photos))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (vaekit and model-only)")
    parser.add_argument("--out", help="scratch folder (default: a temporary one, removed afterwards)")
    args = parser.parse_args()

    paths = image_paths(args.data, args.limit)
    scratch = Path(args.out or tempfile.mkdtemp(prefix="bench_encode."))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{len(paths)} images from {args.data} at {args.resolution} px, batch {args.batch_size}, VAE {args.vae}; "
          f"{machine}, {os.cpu_count()} CPU cores, torch {torch.__version__}, load average {load:.1f}")
    try:
        vae = load_vae(args.vae)
        naive_vae = copy.deepcopy(vae).to(device)  # fp32, contiguous: as the common loops run it
        warm_up(naive_vae, args.resolution, args.batch_size)
        naive = run_naive(naive_vae, paths, args.resolution, args.batch_size, scratch / "naive")
        del naive_vae
        from vaekit.device import resolve_compute_dtype

        auto = str(resolve_compute_dtype("auto", device)).removeprefix("torch.").replace("bfloat16", "bf16").replace(
            "float32", "fp32").replace("float16", "fp16")
        ours, summary = run_vaekit(copy.deepcopy(vae), args, scratch / "vaekit")
        if summary["encoded"] != len(paths):
            print(f"note: vaekit encoded {summary['encoded']} of {len(paths)} images ({summary['errors']} errors)")
        rows = [("naive (PIL main thread, file per image, fp32)", naive),
                (f"vaekit encode (end to end, auto = {auto})", ours)]
        if auto != "fp32":  # the same pipeline at the baseline's precision: what the pipeline alone buys
            rows.append(("vaekit encode (end to end, fp32)", run_vaekit(copy.deepcopy(vae), args, scratch / "fp32",
                                                                       "fp32")[0]))
        if device.type == "cuda":
            seconds = run_model_only(load_vae(args.vae), args, len(paths))
            rows.append(("model only (encoder on device batches)", seconds))
        model_only = rows[-1][1] if device.type == "cuda" else None
    finally:
        if not args.out:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n| {'method':<48} | {'seconds':>8} | {'images/s':>9} | {'vs naive':>8} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for name, seconds in rows:
        print(f"| {name:<48} | {seconds:>8.2f} | {len(paths) / seconds:>9.2f} | {naive / seconds:>7.2f}x |")
    if model_only is not None:
        print(f"\nend to end / model only: {model_only / ours:.0%} (target: at least 85%)")


if __name__ == "__main__":
    main()
