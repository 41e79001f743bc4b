"""Decoder fine-tuning sharpens a blurry VAE and keeps its latents: before and after, measured.

1. A blurry base: the demo recipe trained briefly with the L1 loss alone (`vaekit train`).
2. Decoder fine-tunes of it (`model.mode: decoder`) with the shipped configs and CPU-sized overrides:
   `ft_decoder_mse` (MSE + 0.1 LPIPS), `ft_decoder_l1_lpips` (L1 + LPIPS), and the same with the
   adversarial term (`disc.weight=0.5`).
3. `vaekit evaluate` scores the base and every fine-tune on the held-out photos under one protocol:
   hf_retention (1.0 is as sharp as the input), PSNR, LPIPS and rFID.
4. The latents: each fine-tune's encoder fingerprint against the base's, and `vaekit encode` of the
   held-out photos with the base and with each fine-tune, compared tensor by tensor.

    python scripts/sharpen.py                                    # ../shared/data/photos/{train,eval}
    python scripts/sharpen.py --base_steps 400 --steps 300 --variants l1_lpips,l1_lpips_gan

Every stage whose output exists is reused, so a stopped run continues where it was. The table goes
to OUT/sharpen.md (and OUT/sharpen.json); OUT/evaluation/report.html shows the images.
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
CONFIGS = ROOT / "configs" / "train"

# Decoder fine-tunes: (label, shipped config, extra overrides). `{half}` is half the fine-tune's steps.
VARIANTS = {
    "mse_lpips": ("MSE + 0.1 LPIPS (ft_decoder_mse)", "ft_decoder_mse.yaml", []),
    "l1_lpips": ("L1 + LPIPS (ft_decoder_l1_lpips)", "ft_decoder_l1_lpips.yaml", []),
    "l1_lpips_gan": ("L1 + LPIPS + GAN (ft_decoder_l1_lpips, disc.weight=0.5)", "ft_decoder_l1_lpips.yaml",
                     ["disc.weight=0.5", "disc.start={half}", "disc.n_layers=2", "disc.base_channels=32",
                      "disc.lr=1e-4"]),
}


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", default=str(SHARED / "train"), help="training image folder")
    parser.add_argument("--eval", default=str(SHARED / "eval"), help="held-out image folder, scored by vaekit evaluate")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sharpen"), help="run folders and the table go here")
    parser.add_argument("--base_steps", type=int, default=300, help="steps of the blurry base (the demo recipe, L1)")
    parser.add_argument("--steps", type=int, default=300, help="steps of each decoder fine-tune")
    parser.add_argument("--size", type=int, default=64, help="training crop side in pixels")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4, help="fine-tune learning rate (the configs' 1e-5 is for "
                        "hundreds of thousands of steps)")
    parser.add_argument("--resolution", type=int, default=256, help="evaluation: short side resized, centre crop")
    parser.add_argument("--variants", default="mse_lpips,l1_lpips,l1_lpips_gan",
                        help=f"comma-separated: {', '.join(VARIANTS)}")
    return parser.parse_args(argv)


def vaekit(*args):
    """Run one vaekit command in a fresh process, from the repository root; returns its wall time in seconds."""
    command = [sys.executable, "-m", "vaekit.cli", *map(str, args)]
    print("$ vaekit " + " ".join(map(str, args)), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def train_base(args, out):
    """The blurry base: the demo recipe with the L1 loss alone, briefly. Returns (seconds, export)."""
    run = out / "base"
    if (run / "vae" / "config.json").is_file():
        return None, run / "vae"
    seconds = vaekit("train", "--config", CONFIGS / "demo.yaml", f"out_dir={run}", f"data.path={args.train}",
                     "data.holdout=4", f"data.size={args.size}", f"train.steps={args.base_steps}",
                     f"train.batch_size={args.batch_size}", f"train.checkpoint_every={args.base_steps}",
                     "validation.every=0", "loss.perceptual_weight=0", "log.tracker=none", "log.progress=false",
                     "--resume", "latest")
    return seconds, run / "vae"


def fine_tune(name, base, args, out):
    """One decoder fine-tune from `base` with a shipped config and CPU-sized overrides. Returns (seconds, export)."""
    _, config, extra = VARIANTS[name]
    run = out / name
    if (run / "vae" / "config.json").is_file():
        return None, run / "vae"
    extra = [o.format(half=args.steps // 2) for o in extra]
    seconds = vaekit(
        "train", "--config", CONFIGS / config, f"out_dir={run}", f"model.source={base}", f"data.path={args.train}",
        "data.holdout=4", f"data.size={args.size}", "data.crop=random", "data.num_workers=1",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.mixed_precision=no",
        f"train.checkpoint_every={args.steps}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.steps // 10}",
        "ema.decay=0.999", "ema.warmup=true", "validation.every=0", "validation.size=256",
        "log.tracker=none", "log.progress=false", *extra, "--resume", "latest")
    return seconds, run / "vae"


def compare_latents(base_cache, cache):
    """(images, identical): whether two `vaekit encode` caches hold bit-identical posteriors, image by image."""
    from vaekit.cache import LatentDataset  # torch: only once the runs are done

    kept = 0
    for sample in (False, True):  # the posterior means, then seeded samples (which also read the log-variances)
        a = LatentDataset(base_cache, sample=sample, normalize=False, flips="none")
        b = LatentDataset(cache, sample=sample, normalize=False, flips="none", keys=[a[i]["key"] for i in range(len(a))])
        kept = sum(int(a[i]["latents"].equal(b[i]["latents"])) for i in range(len(a)))
        if kept != len(a):
            return len(a), False
    return kept, True


def main(argv=None):
    """Train the base and the fine-tunes, evaluate them together, compare their latents, print and save the table."""
    args = parse_args(argv)
    names = chosen(args.variants, VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds, exports = {}, {}
    seconds["base"], exports["base"] = train_base(args, out)
    for name in names:
        seconds[name], exports[name] = fine_tune(name, exports["base"], args, out)

    labels = {"base": "base (demo recipe, L1 only)", **{n: VARIANTS[n][0] for n in names}}
    evaluation = out / "evaluation"
    if not (evaluation / "metrics.json").is_file():
        command = ["evaluate", "--data", args.eval, "--out", evaluation, "--resolution", args.resolution, "--quiet"]
        for key in exports:
            command += ["--vae", exports[key], "--label", labels[key]]
        vaekit(*command)
    summary = json.loads((evaluation / "metrics.json").read_text())
    models = {m["label"]: m for m in summary["models"]}

    from vaekit.model import encoder_fingerprint, load_vae  # torch: only once the runs are done

    caches, fingerprints = {}, {}
    for key, export in exports.items():
        caches[key] = out / "latents" / key
        if not (caches[key] / "summary.json").is_file():
            # fp32 compute and storage: any difference in the encoder would show in the stored bits.
            vaekit("encode", "--vae", export, "--data", args.eval, "--out", caches[key], "--resolution",
                   args.resolution, "--compute_dtype", "fp32", "--dtype", "fp32", "--quiet")
        fingerprints[key] = encoder_fingerprint(load_vae(export))

    lines = [
        f"{summary['data']['images']} held-out photos ({args.eval}) at {args.resolution} px, posterior mean. Base: "
        f"the demo recipe, L1 only, {args.base_steps} steps x {args.batch_size} crops of {args.size} px from "
        f"{args.train}; each fine-tune: {args.steps} more steps, decoder only, lr {args.lr:g}. "
        f"{platform.machine()}, {os.cpu_count()} CPU threads.",
        "",
        "| model | HF retention | PSNR (dB) | LPIPS-VGG | LPIPS-Alex | rFID | encoder fingerprint | `vaekit encode` "
        "latents | train time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for key in exports:
        m = models[labels[key]]
        mean = m["mean"]
        if key == "base":
            same, images = "(reference)", "(reference)"
        else:
            same = "identical" if fingerprints[key] == fingerprints["base"] else "DIFFERENT"
            count, identical = compare_latents(caches["base"], caches[key])
            images = f"bit-identical ({count} images)" if identical else "DIFFERENT"
        took = "-" if seconds[key] is None else f"{seconds[key]:.0f}"
        lines.append(f"| {labels[key]} | {fmt(mean['hf_retention'], 3)} | {fmt(mean['psnr'], 2)} | "
                     f"{fmt(mean['lpips_vgg'], 4)} | {fmt(mean['lpips_alex'], 4)} | {fmt(m['rfid'], 1)} | "
                     f"{fingerprints[key][:12]} {same if key != 'base' else ''} | {images} | {took} |")
        results[key] = {"label": labels[key], "hf_retention": mean["hf_retention"], "psnr": mean["psnr"],
                        "lpips_vgg": mean["lpips_vgg"], "lpips_alex": mean["lpips_alex"], "rfid": m["rfid"],
                        "encoder_fingerprint": fingerprints[key], "latents": images, "train_seconds": seconds[key]}
    table = "\n".join(lines)
    print("\n" + table)
    (out / "sharpen.md").write_text(table + "\n")
    (out / "sharpen.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {out / 'sharpen.md'} and {evaluation / 'report.html'}")
    return 0


def fmt(value, digits):
    """A metric cell, '-' when it could not be computed."""
    return "-" if value is None or value != value else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
