"""`vaekit evaluate` and `vaekit inspect`: scoring VAEs and diagnosing their latent space."""

import argparse
import math
from pathlib import Path

from vaekit.cli.args import add_command, add_config_argument, add_model_arguments, config_from_args, flag
from vaekit.config import DTYPE_NAMES
from vaekit.errors import VaekitError
from vaekit.eval.config import IDENTITY, EvaluateConfig, InspectConfig


def register(subparsers):
    """Add evaluate and inspect."""
    p = add_command(
        subparsers, "evaluate", "score VAEs on a set of images: PSNR, SSIM, MS-SSIM, LPIPS, rFID; HTML report",
        "Reconstruct the same images with each --vae and write metrics.json, per_image.csv, report.html and "
        "comparison.png to --out. Flags override keys of an optional --config YAML.",
    )
    add_config_argument(p, "EvaluateConfig")
    add_model_arguments(p, name="vae", positional=False, repeatable=True,
                        help_text=f"a model to score (or `{IDENTITY}`, the input itself: an upper bound)")
    p.add_argument("--label", action="append", help="display name for each --vae, in order (repeatable)")
    p.add_argument("--data", help="image folder, Hugging Face data set, WebDataset shards or builtin:photos")
    p.add_argument("--out", help="output folder")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--resolution", type=parse_resolution,
                   help="short side + centre crop in px (default 256), or `full` for whole images")
    p.add_argument("--batch_size", type=int, help="images per batch (default 4)")
    flag(p, "sample", "decode a posterior sample, not the mean")
    p.add_argument("--seed", type=int, help="seed of the posterior samples")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="model precision (default fp32)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--tile", help="off (default), auto, or a tile size in px: exact tiled encode/decode for large images")
    flag(p, "lpips", "compute LPIPS (default on)")
    flag(p, "rfid", "compute rFID (default on)")
    p.add_argument("--worst", type=int, help="images shown in the report's comparison (default 4)")
    p.add_argument("--crop", type=int, help="side of the comparison crops in pixels (default 96)")
    p.add_argument("--psnr_cap", type=float, help="PSNR cap in dB (default 100)")
    flag(p, "diffusability", "latent spectrum and equivariance error of each model (default on)")
    p.add_argument("--teacher", metavar="LABEL|MODEL",
                   help="a teacher (one of the --vae labels or models, else loaded and added): each model of its "
                        "latent grid is scored on decoding its latents and encoding into its latent space")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)

    p = add_command(
        subparsers, "inspect", "latent-space diagnostics: KL, active units, collapse, histograms, scale/shift, "
                               "spectrum and equivariance",
        "Measure a VAE's latents on images: KL per channel, active units, posterior collapse, histograms, the "
        "normalisation they imply, and how diffusion-friendly they are (power spectrum against the images', "
        "equivariance error, a verdict); several --vae side by side. With --precision, each layer's largest "
        "activation against float16's range.",
    )
    add_config_argument(p, "InspectConfig")
    add_model_arguments(p, name="vae", positional=False, repeatable=True, help_text="a model to inspect")
    p.add_argument("--label", action="append", help="display name for each --vae, in order (repeatable)")
    p.add_argument("--data", help="image folder, Hugging Face data set, WebDataset shards or builtin:photos")
    p.add_argument("--out", help="folder for inspect.json and histograms.png")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--size", type=int, help="short side + centre crop in px (default 256)")
    p.add_argument("--batch_size", type=int, help="images per batch (default 4)")
    p.add_argument("--seed", type=int, help="seed of the posterior samples (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", action="store_true", default=None,
                   help="instead: per-layer largest activation against float16's limit (is this VAE fp16-safe?)")
    flag(p, "diffusability", "latent spectrum, equivariance error and verdict (default on; decodes the latents)")
    p.set_defaults(func=run_inspect)


def parse_resolution(text):
    """`full` or a positive integer."""
    if text == "full":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of pixels or 'full', got {text!r}") from None


def run_evaluate(args):
    """Score the models and write the report."""
    from vaekit.eval.evaluate import evaluate  # torch, diffusers and torchmetrics: only once the command runs

    config = config_from_args(EvaluateConfig, args)
    summary = evaluate(config, progress=not args.quiet)
    print_summary(summary)
    plots = [name for name in ("sharpness.png", "spectrum.png") if (Path(config.out) / name).is_file()]
    print(f"wrote {Path(config.out) / 'report.html'} (and "
          + ", ".join(["metrics.json", "per_image.csv", "comparison.png", *plots]) + ")")
    return 0


