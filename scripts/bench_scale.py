"""Memory and time of the latent cache against its size: format 2 (units) against format 1 (manifests).

For each size N it builds two synthetic caches of N images in the real on-disk formats (tiny
(4, 2, 2) latents so the disk stays small; format 2 through vaekit.cache.format's own writers), then
runs each phase in a fresh process and records that process's RSS growth and time:

  rerun    `encode_dataset` over a source whose every unit is done (format 2; a WebDataset spec of
           N / unit_size `pipe:` shards that are never opened) / format 1's resume bookkeeping
           (parse every manifest, newest entry per image, the done-set), which every rank ran
  open     constructing LatentDataset (format 2) / what format 1's LatentDataset built
  reads    --reads random-access samples after opening (format 2 / format 1's row reader)
  verify   `vaekit cache verify`'s check of the whole cache (every part hashed; format 2 only)

With --baseline SRC (the `src` folder of another vaekit checkout, e.g. a worktree of the commit before
a change), rerun, open and reads also run with that code on a copy of the same format-2 cache
("base" rows): the cost of the current code's checks against the code before them, side by side.

The baseline "format 1" is format 1's own reader (vaekit.cache.v1) plus the bookkeeping its encoder
and dataset did, reproduced below; both read paths draw a posterior sample and normalise it, as
LatentDataset does by default. Growth is measured over the same phase on an empty cache (one
image), so imports and the VAE do not count. A least-squares fit of growth and time against images
and units is extrapolated to 10^8 and 10^9 images.

    python scripts/bench_scale.py --sizes 1000,10000,100000,1000000 --json benchmarks/scale.json
    git worktree add /tmp/before HEAD~1 && python scripts/bench_scale.py --baseline /tmp/before/src
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import process_memory_bytes, write_synthetic_unit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UNIT = 4096
LATENT = (4, 2, 2)


def rss_mb():
    """This process's resident set size now, in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anon_mb():
    """The anonymous part of the RSS (heap, Python objects), in MB: what is not clean file pages."""
    return process_memory_bytes("RssAnon") / 2**20


class PeakRSS:
    """The highest RSS seen while the block runs (sampled every 2 ms, plus the kernel's own peak)."""

    def __enter__(self):
        self.start, self.peak, self.stop = rss_mb(), rss_mb(), threading.Event()
        self.anon_start = self.anon_peak = anon_mb()
        self.kernel_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())
            self.anon_peak = max(self.anon_peak, anon_mb())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mb())
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if kernel > self.kernel_start:  # the kernel saw a new lifetime peak inside the block
            self.peak = max(self.peak, kernel)
        self.anon_peak = max(self.anon_peak, anon_mb())
        self.growth = self.peak - self.start
        self.anon_growth = self.anon_peak - self.anon_start


# ----------------------------------------------------------------------------------------------
# Building synthetic caches


def encode_config(out, units):
    """The EncodeConfig whose re-run the benchmark times: `units` pipe: shards, tiny VAE, 16 px."""
    from vaekit.cache.config import EncodeConfig

    return EncodeConfig(data=f"pipe:false shard-{{{0:07d}..{units - 1:07d}}}.tar", out=str(out), vae="preset:tiny",
                        resolution=16, num_workers=0, dtype="fp16", compute_dtype="fp32")


