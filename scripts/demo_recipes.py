"""The `make demo` recipe against its alternatives: each candidate trained as `make demo` trains, timed, scored.

Every candidate is `configs/train/demo.yaml` with a few overrides, trained from scratch by `vaekit
train` in its own process on the built-in photos (the same two held out) and scored by the run
itself on those two photos at 256 px (PSNR, LPIPS-Alex, hf_retention). Training time is the run's
own measure of its step loop (`train_seconds` in metrics.json), so start-up and export are not in it;
the wall time of the whole command is printed beside it. Run it on an idle machine: the time is the
point.

    python scripts/demo_recipes.py                         # every candidate, in order
    python scripts/demo_recipes.py --only shipped,c4_old   # some of them

Results accumulate in OUT/results.json (a candidate already there is not trained again unless
--again) and the table in OUT/demo_recipes.md.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import chosen  # noqa: E402

import yaml

ROOT = Path(__file__).resolve().parents[1]

# name -> (what changes against the shipped recipe, overrides). "shipped" is configs/train/demo.yaml as it is.
CANDIDATES = {
    "c4_old": ("the previous recipe: the tiny preset as is (4 channels, 32 norm groups), 600 steps, a data worker",
               ["model.overrides={}", "loss.kl_weight=2.0833e-8", "train.steps=600", "data.num_workers=1",
                "train.checkpoint_every=200", "validation.every=200"]),
    "c32_g8": ("32 channels, 8 norm groups", ["model.overrides={latent_channels: 32, norm_num_groups: 8}",
                                              "loss.kl_weight=1.6667e-7"]),
    "c32_g32": ("32 channels, the tiny preset's 32 norm groups (one channel per group at width 32)",
                ["model.overrides={latent_channels: 32}", "loss.kl_weight=1.6667e-7"]),
    "shipped": ("configs/train/demo.yaml as shipped: 16 channels (SD3, FLUX), 8 norm groups, 900 steps", []),
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo_recipes"), help="run folders and the table go here")
    parser.add_argument("--only", help=f"comma-separated candidates (default all): {', '.join(CANDIDATES)}")
    parser.add_argument("--again", action="store_true", help="train candidates again even when results exist")
    return parser.parse_args(argv)


def train(name, out):
    """Train one candidate in a fresh process; returns its result row."""
    what, overrides = CANDIDATES[name]
    run = out / name
    command = [sys.executable, "-m", "vaekit.cli", "train", "--config", str(ROOT / "configs" / "train" / "demo.yaml"),
               f"out_dir={run}", "log.progress=false", "log.tracker=none", *overrides]
    print(f"[{name}] {' '.join(command[3:])}", flush=True)
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: the time must be of all its steps
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    metrics = json.loads((run / "metrics.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {"name": name, "what": what, "overrides": overrides, "psnr": metrics["psnr"], "ssim": metrics["ssim"],
            "lpips_alex": metrics["lpips"], "hf_retention": metrics.get("hf_retention"),
            "train_seconds": metrics["train_seconds"], "wall_seconds": wall, "steps": metrics["step"],
            "batch": config["train"]["batch_size"], "size": config["data"]["size"]}


def table(rows):
    """The Markdown table of result rows."""
    lines = [f"{platform.machine()}, {os.cpu_count()} CPU threads; held-out: the 2 photos `make demo` holds out, "
             "256 px, posterior mean. Train time: the step loop; wall: the whole command.",
             "",
             "| candidate | what changes | steps x batch x px | PSNR (dB) | LPIPS-Alex | SSIM | HF retention | "
             "train time (s) | wall (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['what']} | {r['steps']} x {r['batch']} x {r['size']} | {r['psnr']:.2f} | "
                     f"{r['lpips_alex']:.3f} | {r['ssim']:.3f} | {r['hf_retention']:.2f} | {r['train_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    """Train the chosen candidates (those without results first), print and save the table."""
    args = parse_args(argv)
    names = chosen(args.only or ",".join(CANDIDATES), CANDIDATES, "candidate")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in names:
        if name in results and not args.again:
            continue
        results[name] = train(name, out)
        store.write_text(json.dumps(results, indent=2))
    text = table([results[n] for n in CANDIDATES if n in results])
    print("\n" + text)
    (out / "demo_recipes.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
