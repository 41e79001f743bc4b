"""Distillation end to end on a CPU: a teacher trained here, its kl-half and tiny students, scored beside it.

1. teacher: `vaekit train` with the demo recipe (preset:tiny, f8, 4 channels) on --train, then its
   latent normalisation measured (`vaekit stats`) and written into its config (`vaekit export -o`),
   so its normalised latents have unit variance as a tiny student's decoder needs;
2. a latent cache of the teacher over --train (`vaekit encode`, fp32);
3. kl-half student: configs/train/distill_kl_half.yaml with the teacher's architecture at half the
   widths (the shipped config halves SD's), trained from the cache: the teacher's encoder never runs;
4. tiny student: configs/train/distill_tiny.yaml (TAESD's architecture), trained with the teacher
   encoding each batch;
5. `vaekit evaluate --teacher` on --eval: the teacher, both students and both students as they
   started (the weights `vaekit train` builds before its first step), with latent compatibility;
6. decode speed: 512 px latents, the models interleaved, median of rounds (scripts/benchlib.py);
7. a diffusers pipeline (StableDiffusionImg2ImgPipeline with a randomly initialised tiny UNet, as no
   hub is reachable) makes latents with the teacher; each student, loaded with diffusers'
   from_pretrained and swapped in with vaekit.model.replace_vae, decodes them through the pipeline's
   own decode step and runs the whole pipeline.

    python scripts/distill_evidence.py --steps 300 --teacher_steps 600     # about 20 minutes on 2 cores
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import cpu_name, fmt, interleaved_times, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "photos"
CONFIGS = ROOT / "configs" / "train"


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", default=str(SHARED / "train"), help="training image folder")
    parser.add_argument("--eval", default=str(SHARED / "eval"), help="evaluation image folder")
    parser.add_argument("--out", default=str(ROOT / "runs" / "distill_evidence"), help="everything goes here")
    parser.add_argument("--teacher_steps", type=int, default=600, help="steps of the teacher (the demo recipe)")
    parser.add_argument("--steps", type=int, default=300, help="steps of each student")
    parser.add_argument("--size", type=int, default=64, help="training crop side in pixels")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=256, help="evaluation: short side resized, centre crop")
    parser.add_argument("--cache_resolution", type=int, default=256, help="the teacher's cache: image side")
    return parser.parse_args(argv)


def vaekit(*argv):
    """Run a vaekit command in a fresh process (as a user would), failing loudly."""
    command = [sys.executable, "-m", "vaekit.cli", *map(str, argv)]
    print("$ vaekit " + " ".join(map(str, argv)), flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout


def student_run(config, out, teacher, args, *extra):
    """`vaekit train` of one student config, CPU-sized; returns (seconds, run folder)."""
    seconds, _ = vaekit("train", "--config", config, f"out_dir={out}", f"distill.teacher={teacher}",
                        f"data.path={args.train}", f"data.size={args.size}", "data.holdout=2", "data.num_workers=1",
                        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.mixed_precision=no",
                        f"train.checkpoint_every={args.steps}", "optim.lr=1e-3", "optim.scheduler=cosine",
                        "optim.warmup_steps=20", "loss.perceptual_weight=0.1", "loss.perceptual_net=alex",
                        "disc.weight=0", "ema.warmup=true", "validation.every=0", "validation.lpips_net=alex",
                        "validation.size=256", "log.tracker=none", "log.progress=false", *extra)
    return seconds, out


def initial_student(config, teacher, out, *extra):
    """The student exactly as `vaekit train` builds it before its first step, saved as a diffusers folder."""
    from vaekit.config import load_config
    from vaekit.model import save_diffusers
    from vaekit.train.config import TrainConfig
    from vaekit.train.loop import build_vae
    from vaekit.train.teacher import load_teacher

    cfg = load_config(TrainConfig, config, [f"distill.teacher={teacher}", *extra])
    save_diffusers(build_vae(cfg, None, load_teacher(teacher, "cpu")), out)
    return out


def decode_speed(models, size):
    """{label: median seconds} of decoding one size x size image's latents, the models interleaved."""
    from vaekit.model.architecture import downsample_factor, latent_channels
    from vaekit.model.normalization import denormalize_latents

    runs = {}
    for label, vae in models.items():
        side = size // downsample_factor(vae)
        z = denormalize_latents(vae, torch.randn(1, latent_channels(vae), side, side,
                                                 generator=torch.Generator().manual_seed(0)))
        runs[label] = (lambda v, z: lambda: v.decode(z).sample)(vae, z)
    with torch.inference_mode():
        times, _ = interleaved_times(runs, torch.device("cpu"), warmup=1, repeats=5)
    return {label: statistics.median(t) for label, t in times.items()}


