"""What the latent cache's checksums cost, and how fast `vaekit cache verify` reads.

1. write: `vaekit encode` of an image folder as it ships (every part hashed with xxh3 after it is
   written, before it is published) against the same run with the hashing replaced by a stub that
   records nothing (what writing cost before checksums). Each run is a fresh process encoding into a
   new folder; the two arms alternate (A B A B ...) and the table gives the median of each and the
   ratio pair by pair. Only `encode_dataset` is timed (the VAE is loaded first).
2. verify: a synthetic cache of --parts parts of --part_mb MB (real format, written through
   vaekit.cache.format's writers), then in one process: reading every file (a plain sequential read,
   no hashing: the floor any verify has), `part_digest` of every part (the hash alone), and
   `verify_cache` with 1 and 2 jobs (the whole check). All from the page cache (warm), so the figures
   are the CPU's cost on top of the disk; on a cold disk every arm is bounded by the disk.

    python scripts/bench_integrity.py --data ../shared/data/photos/train --json benchmarks/integrity.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import write_synthetic_unit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def encode_once(data, out, hashing, resolution, vae):
    """One encode into `out` in this process; prints {"seconds", "images"} as JSON."""
    import torch

    from vaekit.cache import writer
    from vaekit.cache.config import EncodeConfig
    from vaekit.cache.encode import encode_dataset, load_encoder_vae

    torch.set_num_threads(1)
    if not hashing:  # the write path without checksums: no hash, nothing recorded worth checking
        writer.part_digest = lambda path, progress=None: {"bytes": os.path.getsize(path), "xxh3_128": "",
                                                         "header_xxh3_64": ""}
    config = EncodeConfig(data=data, out=out, vae=vae, resolution=resolution, num_workers=1, compute_dtype="fp32",
                          shard_size=64)
    model = load_encoder_vae(config)
    start = time.perf_counter()
    summary = encode_dataset(config, vae=model, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - start, "images": summary["encoded"]}))


def run_encode(data, hashing, resolution, vae):
    with tempfile.TemporaryDirectory(prefix="bench_integrity.") as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--arm", "hash" if hashing else "nohash", "--data", data,
                               "--out", str(Path(tmp) / "cache"), "--resolution", str(resolution), "--vae", vae],
                              capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])


def build_parts(out, parts, part_mb):
    """A format-2 cache of `parts` units of one part each, `part_mb` MB per part (fp16 posterior, 4x32x32)."""
    import torch

    from vaekit.cache.format import FORMAT, FORMAT_MINOR, FORMAT_VERSION, new_token
    from vaekit.io import write_json

    per_sample = 2 * 4 * 32 * 32 * 2  # mean and logvar, fp16
    count = max(1, int(part_mb * 2**20) // per_sample)
    (out / "units").mkdir(parents=True)
    card = {"format": FORMAT, "version": FORMAT_VERSION, "minor": FORMAT_MINOR,
            "key": {"store": "mean_logvar", "dtype": "fp16", "flip": False, "scaling_factor": 1.0,
                    "shift_factor": None},
            "vae": {"latent_channels": 4, "downsample_factor": 8}, "units": {"kind": "indexed", "unit_size": count}}
    write_json(out / "card.json", card)
    token = new_token()
    latents = torch.randn(count, 4, 32, 32).half()
    for unit in range(parts):
        write_synthetic_unit(out, unit, token, card, latents, [f"{unit:05d}-{i:06d}" for i in range(count)],
                             bucket=(256, 256), original=(256, 256))


def read_all(folder):
    """Read every file of `folder` front to back in 8 MB blocks (no hashing); returns the bytes read."""
    total, buffer = 0, bytearray(8 << 20)
    for path in sorted(folder.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while count := f.readinto(buffer):
                total += count
    return total


def verify_bench(parts, part_mb, rounds):
    from vaekit.cache.format import part_digest
    from vaekit.cache.verify import verify_cache

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_integrity.") as tmp:
        cache = Path(tmp) / "cache"
        build_parts(cache, parts, part_mb)
        size = sum(p.stat().st_size for p in (cache / "units").iterdir())
        arms = {"read every file (no hash)": lambda: read_all(cache / "units"),
                "part_digest of every part": lambda: [part_digest(p) for p in (cache / "units").glob("*.safetensors")],
                "verify_cache, 1 job": lambda: verify_cache(cache, jobs=1, progress=False),
                "verify_cache, 2 jobs": lambda: verify_cache(cache, jobs=2, progress=False)}
        for arm in arms.values():
            arm()  # warm: the page cache holds the files, imports done
        times = {name: [] for name in arms}
        for _ in range(rounds):
            for name, arm in arms.items():  # interleaved
                start = time.perf_counter()
                arm()
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            seconds = statistics.median(values)
            rows.append({"arm": name, "seconds": seconds, "mb_per_s": size / 2**20 / seconds})
    return rows, size


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "photos" / "train"),
                        help="image folder for the write comparison")
    parser.add_argument("--vae", default="preset:tiny")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="pairs of encode runs; rounds of each verify arm")
    parser.add_argument("--parts", type=int, default=64, help="parts of the synthetic cache verified")
    parser.add_argument("--part_mb", type=float, default=16.0, help="MB per part")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return encode_once(args.data, args.out, args.arm == "hash", args.resolution, args.vae)
    sys.path.insert(0, str(ROOT / "src"))

    pairs = []
    for _ in range(args.rounds):
        pairs.append((run_encode(args.data, True, args.resolution, args.vae),
                      run_encode(args.data, False, args.resolution, args.vae)))
    images = pairs[0][0]["images"]
    with_hash = statistics.median(a["seconds"] for a, _ in pairs)
    without = statistics.median(b["seconds"] for _, b in pairs)
    ratio = statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)
    lines = [f"write: vaekit encode of {images} images of {args.data} at {args.resolution} px, {args.vae}, "
             f"median of {args.rounds} interleaved runs",
             f"{'arm':<34}{'seconds':>9}{'images/s':>10}",
             f"{'with part hashing (as shipped)':<34}{with_hash:>9.2f}{images / with_hash:>10.1f}",
             f"{'hashing stubbed out':<34}{without:>9.2f}{images / without:>10.1f}",
             f"ratio with/without, pair by pair (median): {ratio:.3f}", ""]
    verify_rows, size = verify_bench(args.parts, args.part_mb, args.rounds)
    lines.append(f"verify: {args.parts} parts of {args.part_mb:g} MB ({size / 2**20:.0f} MB), warm page cache, "
                 f"median of {args.rounds}")
    lines.append(f"{'arm':<34}{'seconds':>9}{'MB/s':>10}")
    for row in verify_rows:
        lines.append(f"{row['arm']:<34}{row['seconds']:>9.3f}{row['mb_per_s']:>10.0f}")
    text = "\n".join(lines)
    print(text)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"machine": machine, "encode_pairs": pairs, "verify": verify_rows,
                                               "verify_bytes": size, "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