def print_summary(summary):
    """A short table on stdout."""
    print(f"{summary['data']['images']} images ({summary['protocol']['resolution']}; {summary['protocol']['latents']})")
    print(f"{'model':<28} {'PSNR':>7} {'SSIM':>7} {'MS-SSIM':>7} {'LPIPS-V':>7} {'LPIPS-A':>7} {'rFID':>8}")
    for model in summary["models"]:
        mean = model["mean"]
        cells = [fmt(mean["psnr"], 2), fmt(mean["ssim"], 4), fmt(mean["ms_ssim"], 4),
                 fmt(mean["lpips_vgg"], 4), fmt(mean["lpips_alex"], 4), fmt(model["rfid"], 2)]
        print(f"{model['label'][:28]:<28} " + " ".join(f"{c:>7}" for c in cells))
    for model in summary["models"]:
        if model.get("diffusability"):
            print(f"diffusability: {model['label']}: {model['diffusability']['verdict']}")
    for model in summary["models"]:
        c = model.get("latent_compatibility")
        if c:
            print(f"latent compatibility with {c['teacher']}: {model['label']}: decoding its latents PSNR "
                  f"{fmt(c['decode_psnr_vs_teacher'], 2)} dB vs its decode, {fmt(c['decode_psnr_vs_image'], 2)} dB vs "
                  f"the image; own latents {fmt(c['latent_error'], 3)} of theirs (relative RMS)")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")


def fmt(value, digits):
    """A number for a table cell, `-` when missing."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def run_inspect(args):
    """Latent diagnostics, or per-layer fp16 safety with --precision."""
    from vaekit.eval.diagnostics import inspect_models, inspect_precision  # torch: only once the command runs

    config = config_from_args(InspectConfig, args)
    if config.precision:
        if len(config.vae) > 1:
            raise VaekitError("inspect --precision takes one --vae; run it once per model.")
        result = inspect_precision(config, progress=not args.quiet)
        print_precision(result)
        if config.out:
            print(f"wrote {Path(config.out) / 'precision.json'}")
        return 0
    results = inspect_models(config, progress=not args.quiet)
    for result in results:
        if len(results) > 1:
            print(f"== {result['label']}")
        print_inspection(result)
    if config.diffusability:
        print_diffusability(results)
    if config.out:
        if len(results) == 1:
            print(f"wrote {Path(config.out) / 'inspect.json'}, histograms.png"
                  + (" and spectrum.png" if config.diffusability else ""))
        else:
            print(f"wrote one folder per model in {config.out}"
                  + (" and diffusability.json, spectrum.png beside them" if config.diffusability else ""))
    return 0


def print_diffusability(results):
    """Each model's high-frequency share, equivariance PSNRs and verdict, side by side."""
    print(f"{'model':<28} {'HF latents':>10} {'HF images':>10} {'ratio':>6} {'recon dB':>9} {'x2 down dB':>11} "
          f"{'rot90 dB':>9}")
    for result in results:
        d = result["diffusability"]
        share, psnr = d["high_frequency_share"], d["equivariance_psnr"]
        cells = [fmt(share["latents"], 3), fmt(share["images"], 3), fmt(share["ratio"], 2),
                 fmt(psnr.get("reconstruction"), 2), fmt(psnr.get("downscale_x2"), 2), fmt(psnr.get("rotate_90"), 2)]
        widths = (10, 10, 6, 9, 11, 9)
        print(f"{result['label'][:28]:<28} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for result in results:
        prefix = f"{result['label']}: " if len(results) > 1 else ""
        print(f"verdict: {prefix}{result['diffusability']['verdict']}")


def print_inspection(result):
    """The diagnostics as a table on stdout."""
    c, h, w = result["latent_shape"]
    print(f"{result['images']} images, latents {c}x{h}x{w}; KL to N(0, I): {result['kl_per_element']:.4g} nats per "
          f"element, {result['kl_per_image']:.4g} per image; active units {result['active_units']}/{c}")
    print(f"{'ch':>3} {'KL':>9} {'mean':>9} {'std':>9} {'post.std':>9} {'activity':>10}  active")
    for row in result["channels"]:
        print(f"{row['channel']:>3} {row['kl']:>9.4f} {row['mean']:>9.4f} {row['std']:>9.4f} "
              f"{row['posterior_std']:>9.4f} {row['activity']:>10.4g}  {'yes' if row['active'] else 'NO'}")
    s, cur = result["suggested"], result["current"]
    print(f"normalisation: config scaling_factor {cur['scaling_factor']:g} shift_factor {cur['shift_factor']:g} "
          f"-> latents mean {cur['normalised_mean']:.3g} std {cur['normalised_std']:.3g}")
    print(f"suggested: scaling_factor {s['scaling_factor']:.5g} shift_factor {s['shift_factor']:.5g} "
          f"(1 / std and mean of z ~ q(z|x), as `vaekit stats` computes them)")
    for note in result["warnings"]:
        print(f"warning: {note}")


def print_precision(result, top=15):
    """The layers nearest the fp16 limit, then the verdict."""
    rows = sorted(result["layers"], key=lambda row: -row["max_abs"])
    shown = [r for r in rows if r["layer"] in result["overflow"] or r["layer"] in result["close"]] or rows[:top]
    print(f"{result['images']} images at {result['size']} px; largest |activation| per layer (fp32 run), "
          f"float16 limit {result['fp16_max']:.0f}:")
    print(f"{'max |act|':>12} {'of fp16':>8}  layer")
    for row in shown[: max(top, len(result["overflow"]))]:
        mark = "  OVERFLOW" if row["layer"] in result["overflow"] else ""
        print(f"{row['max_abs']:>12.4g} {row['fp16_fraction']:>8.2%}  {row['layer']}{mark}")
    print(result["verdict"])