def pipeline_demo(teacher_dir, students, photos, out):
    """Teacher-made pipeline latents decoded by each student through the pipeline; the whole pipeline with each."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    from vaekit.data.crops import resize_center_crop, to_pil, to_tensor
    from vaekit.data.decode import decode_image
    from vaekit.eval import metrics
    from vaekit.eval.report import save_png
    from vaekit.model import replace_vae
    from vaekit.errors import VaekitError
    from vaekit.model.pipeline import latent_space_error

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # random weights: no trained denoiser is reachable here
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    from diffusers import AutoencoderKL

    teacher = AutoencoderKL.from_pretrained(teacher_dir)
    pipe = StableDiffusionImg2ImgPipeline(vae=teacher, text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                          image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = torch.stack([to_tensor(resize_center_crop(decode_image(p), 256)[0]) for p in photos])
    embeds = torch.randn(len(photos), 7, 32, generator=torch.Generator().manual_seed(0))
    call = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), image=(images + 1) / 2,
                strength=0.3, num_inference_steps=10, guidance_scale=2.0)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    reference = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images * 2 - 1

    def pipeline_decode():  # the decode step of StableDiffusion(Img2Img)Pipeline, with the pipeline's VAE
        vae = pipe.vae
        with torch.no_grad():
            decoded = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
        return pipe.image_processor.postprocess(decoded, output_type="pt") * 2 - 1

    rows, strips = {}, [images, reference]
    for label, (cls, folder) in students.items():
        student = cls.from_pretrained(folder)  # diffusers loads the export itself
        error = latent_space_error(teacher, student)
        try:
            replace_vae(pipe, student)  # measures that it shares the pipeline VAE's latent space
            accepted = True
        except VaekitError as e:  # refused: say so, and run the demonstration anyway
            print(f"replace_vae refused {label}: {e}", flush=True)
            replace_vae(pipe, student, check_latent_space=False)
            accepted = False
        decoded = pipeline_decode()
        whole = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(0)).images * 2 - 1
        rows[label] = {"decode_psnr_vs_teacher_pipeline": float(metrics.psnr(reference, decoded).mean()),
                       "pipeline_psnr_vs_teacher_pipeline": float(metrics.psnr(reference, whole).mean()),
                       "class": type(pipe.vae).__name__, "latent_space_error": error, "accepted": accepted}
        strips.append(decoded)
        replace_vae(pipe, teacher, check_latent_space=False)
    grid = torch.cat([torch.cat(list(s), dim=-1) for s in strips], dim=-2)  # rows: photos, teacher, students
    save_png(to_pil(grid), out / "pipeline.png")
    return rows


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds = {}

    # 1. The teacher, then its normalisation.
    seconds["teacher"], _ = vaekit("train", "--config", CONFIGS / "demo.yaml", f"out_dir={out / 'teacher_run'}",
                                   f"data.path={args.train}", f"train.steps={args.teacher_steps}",
                                   f"train.checkpoint_every={args.teacher_steps}", "validation.every=0",
                                   "log.tracker=none", "log.progress=false", "--resume", "latest")
    _, text = vaekit("stats", "--vae", out / "teacher_run" / "vae", "--data", args.train, "--resolution",
                     args.cache_resolution, "--num_workers", "1", "--json")
    suggested = json.loads(text)["suggested"]
    teacher = out / "teacher"
    vaekit("export", out / "teacher_run" / "vae", "--out", teacher,
           "-o", f"scaling_factor={suggested['scaling_factor']}", "-o", f"shift_factor={suggested['shift_factor']}")

    # 2-4. The cache and the two students.
    cache = out / "cache"
    vaekit("encode", "--vae", teacher, "--data", args.train, "--out", cache, "--resolution", args.cache_resolution,
           "--dtype", "fp32", "--compute_dtype", "fp32", "--num_workers", "1", "--overwrite")
    half = ["model.source=preset:tiny", "model.overrides={block_out_channels: [16, 16, 32, 32], norm_num_groups: 8}"]
    seconds["kl-half"], kl_run = student_run(CONFIGS / "distill_kl_half.yaml", out / "kl_half", teacher, args,
                                             f"distill.cache={cache}", *half)
    seconds["tiny"], tiny_run = student_run(CONFIGS / "distill_tiny.yaml", out / "tiny", teacher, args,
                                            "data.crop=random")
    init_kl = initial_student(CONFIGS / "distill_kl_half.yaml", teacher, out / "init_kl_half", *half)
    init_tiny = initial_student(CONFIGS / "distill_tiny.yaml", teacher, out / "init_tiny")

    # 5. Quality and latent compatibility.
    from vaekit.eval.config import EvaluateConfig
    from vaekit.eval.evaluate import evaluate

    labels = ["teacher", "kl-half", "tiny", "kl-half at step 0", "tiny at step 0"]
    specs = [teacher, kl_run / "vae", tiny_run / "vae", init_kl, init_tiny]
    summary = evaluate(EvaluateConfig(vae=[str(s) for s in specs], label=labels, data=args.eval,
                                      out=str(out / "evaluation"), resolution=args.resolution, rfid=False,
                                      teacher="teacher"), progress=False)
    models = {m["label"]: m for m in summary["models"]}

    # 6. Decode speed; the teacher's posterior width (docs/training.md's reason for the encoder loss).
    from vaekit.model import load_vae

    loaded = {label: load_vae(spec) for label, spec in zip(labels[:3], specs[:3])}
    speed = decode_speed(loaded, 512)
    from vaekit.codec.inference import encode
    from vaekit.data.crops import resize_center_crop, to_tensor
    from vaekit.data.decode import decode_image
    from vaekit.model.normalization import normalize_latents

    photos = sorted(p for p in Path(args.eval).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    x = torch.stack([to_tensor(resize_center_crop(decode_image(p), 256)[0]) for p in photos])
    mean, logvar = encode(loaded["teacher"], x)
    sigma_ratio = float((0.5 * logvar).exp().mean() * loaded["teacher"].config.scaling_factor
                        / normalize_latents(loaded["teacher"], mean).std())

    # 7. The pipeline.
    from diffusers import AutoencoderKL, AutoencoderTiny

    pipeline = pipeline_demo(teacher, {"kl-half": (AutoencoderKL, kl_run / "vae"),
                                       "tiny": (AutoencoderTiny, tiny_run / "vae")}, photos[:4], out)

    result = {"args": vars(args), "seconds": seconds, "decode_seconds_512": speed, "sigma_ratio": sigma_ratio,
              "pipeline": pipeline, "models": {label: {k: models[label].get(k) for k in
                                                       ("mean", "architecture", "latent_compatibility",
                                                        "seconds_per_image")} for label in labels},
              "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "minutes": (time.perf_counter() - started) / 60}
    (out / "evidence.json").write_text(json.dumps(result, indent=2))
    print(render(result, labels, models, speed, pipeline))
    return 0


def render(result, labels, models, speed, pipeline):
    """The README's tables."""
    teacher_psnr = models["kl-half"]["latent_compatibility"]["teacher_psnr_vs_image"]
    rows = []
    for label in labels:
        m, c = models[label], models[label].get("latent_compatibility") or {}
        is_teacher = label == "teacher"
        rows.append([label, f"{m['architecture']['parameters']['total'] / 1e6:.2f}M", f"{m['mean']['psnr']:.2f}",
                     fmt(m["mean"]["lpips_vgg"], ".4f"),
                     fmt(teacher_psnr if is_teacher else c.get("decode_psnr_vs_image"), ".2f"),
                     "–" if is_teacher else fmt(c.get("decode_psnr_vs_teacher"), ".2f"),
                     "–" if is_teacher else fmt(c.get("latent_error"), ".3f"),
                     fmt(1000 * speed[label], ".0f") if label in speed else "–",
                     f"{speed['teacher'] / speed[label]:.1f}x" if label in speed else "–"])
    quality = markdown_table(
        [("model", "l"), ("parameters", "r"), ("PSNR (dB)", "r"), ("LPIPS-VGG", "r"),
         ("teacher latents: PSNR vs image (dB)", "r"), ("teacher latents: PSNR vs teacher decode (dB)", "r"),
         ("own latents vs teacher's (relative RMS)", "r"), ("decode 512 px (ms)", "r"), ("vs teacher", "r")], rows)
    demo = markdown_table(
        [("student", "l"), ("class (from_pretrained)", "l"), ("latent-space check (relative RMS)", "r"),
         ("teacher pipeline's latents, decoded: PSNR vs its images (dB)", "r"),
         ("whole pipeline with the student: PSNR vs the teacher's (dB)", "r")],
        [[label, row["class"], f"{row['latent_space_error']:.3f} ({'accepted' if row['accepted'] else 'REFUSED'})",
          f"{row['decode_psnr_vs_teacher_pipeline']:.2f}",
          f"{row['pipeline_psnr_vs_teacher_pipeline']:.2f}"] for label, row in pipeline.items()])
    return "\n".join([quality, "", demo, "",
                      f"teacher posterior std / normalised latent std: {result['sigma_ratio']:.3g}; "
                      f"train seconds: {result['seconds']}; {result['minutes']:.1f} minutes in all"])


if __name__ == "__main__":
    sys.exit(main())
