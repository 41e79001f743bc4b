"""The `make demo` recipe against its alternatives: each candidate trained as `make demo` trains, timed, scored.

Every candidate is `configs/train/demo.yaml` with a few overrides, trained from scratch by `vaekit
train` in its own process on the built-in photos (the same two held out) and scored by the run
itself on those two photos at 256 px (PSNR, LPIPS-Alex, hf_retention). Training time is the run's
own measure of its step loop (`train_seconds` in metrics.json), so start-up and export are not in it;
the wall time of the whole command is printed beside it. Run it on an idle machine: the time is the
point.

    python scripts/demo_recipes.py                         # every candidate, in order
    python scripts/demo_recipes.py --only shipped,c4_old   # some of them
    python scripts/demo_recipes.py --table                 # the table of what OUT/results.json holds

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

# The previous `make demo` recipe, as overrides of configs/train/demo.yaml: fp32, 900 steps x 4 crops, EMA,
# latent-diffusion's Adam betas, the posterior's usual initial variance, every crop decoding its photo.
PREVIOUS = ["data.short_side=null", "model.overrides={latent_channels: 16, norm_num_groups: 8}",
            "model.init_logvar=null", "data.keep_decoded=0",
            "optim.betas=[0.5, 0.9]", "ema.enabled=true", "ema.warmup=true", "train.steps=900", "train.batch_size=4",
            "train.mixed_precision=no", "train.checkpoint_every=300", "validation.every=300", "log.every=25"]
# Short probes (about a minute of training; held-out metrics only at the end) rank the levers before full runs.
PROBE = ["validation.every=0", "train.checkpoint_every=10000"]
# Crops at the photos' capture resolution, as every recipe before random scales.
NATIVE = ["data.short_side=null"]
# The levers measured one by one from the previous recipe, as the probes ran them.
FAST = ["train.mixed_precision=bf16", "ema.enabled=false",
        "model.overrides={latent_channels: 16, norm_num_groups: 8, mid_block_add_attention: false}"]
QUIET = ["model.init_logvar=-6", "data.keep_decoded=16"]
BETAS = ["optim.betas=[0.9, 0.99]"]
# The shipped recipe as a full run with held-out metrics only at the end (random scales, short side 192-320 px).
SCALED = [*PROBE, "train.steps=1400", "data.short_side=[192, 320]"]
JITTER = ["data.hue_jitter=0.05", "data.saturation_jitter=0.3"]

# name -> (what changes against the shipped recipe, overrides). "shipped" is configs/train/demo.yaml as it is.
CANDIDATES = {
    "c4_old": ("the first recipe: the tiny preset as is (4 channels, 32 norm groups), 600 steps, a data worker",
               [*PREVIOUS, "model.overrides={}", "loss.kl_weight=2.0833e-8", "train.steps=600", "data.num_workers=1",
                "train.checkpoint_every=200", "validation.every=200"]),
    "c32_g8": ("the previous recipe with 32 channels", [*PREVIOUS, "model.overrides={latent_channels: 32, norm_num_groups: 8}",
                                                        "loss.kl_weight=1.6667e-7"]),
    "c32_g32": ("the previous recipe with 32 channels and the tiny preset's 32 norm groups (one channel per group)",
                [*PREVIOUS, "model.overrides={latent_channels: 32}", "loss.kl_weight=1.6667e-7"]),
    "previous": ("the previous recipe: 16 channels, 8 norm groups, fp32, 900 x 4, EMA, Adam betas [0.5, 0.9]",
                 PREVIOUS),
    "p_previous": ("probe: the previous recipe, 480 steps", [*PREVIOUS, *PROBE, "train.steps=480"]),
    "p_bf16_b16": ("probe: bf16, 16 crops a step, no EMA, no mid-block attention, decoding the posterior mean",
                   [*PREVIOUS, *PROBE, *FAST, "model.sample_posterior=false", "train.batch_size=16",
                    "train.steps=250", "train.checkpoint_every=1000"]),
    "p_bf16_b16_lr2e3": ("probe: as p_bf16_b16, lr 2e-3", [*PREVIOUS, *PROBE, *FAST, "model.sample_posterior=false",
                                                           "train.batch_size=16", "train.steps=250", "optim.lr=2e-3"]),
    "p_bf16_b16_noisy": ("probe: as p_bf16_b16, decoding posterior samples (log-variance initialised near 0)",
                         [*PREVIOUS, *PROBE, *FAST, "train.batch_size=16", "train.steps=250"]),
    "p_bf16_b16_quiet": ("probe: as p_bf16_b16_noisy, log-variance initialised at -6, photos kept decoded",
                         [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=16", "train.steps=250"]),
    "p_bf16_b8": ("probe: as p_bf16_b16, 8 crops a step", [*PREVIOUS, *PROBE, *FAST, "model.sample_posterior=false",
                                                            "train.batch_size=8", "train.steps=450"]),
    "p_bf16_b8_quiet": ("probe: as p_bf16_b16_quiet, 8 crops a step",
                        [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=8", "train.steps=450"]),
    "p_b8_quiet_lr5e4": ("probe: as p_bf16_b8_quiet, lr 5e-4",
                         [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=8", "train.steps=450", "optim.lr=5e-4"]),
    "p_b8_quiet_colour": ("probe: as p_bf16_b8_quiet, colour jitter (any hue, saturation x 0.5-1.5)",
                          [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=8", "train.steps=450",
                           "data.hue_jitter=0.5", "data.saturation_jitter=0.5"]),
    "p_b4_128px": ("probe: as p_bf16_b8_quiet, 4 crops of 128 px a step",
                   [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=4", "data.size=128", "train.steps=250"]),
    "p_b1_256px": ("probe: as p_bf16_b8_quiet, 1 crop of 256 px a step",
                   [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=1", "data.size=256", "train.steps=250"]),
    "p_b8_quiet_betas": ("probe: as p_bf16_b8_quiet, Adam betas [0.9, 0.99]",
                         [*PREVIOUS, *PROBE, *FAST, *QUIET, *BETAS, "train.batch_size=8", "train.steps=450"]),
    # From here on as overrides of the shipped recipe (bf16, 8 crops a step, no EMA, no mid-block attention,
    # log-variance initialised at -6, photos kept decoded, betas [0.9, 0.99]); first the `native` recipe, whose
    # crops are at the photos' capture resolution.
    "p_w16": ("probe: the native recipe, 600 steps, widths [16, 32, 64, 64]",
              [*NATIVE, *PROBE, "train.steps=600", "model.overrides={latent_channels: 16, norm_num_groups: 8, "
                                          "mid_block_add_attention: false, block_out_channels: [16, 32, 64, 64]}"]),
    "p_lr2e3": ("probe: the native recipe, 450 steps, lr 2e-3",
                [*NATIVE, *PROBE, "train.steps=450", "optim.lr=2e-3"]),
    "p_betas_999": ("probe: the native recipe, 450 steps, betas [0.9, 0.999] (PyTorch's default)",
                    [*NATIVE, *PROBE, "train.steps=450", "optim.betas=[0.9, 0.999]"]),
    "b8_quiet": ("as p_bf16_b8_quiet for the whole budget: 1400 steps",
                 [*PREVIOUS, *PROBE, *FAST, *QUIET, "train.batch_size=8", "train.steps=1400"]),
    "s1400": ("the native recipe, 1400 steps, held-out metrics only at the end",
              [*NATIVE, *PROBE, "train.steps=1400"]),
    "s1400_lpips25": ("as s1400, LPIPS weight 0.25",
                      [*NATIVE, *PROBE, "train.steps=1400", "loss.perceptual_weight=0.25"]),
    "s1400_c32": ("as s1400, 32 latent channels", [*NATIVE, *PROBE, "train.steps=1400", "loss.kl_weight=1.6667e-7",
                                                  "model.overrides={latent_channels: 32, norm_num_groups: 8, "
                                                  "mid_block_add_attention: false}"]),
    "s1350": ("as native, 1350 steps, the held-out grid also at step 675",
              [*NATIVE, "train.steps=1350", "validation.every=675", "train.checkpoint_every=675"]),
    # Random scales: crops of the photos scaled to a short side in a range (the held-out photos are scored at 256 px).
    "s1400_ss256_384": ("as s1400, crops of the photos scaled to a short side of 256-384 px",
                        [*PROBE, "train.steps=1400", "data.short_side=[256, 384]"]),
    "s1400_ss256_512": ("as s1400, crops of the photos scaled to a short side of 256-512 px",
                        [*PROBE, "train.steps=1400", "data.short_side=[256, 512]"]),
    "s1400_ss192_320": ("as s1400, crops of the photos scaled to a short side of 192-320 px", SCALED),
    "s1400_ss160_256": ("as s1400, crops of the photos scaled to a short side of 160-256 px",
                        [*PROBE, "train.steps=1400", "data.short_side=[160, 256]"]),
    "ss_seed1": ("as s1400_ss192_320, train.seed 1 (initial weights, data order, posterior noise)",
                 [*SCALED, "train.seed=1"]),
    "ss_seed2": ("as s1400_ss192_320, train.seed 2", [*SCALED, "train.seed=2"]),
    "ss_lp20": ("as s1400_ss192_320, LPIPS weight 0.2", [*SCALED, "loss.perceptual_weight=0.2"]),
    "ss_lp20_seed1": ("as ss_lp20, train.seed 1", [*SCALED, "loss.perceptual_weight=0.2", "train.seed=1"]),
    "ss_lp20_seed2": ("as ss_lp20, train.seed 2", [*SCALED, "loss.perceptual_weight=0.2", "train.seed=2"]),
    "ss_jitter": ("as s1400_ss192_320, mild colour jitter (hue +-0.05 of the wheel, saturation x 0.7-1.3)",
                  [*SCALED, *JITTER]),
    "ss_jitter_seed1": ("as ss_jitter, train.seed 1", [*SCALED, *JITTER, "train.seed=1"]),
    "ss_jitter_seed2": ("as ss_jitter, train.seed 2", [*SCALED, *JITTER, "train.seed=2"]),
    "ss_1350": ("as s1400_ss192_320, 1350 steps", [*PROBE, "train.steps=1350", "data.short_side=[192, 320]"]),
    "native": ("the previous `make demo` recipe: as shipped, crops at the photos' capture resolution", NATIVE),
    "shipped": ("configs/train/demo.yaml as shipped", []),
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo_recipes"), help="run folders and the table go here")
    parser.add_argument("--only", help=f"comma-separated candidates (default all): {', '.join(CANDIDATES)}")
    parser.add_argument("--again", action="store_true", help="train candidates again even when results exist")
    parser.add_argument("--table", action="store_true", help="only print and save the table of the stored results")
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


def wall_text(row):
    """The whole command's seconds, or a dash where only the step loop was timed."""
    return "-" if row.get("wall_seconds") is None else f"{row['wall_seconds']:.0f}"


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
                     f"{wall_text(r)} |")
    return "\n".join(lines)


def main(argv=None):
    """Train the chosen candidates (those without results first), print and save the table."""
    args = parse_args(argv)
    names = chosen(args.only or ",".join(CANDIDATES), CANDIDATES, "candidate")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in [] if args.table else names:
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
