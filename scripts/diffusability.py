"""Do the diffusability regularisers do what their papers say? The same small VAE fine-tuned four ways, then measured.

A base `preset:tiny` (f8, 4 channels) is trained from scratch; four copies of it are fine-tuned for
the same number of steps, with the same seed, data order and loss (L1 + KL), differing only in the
regulariser: none, EQ-VAE equivariance, scale equivariance, VA-VAE alignment (to `--align_model`,
by default the ImageNet AlexNet vaekit keeps for LPIPS, since a CPU machine without the hub has no
DINOv2). Every export is then scored on the held-out photos by `vaekit evaluate` (PSNR, LPIPS,
high-frequency share of the latents, equivariance PSNRs) and probed by `vaekit probe` (a small
denoiser trained on each one's latents of the same training photos, two seeds). The table goes to
OUT/diffusability.md and diffusability.json.

    python scripts/diffusability.py                        # ../shared/data/photos/{train,eval}
    python scripts/diffusability.py --base_steps 2000 --steps 1000 --probe_steps 1000

The expected direction (Skorokhodov et al. 2025; Kouzelis et al. 2025; Yao et al. 2025): lower
high-frequency energy and equivariance error at a small reconstruction cost, and a lower probe
loss. At a CPU budget of minutes the effects are small and may not all show; the table says what
this run measured.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import chosen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "photos"

# Fine-tuning variants as `vaekit train` overrides; every other key is the same for all of them.
VARIANTS = {
    "none": ("no regulariser", []),
    "eq": ("EQ-VAE (p 0.5)", ["loss.equivariance_prob=0.5"]),
    "se": ("scale equivariance (w 0.5)", ["loss.scale_equivariance_weight=0.5"]),
    "align": ("VA-VAE alignment (w 0.1)", ["loss.align_weight=0.1", "loss.align_model={align_model}"]),
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", default=str(SHARED / "train"), help="training image folder")
    parser.add_argument("--eval", default=str(SHARED / "eval"), help="held-out image folder")
    parser.add_argument("--out", default=str(ROOT / "runs" / "diffusability"), help="runs and the table go here")
    parser.add_argument("--base_steps", type=int, default=800, help="steps of the shared base model, from scratch")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of every variant")
    parser.add_argument("--size", type=int, default=64, help="training crop side in pixels")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256, help="evaluation: short side resized, centre crop")
    parser.add_argument("--align_model", default="torchvision:alexnet", help="feature model of the alignment variant")
    parser.add_argument("--probe_steps", type=int, default=300, help="denoiser steps per model and seed")
    parser.add_argument("--probe_size", type=int, default=128, help="probe images: centre crops of this side")
    parser.add_argument("--probe_seeds", default="0,1", help="comma-separated probe seeds")
    parser.add_argument("--variants", default="none,eq,se,align", help=f"comma-separated: {', '.join(VARIANTS)}")
    return parser.parse_args(argv)


def train(run, source, steps, args, overrides=()):
    """`vaekit train` in a fresh process from the demo config; returns (seconds, path of its diffusers export)."""
    command = [
        sys.executable, "-m", "vaekit.cli", "train", "--config", str(ROOT / "configs" / "train" / "demo.yaml"),
        f"out_dir={run}", f"model.source={source}", f"data.path={args.train}", "data.holdout=0",
        f"data.size={args.size}", "data.crop=random", f"train.steps={steps}", f"train.batch_size={args.batch_size}",
        f"train.checkpoint_every={steps}", "validation.every=0", "loss.perceptual_weight=0", "log.tracker=none",
        "log.progress=false", *overrides,
    ]
    print(f"[{run.name}] {' '.join(command[3:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start, run / "vae"


def main(argv=None):
    """Train the base and the variants, evaluate and probe them, print and save the table."""
    args = parse_args(argv)
    names = chosen(args.variants, VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_seconds, base = train(out / "base", "preset:tiny", args.base_steps, args)
    seconds, exports = {}, {}
    for name in names:
        overrides = [o.format(align_model=args.align_model) for o in VARIANTS[name][1]]
        # A fine-tune: a lower, constant learning rate from the base's EMA weights, the same for every variant.
        seconds[name], exports[name] = train(out / name, str(base), args.steps, args,
                                             ["optim.lr=3e-4", "optim.scheduler=constant", *overrides])

    from vaekit.eval.config import EvaluateConfig, ProbeConfig
    from vaekit.eval.evaluate import evaluate
    from vaekit.eval.probe import probe

    labels = [VARIANTS[n][0] for n in names]
    specs = [str(exports[n]) for n in names]
    summary = evaluate(EvaluateConfig(vae=specs, label=labels, data=args.eval, out=str(out / "evaluation"),
                                      resolution=args.resolution, rfid=False), progress=False)
    probes = {}
    for seed in [int(s) for s in args.probe_seeds.split(",") if s.strip()]:
        result = probe(ProbeConfig(vae=specs, label=labels, data=args.train, out=str(out / "probe"),
                                   limit=None, holdout=32, size=args.probe_size, steps=args.probe_steps, seed=seed),
                       progress=False)
        probes[seed] = {m["label"]: m["final"]["mean"] for m in result["models"]}
        (out / f"probe-seed{seed}.json").write_text(json.dumps(result, indent=2))
    minutes = (time.perf_counter() - started) / 60
    table = render(args, names, labels, summary, probes, seconds, base_seconds, minutes)
    print("\n" + table)
    (out / "diffusability.md").write_text(table + "\n")
    (out / "diffusability.json").write_text(json.dumps({
        "args": vars(args), "seconds": seconds, "base_seconds": base_seconds, "probe_final_loss": probes,
        "models": {m["label"]: {"mean": m["mean"], "diffusability": m["diffusability"]} for m in summary["models"]},
    }, indent=2))
    print(f"\nwrote {out / 'diffusability.md'} and {out / 'evaluation' / 'report.html'}")
    return 0


def render(args, names, labels, summary, probes, seconds, base_seconds, minutes):
    """The Markdown table of one run."""
    rows = {m["label"]: m for m in summary["models"]}
    seeds = sorted(probes)
    lines = [
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} CPU threads, {minutes:.0f} minutes "
        f"in all. `preset:tiny` trained {args.base_steps} steps from scratch ({base_seconds:.0f} s), then each variant "
        f"fine-tuned {args.steps} steps x {args.batch_size} random {args.size} px crops of {args.train} (L1 + KL, EMA). "
        f"Scored on the {summary['data']['images']} photos of {args.eval} at {args.resolution} px (posterior mean); "
        f"probe: {args.probe_steps} steps on {args.probe_size} px crops of the training photos, seeds "
        f"{', '.join(map(str, seeds))}. Alignment: {args.align_model}.",
        "",
        "| variant | PSNR (dB) | LPIPS-VGG | HF share of latents (ratio to images) | x2-down PSNR | rot-90 PSNR "
        f"| probe final loss ({' / '.join(f'seed {s}' for s in seeds)}) | fine-tune time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in zip(names, labels):
        m = rows[label]
        d = m["diffusability"]
        share, psnr = d["high_frequency_share"], d["equivariance_psnr"]
        probe_cells = " / ".join(f"{probes[s][label]:.4f}" for s in seeds)
        lines.append(f"| {label} | {m['mean']['psnr']:.2f} | {fmt(m['mean'].get('lpips_vgg'))} | "
                     f"{share['latents']:.3f} ({share['ratio']:.1f}x) | {psnr['downscale_x2']:.2f} | "
                     f"{psnr['rotate_90']:.2f} | {probe_cells} | {seconds[name]:.0f} |")
    return "\n".join(lines)


def fmt(value):
    """A metric cell, '-' when it could not be computed (no LPIPS weights)."""
    return "-" if value is None or value != value else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
