"""What the perceptual and adversarial terms buy: the same small VAE trained with each loss, scored on held-out photos.

Each variant trains the same model (same seed, data order and step budget) with `vaekit train` in
its own process, then `vaekit.eval.evaluate` scores every exported model on the evaluation folder under
one protocol and this script prints a Markdown table. The baseline is the L1-only run.

    python scripts/quality.py                           # ../shared/data/photos/{train,eval}, 300 steps
    python scripts/quality.py --steps 2000 --size 128 --variants l1,l1_lpips,l1_lpips_gan

Numbers are for a short CPU budget: they show the direction each term moves the metrics, not
what a full training run reaches.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import chosen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "photos"

# Loss variants as `vaekit train` overrides; the adversarial term starts halfway, as latent-diffusion
# starts its discriminator only once reconstructions are reasonable.
VARIANTS = {
    "l1": ("L1", []),
    "l1_lpips": ("L1 + LPIPS", ["loss.perceptual_weight=1.0"]),
    "l1_lpips_gan": ("L1 + LPIPS + GAN", ["loss.perceptual_weight=1.0", "disc.weight=0.5", "disc.start={half}",
                                          "disc.n_layers=2", "disc.base_channels=32", "disc.lr=2e-4"]),
    "l2_lpips": ("MSE + 0.1 LPIPS", ["loss.reconstruction=l2", "loss.perceptual_weight=0.1"]),
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", default=str(SHARED / "train"), help="training image folder")
    parser.add_argument("--eval", default=str(SHARED / "eval"), help="evaluation image folder")
    parser.add_argument("--out", default=str(ROOT / "runs" / "quality"), help="run folders and the table go here")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per variant")
    parser.add_argument("--size", type=int, default=64, help="training crop side in pixels")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256, help="evaluation: short side resized, centre crop")
    parser.add_argument("--model", default="preset:tiny", help="model argument every variant starts from")
    parser.add_argument("--variants", default="l1,l1_lpips,l1_lpips_gan", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `vaekit train` override for every variant (repeatable)")
    return parser.parse_args(argv)


def train_variant(name, args, out):
    """Train one variant in a fresh process; returns (seconds, path of its diffusers export)."""
    label, overrides = VARIANTS[name]
    run = out / name
    overrides = [o.format(half=args.steps // 2) for o in overrides]
    command = [
        sys.executable, "-m", "vaekit.cli", "train", "--config", str(ROOT / "configs" / "train" / "demo.yaml"),
        f"out_dir={run}", f"model.source={args.model}", f"data.path={args.train}", "data.holdout=0",
        f"data.size={args.size}", "data.crop=random", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.checkpoint_every={args.steps}", "validation.every=0",
        "loss.perceptual_weight=0", "loss.perceptual_if_missing=error", "log.tracker=none", "log.progress=false",
        *overrides, *args.set,
    ]
    print(f"[{label}] {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start, run / "vae"


def main(argv=None):
    """Train every variant, evaluate them together, print and save the table."""
    args = parse_args(argv)
    names = chosen(args.variants, VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds, exports = {}, {}
    for name in names:
        seconds[name], exports[name] = train_variant(name, args, out)

    from vaekit.eval.config import EvaluateConfig
    from vaekit.eval.evaluate import evaluate

    labels = [VARIANTS[n][0] for n in names]
    summary = evaluate(EvaluateConfig(vae=[str(exports[n]) for n in names], label=labels, data=args.eval,
                                      out=str(out / "evaluation"), resolution=args.resolution, rfid=False),
                       progress=False)
    rows = {m["label"]: m["mean"] for m in summary["models"]}
    base = rows[labels[0]]
    lines = [
        f"{summary['data']['images']} held-out photos ({args.eval}), {args.resolution} px centre crops, posterior mean; "
        f"{args.model} trained {args.steps} steps x {args.batch_size} crops of {args.size} px from {args.train}; "
        f"{os.cpu_count()} CPU threads.",
        "",
        "| loss | PSNR (dB) | SSIM | LPIPS-VGG | LPIPS-Alex | train time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in zip(names, labels):
        m = rows[label]
        delta = "" if label == labels[0] else f" ({m['psnr'] - base['psnr']:+.2f})"
        lines.append(f"| {label} | {m['psnr']:.2f}{delta} | {m['ssim']:.4f} | {fmt(m.get('lpips_vgg'))} | "
                     f"{fmt(m.get('lpips_alex'))} | {seconds[name]:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps({"args": vars(args), "seconds": seconds, "metrics": rows}, indent=2))
    print(f"\nwrote {out / 'quality.md'} and {out / 'evaluation' / 'report.html'}")
    return 0


def fmt(value):
    """A metric cell, '-' when it could not be computed (no LPIPS weights)."""
    return "-" if value is None or value != value else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