def build_v2(out, images):
    """A format-2 cache of `images` images whose units match `encode_config`'s shards, checksums included."""
    import torch

    from vaekit import __version__
    from vaekit.cache.encode import encode_options, load_encoder_vae, open_data, unit_layout
    from vaekit.cache.format import (FORMAT, FORMAT_MINOR, FORMAT_VERSION, cache_key, card_hash, catalog_row,
                                     index_path, new_token, size_policy, unit_schema, write_catalog)
    from vaekit.io import write_json

    units = -(-images // UNIT)
    config = encode_config(out, units)
    vae = load_encoder_vae(config)
    plan = open_data(config)
    key = cache_key(config, vae, size_policy(config, 8))
    (out / "units").mkdir(parents=True)
    card = {"format": FORMAT, "version": FORMAT_VERSION, "minor": FORMAT_MINOR, "key": key,
            "units": unit_layout(plan), "vae": {"source": config.vae, "downsample_factor": 8, "latent_channels": 4},
            "encode": encode_options(config), "vaekit_version": __version__}
    write_json(out / "card.json", card)
    token, catalog = new_token(), []
    for unit in range(units):
        count = min(UNIT, images - unit * UNIT)
        latents = torch.randn(count, *LATENT).half()
        write_synthetic_unit(out, unit, token, card, latents, [f"{unit * UNIT + i:010d}" for i in range(count)],
                             bucket=(16, 16), original=(40, 40), label=plan.label(unit), signature=plan.signature(unit))
        catalog.append(catalog_row(unit, *unit_schema(index_path(out, unit))))
    write_catalog(out, catalog, {"generation": 1, "writer": "bench", "card_hash": card_hash(card), "card": card})


def build_v1(out, images):
    """A format-1 cache of `images` images: manifests as format 1 wrote them, shards of 4096."""
    import torch
    from safetensors.torch import save_file

    (out / "shards").mkdir(parents=True)
    (out / "card.json").write_text(json.dumps({"format": "vaekit-latents", "version": 1,
                                               "key": {"store": "mean_logvar", "scaling_factor": 1.0,
                                                       "shift_factor": 0.0}}))
    with open(out / "manifest-000.jsonl", "w") as manifest:
        for shard in range(-(-images // UNIT)):
            count = min(UNIT, images - shard * UNIT)
            name = f"shards/shard-000-{shard:05d}.safetensors"
            latents = torch.randn(count, *LATENT).half()
            save_file({"mean/16x16": latents, "logvar/16x16": latents.clone()}, str(out / name),
                      metadata={"count": str(count)})
            for i in range(count):
                key = f"{shard * UNIT + i:010d}"
                manifest.write(json.dumps({
                    "key": key, "path": f"/data/images/{key}.jpg", "sha256": "0" * 64, "original_size": [40, 40],
                    "resized_size": [16, 16], "crop_box": [0, 0, 16, 16], "flip": False, "bucket": [16, 16],
                    "latent_shape": list(LATENT), "shard": name, "group": "16x16", "offset": i, "run": 1}) + "\n")


# ----------------------------------------------------------------------------------------------
# The phases (each runs in its own process: `--phase FORMAT:PHASE --cache DIR`)


def v1_open(cache):
    """What format 1's LatentDataset built at construction: every entry, grouped per image, keys and buckets."""
    from vaekit.cache import v1

    entries = v1.current_entries(v1.read_manifests(cache))
    by_key = {}
    for entry in entries:
        by_key.setdefault(entry["key"], []).append(entry)
    items = list(by_key.values())
    return items, [i[0]["key"] for i in items], [tuple(i[0]["bucket"]) for i in items], v1.ShardReader(cache)


def run_phase(fmt, phase, cache, reads):
    """Run one phase in this process; prints {"seconds", "growth_mb"} as JSON."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    cache = Path(cache)
    units = len(list((cache / "units").glob("*.index.arrow"))) if fmt != "v1" else None
    if phase == "verify":
        from vaekit.cache.verify import verify_cache

        verify_cache(cache, jobs=2, progress=False)  # warm: imports, page cache
        with PeakRSS() as rss:
            start = time.perf_counter()
            report = verify_cache(cache, jobs=2, progress=False)
            seconds = time.perf_counter() - start
        assert not report["damaged"] and report["units"] == units, report
    elif fmt != "v1" and phase == "rerun":
        from vaekit.cache.encode import encode_dataset, load_encoder_vae

        config = encode_config(cache, max(units, 1))
        vae = load_encoder_vae(config)
        encode_dataset(config, vae=vae, progress=False)  # warm: imports, process state, a first listing
        with PeakRSS() as rss:
            start = time.perf_counter()
            summary = encode_dataset(config, vae=vae, progress=False)
            seconds = time.perf_counter() - start
        assert summary["units_encoded"] == 0 and summary["units_unchanged"] == units, summary
    elif fmt == "v1" and phase == "rerun":
        from vaekit.cache import v1

        with PeakRSS() as rss:
            start = time.perf_counter()
            done = {e["key"]: e["sha256"] for e in v1.current_entries(v1.read_manifests(cache)) if not e["flip"]}
            seconds = time.perf_counter() - start
        assert len(done) == sum(1 for _ in open(cache / "manifest-000.jsonl"))
    else:
        from vaekit.cache.dataset import LatentDataset

        open_data = (lambda: LatentDataset(cache)) if fmt != "v1" else (lambda: v1_open(cache))
        if phase == "open":
            with PeakRSS() as rss:
                start = time.perf_counter()
                dataset = open_data()
                seconds = time.perf_counter() - start
        else:
            dataset = open_data()
            count = len(dataset) if fmt != "v1" else len(dataset[0])
            picks = np.random.default_rng(0).integers(0, count, reads)
            if fmt != "v1":  # one read first: lazy imports and first-use setup are not what is measured
                dataset[0]
            else:
                dataset[3].row(dataset[0][0][0], "mean")
            with PeakRSS() as rss:
                start = time.perf_counter()
                if fmt != "v1":
                    for i in picks:
                        dataset[int(i)]["latents"]
                else:
                    from vaekit.seeds import torch_generator

                    items, _, _, reader = dataset
                    for i in picks:  # format 1's __getitem__ (posterior sample, normalised), as it was
                        entry = items[int(i)][0]
                        generator = torch_generator(0, 0, int(i))
                        z = reader.row(entry, "mean").float()
                        std = reader.row(entry, "logvar").float().mul(0.5).exp()
                        z = ((z + std * torch.randn(z.shape, generator=generator)) - 0.0) * 1.0
                        {"latents": z, "key": entry["key"], "flip": bool(entry["flip"]),
                         "bucket": tuple(entry["bucket"]), "original_size": tuple(entry["original_size"]),
                         "crop_box": tuple(entry["crop_box"]), "path": entry.get("path")}
                seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "growth_mb": rss.growth, "anon_growth_mb": rss.anon_growth}))


def measure(fmt, phase, cache, reads, source=None):
    """Run a phase in a fresh process (importing vaekit from `source`, default this checkout); returns its
    {"seconds", "growth_mb"}."""
    env = {**os.environ, "PYTHONPATH": str(source or ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--phase", f"{fmt}:{phase}", "--cache", str(cache),
                           "--reads", str(reads)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{fmt} {phase} on {cache} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Fit and report


def fit(rows, fmt, phase, field):
    """Least squares field = a + b * images over the rows of one (format, phase): (a, b per image)."""
    import numpy as np

    xs = np.array([r["images"] for r in rows if r["format"] == fmt and r["phase"] == phase], float)
    ys = np.array([r[field] for r in rows if r["format"] == fmt and r["phase"] == phase], float)
    if len(xs) < 2:
        return float(ys[0]) if len(ys) else 0.0, 0.0
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b)


def report(rows, sizes, reads):
    """The table and the extrapolation, as text."""
    lines = [f"{'format':<8}{'phase':<8}{'images':>12}{'units':>8}{'growth MB':>12}{'anon MB':>10}{'seconds':>10}"]
    for r in rows:
        lines.append(f"{r['format']:<8}{r['phase']:<8}{r['images']:>12,}{r['units']:>8}{r['growth_mb']:>12.1f}"
                     f"{r['anon_growth_mb']:>10.1f}{r['seconds']:>10.3f}")
    lines.append("")
    lines.append(f"fit over {', '.join(f'{n:,}' for n in sizes)} images: RSS growth = a + b * images, "
                 "time = c + d * images; extrapolated")
    lines.append(f"{'format':<8}{'phase':<8}{'MB/1e6 img':>12}{'s/1e6 img':>11}{'MB at 1e8':>11}{'MB at 1e9':>11}"
                 f"{'s at 1e8':>10}{'s at 1e9':>10}")
    formats = [f for f in ("v2", "base", "v1") if any(r["format"] == f for r in rows)]
    for fmt in formats:
        for phase in ("rerun", "open", "verify"):
            if not any(r["format"] == fmt and r["phase"] == phase for r in rows):
                continue
            a, b = fit(rows, fmt, phase, "growth_mb")
            c, d = fit(rows, fmt, phase, "seconds")
            lines.append(f"{fmt:<8}{phase:<8}{b * 1e6:>12.2f}{d * 1e6:>11.3f}{a + b * 1e8:>11.0f}{a + b * 1e9:>11.0f}"
                         f"{c + d * 1e8:>10.1f}{c + d * 1e9:>10.1f}")
    lines.append("")
    lines.append(f"random reads ({reads:,} per size): microseconds per read; RSS growth (anonymous growth), "
                 "the rest being clean pages of mapped files")
    for fmt in formats:
        cells = [f"{r['images']:,}: {1e6 * r['seconds'] / reads:.0f} us, +{r['growth_mb']:.0f} "
                 f"({r['anon_growth_mb']:.0f}) MB"
                 for r in rows if r["format"] == fmt and r["phase"] == "reads"]
        lines.append(f"{fmt:<8}" + "; ".join(cells))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated image counts")
    parser.add_argument("--reads", type=int, default=10000, help="random-access reads per size")
    parser.add_argument("--json", help="write the rows (and the machine) as JSON here")
    parser.add_argument("--baseline", help="the src folder of another vaekit checkout: rerun, open and reads of the "
                        "same format-2 cache with that code too (rows 'base')")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return run_phase(*args.phase.split(":"), args.cache, args.reads)
    sys.path.insert(0, str(ROOT / "src"))
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scale.") as tmp:
        baseline = {}
        for images in [1, *sizes]:
            for fmt, build in (("v2", build_v2), ("v1", build_v1)):
                cache = Path(tmp) / f"{fmt}-{images}"
                start = time.perf_counter()
                build(cache, images)
                built = time.perf_counter() - start
                arms = [(fmt, cache, None)]
                if fmt == "v2" and args.baseline:  # the older code on a copy (its encode writes its own catalog)
                    shutil.copytree(cache, Path(tmp) / f"base-{images}")
                    arms.append(("base", Path(tmp) / f"base-{images}", args.baseline))
                phases = ("rerun", "open", "reads", "verify")
                for phase in phases:
                    for arm, folder, source in arms:  # interleaved: current, base, current, base ...
                        if phase == "verify" and arm != "v2":
                            continue
                        result = measure(arm, phase, folder, args.reads, source)
                        if images == 1:  # the empty-cache baseline of this phase
                            baseline[(arm, phase)] = result
                            continue
                        base = baseline[(arm, phase)]
                        row = {"format": arm, "phase": phase, "images": images, "units": -(-images // UNIT),
                               "growth_mb": max(0.0, result["growth_mb"] - base["growth_mb"]),
                               "anon_growth_mb": max(0.0, result["anon_growth_mb"] - base["anon_growth_mb"]),
                               "raw_growth_mb": result["growth_mb"], "seconds": result["seconds"], "build_s": built}
                        rows.append(row)
                        print(f"{arm} {phase:<6} {images:>10,} images: +{row['growth_mb']:.1f} MB "
                              f"(anonymous +{row['anon_growth_mb']:.1f}), "
                              f"{row['seconds']:.3f} s", flush=True)
                for _, folder, _ in arms:
                    shutil.rmtree(folder)
    text = report(rows, sizes, args.reads)
    print()
    print(text)
    if args.json:
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
        Path(args.json).write_text(json.dumps({"machine": machine, "unit_size": UNIT, "latent": LATENT,
                                               "reads": args.reads, "rows": rows, "table": text}, indent=2) + "\n")


if __name__ == "__main__":
    main()
