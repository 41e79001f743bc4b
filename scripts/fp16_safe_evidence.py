"""Before/after evidence for the fp16-safe fine-tune (`configs/train/ft_fp16_safe.yaml`), as a markdown table.

Makes fp16-unsafe VAEs out of safe ones and runs the real command on each:

- a trained tiny VAE (the `make demo` recipe run here for --train_steps steps on --data, or --vae) with
  every residual stream scaled exactly by 2e4: the same fp32 function, non-finite in fp16;
- the same with only the decoder's streams scaled: the latents must stay bit-identical;
- the same with a decoder resnet's norm2 scaled by 2e4 and its conv2 by 1/2e4: no exact rescaling
  undoes it; the shipped config's approximate chain rescaling does, and with it off
  (fp16.approximate=false) the fine-tune alone must;
- the same inside an encoder resnet: the encoder trains, its latents held to the stated tolerance;
- an SD-architecture VAE (preset:sd, random weights: no trained one is available offline) with its
  streams scaled by 2e4, at --sd_size px.

    python scripts/fp16_safe_evidence.py --data ../shared/data/photos/train --out /tmp/fp16-evidence
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train" / "ft_fp16_safe.yaml"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="image folder: training images and the held-out probe images")
    p.add_argument("--out", required=True, help="work folder (models, runs)")
    p.add_argument("--vae", help="a trained VAE to start from (default: train preset:tiny here)")
    p.add_argument("--train_steps", type=int, default=600, help="steps of the base VAE (the demo recipe)")
    p.add_argument("--size", type=int, default=64, help="crop size of the fine-tunes")
    p.add_argument("--probe", type=int, default=8, help="held-out probe images")
    p.add_argument("--steps", type=int, default=2000,
                   help="train.steps of each fine-tune (the shipped config's; they stop when done)")
    p.add_argument("--sd_size", type=int, default=64, help="crop size of the SD-architecture case (0: skip it)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p.parse_args()


def train_base(data, out, steps, threads):
    """The `make demo` recipe (preset:tiny, 64 px crops, L1 + LPIPS) for `steps` steps: a trained, fp16-safe VAE."""
    command = [sys.executable, "-m", "vaekit.cli", "train", "--config", str(ROOT / "configs" / "train" / "demo.yaml"),
               f"data.path={data}", f"out_dir={out}", f"train.steps={steps}", "log.progress=false", "log.tracker=none",
               "validation.every=0"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise SystemExit(f"training the base VAE failed:\n{done.stderr[-3000:]}")
    return Path(out) / "vae"


def scaled_streams(source, out, parts, factor=2e4):
    from vaekit.model import load_vae, save_diffusers
    from vaekit.model.rescale import apply_rescale, gauge_names, scaled_plan

    vae = load_vae(source) if not str(source).startswith("preset:") else load_vae(source, seed=0)
    apply_rescale(vae, scaled_plan(vae, {g: factor for g in gauge_names(vae, parts, kind="stream")}, parts))
    save_diffusers(vae, out)
    return out


def nonexact(source, out, factor=2e4, resnet="decoder.up_blocks.3.resnets.0"):
    from vaekit.model import load_vae, save_diffusers

    vae = load_vae(source)
    block = vae.get_submodule(resnet)
    with torch.no_grad():
        block.norm2.weight.mul_(factor)
        block.norm2.bias.mul_(factor)
        block.conv2.weight.div_(factor)
    save_diffusers(vae, out)
    return out


def fix(model, data, out, size, probe, steps, threads, *extra):
    """Run the shipped config on `model`; returns (report, seconds)."""
    command = [sys.executable, "-m", "vaekit.cli", "train", "--config", str(CONFIG), f"model.source={model}",
               f"data.path={data}", f"out_dir={out}", f"data.size={size}", f"data.holdout={probe}",
               f"fp16.probe_images={probe}", "data.num_workers=0", "log.progress=false", "log.tracker=none",
               "validation.every=0", "validation.lpips_net=alex", f"train.steps={steps}", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{model}: vaekit train failed:\n{done.stderr[-3000:]}")
    return json.loads((Path(out) / "fp16_safe.json").read_text()), seconds


def db(value):
    return "non-finite" if value is None else ("exact" if value == float("inf") else f"{value:.1f}")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(args.vae) if args.vae else train_base(args.data, out / "base", args.train_steps, args.threads)
    alone = ("fp16.approximate=false",)  # the fine-tune alone, as before the chain rescaling
    decoder_hot = nonexact(source, out / "nonexact")
    encoder_hot = nonexact(source, out / "nonexact-encoder", resnet="encoder.down_blocks.1.resnets.0")
    cases = [
        ("tiny, trained", "all residual streams x 2e4 (exact)",
         scaled_streams(source, out / "streams", ("encoder", "decoder")), args.size, (), "run-streams"),
        ("tiny, trained", "decoder streams x 2e4 (exact)", scaled_streams(source, out / "decoder", ("decoder",)),
         args.size, (), "run-decoder"),
        ("tiny, trained", "a decoder resnet's norm2 x 2e4, conv2 / 2e4 (not exact)", decoder_hot, args.size, (),
         "run-nonexact"),
        ("tiny, trained", "the same, fp16.approximate=false", decoder_hot, args.size, alone, "run-nonexact-alone"),
        ("tiny, trained", "an encoder resnet's norm2 x 2e4, conv2 / 2e4 (not exact)", encoder_hot, args.size, (),
         "run-encoder"),
        ("tiny, trained", "the same, fp16.approximate=false", encoder_hot, args.size, alone, "run-encoder-alone"),
    ]
    if args.sd_size:
        cases.append(("SD architecture, random weights", "all residual streams x 2e4 (exact)",
                      scaled_streams("preset:sd", out / "sd", ("encoder", "decoder")), args.sd_size,
                      ("train.batch_size=1", "validation.batch_size=1"), "run-sd"))
    print("| model | made unsafe by | rescaled (exact / approximate) | parts | steps: headroom / exported / run | "
          "largest activation (of 65504) before -> after | fp16 decode PSNR (dB) before -> after | "
          "fp32 decode PSNR (dB) | latents (fp32) | time (s) |")
    print("|---|---|---|---|---|---|---|---:|---|---:|")
    for name, how, model, size, extra, run in cases:
        report, seconds = fix(model, args.data, out / run, size, args.probe, args.steps, args.threads, *extra)
        before, after, rescale = report["before"], report["after"], report["rescale"]
        latents = "bit-identical" if after["latents_bit_identical"] else f"SNR {db(after['latent_snr_db_fp32'])} dB"
        rescaled = f"{len(rescale['gauges'])} / {len(rescale['chains'])}"
        steps = f"{report['headroom_step']} / {report['exported_step']} / {report['steps']}"
        print(f"| {name} | {how} | {rescaled} | {report['parts']} | {steps} | "
              f"{before['largest']['fp16_fraction']:.0%} -> {after['largest']['fp16_fraction']:.1%} | "
              f"{db(before['decode_psnr_fp16'])} -> {db(after['decode_psnr_fp16'])} | {db(after['decode_psnr_fp32'])} | "
              f"{latents} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
