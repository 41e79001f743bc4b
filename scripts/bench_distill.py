"""Decode speed, size and peak memory of a teacher VAE and its two distillation students, side by side.

The students are built exactly as `vaekit train` builds them from the shipped configs, for this
teacher (vaekit.train.distill: the teacher's latent channels and normalisation):

  kl-half   configs/train/distill_kl_half.yaml: SD's VAE at half the widths
  tiny      configs/train/distill_tiny.yaml: diffusers' AutoencoderTiny (TAESD)

Each model decodes the same batch of latents of a --size px image (64 x 64 latents at f8 for 512 px),
as a diffusers pipeline does (`vae.decode(latents)`), with random weights (speed does not depend on
them). Times: --repeats rounds after --warmup, the models interleaved within each round (teacher,
kl-half, tiny, teacher, ...) so every model sees the same machine state; the median per model.
Peak memory: each model decodes once more in a fresh process of its own; on CPU the growth of the
process's peak RSS over its RSS before the decode (model and latents already loaded), on GPU
torch.cuda.max_memory_allocated over what was allocated before. Targets (the distillation issue's):
the tiny student at least 10x faster than an SD-sized teacher, kl-half at least 2x.

    python scripts/bench_distill.py --teacher preset:sd --json benchmarks/distill.json
"""

import argparse
import contextlib
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import (cpu_name, current_memory_mib, fmt, interleaved_times, log, markdown_table,  # noqa: E402
                      peak_memory_mib, reset_peak_memory, sync)
from vaekit.config import load_config  # noqa: E402
from vaekit.device import DTYPES  # noqa: E402
from vaekit.io import write_json, write_text  # noqa: E402
from vaekit.model.architecture import cast_vae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {"kl-half": ROOT / "configs" / "train" / "distill_kl_half.yaml",
            "tiny": ROOT / "configs" / "train" / "distill_tiny.yaml"}
TARGETS = {"tiny": 10.0, "kl-half": 2.0}  # decode speed-up over the teacher


def parse_args(argv=None):
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="preset:sd", help="the teacher: any model argument (default preset:sd)")
    parser.add_argument("--size", type=int, default=512, help="image side whose latents are decoded (default 512)")
    parser.add_argument("--batch", type=int, default=1, help="latents decoded at once (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="write the rows and the machine as JSON here")
    parser.add_argument("--out", help="write the markdown report here too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one model's peak memory
    return parser.parse_args(argv)


def student_arguments(teacher_spec, teacher):
    """{name: (model.source, overrides)} of each student as `vaekit train` builds it for this teacher."""
    from vaekit.model.load import load_vae
    from vaekit.train.config import TrainConfig
    from vaekit.train.distill import student_overrides

    arguments = {}
    for name, path in STUDENTS.items():
        model = load_config(TrainConfig, path, [f"distill.teacher={teacher_spec}"]).model
        with torch.device("meta"):  # only its config is read: no weights allocated
            student = load_vae(model.source, overrides=model.overrides)
        changes = student_overrides(student, teacher, model.overrides, model.source)
        arguments[name] = (model.source, {**model.overrides, **changes})
    return arguments


def build_models(teacher_spec, only=None):
    """{name: model} of the teacher and its students (or only the model `only`), fp32 on the CPU.

    Presets are seeded, so every process builds the same weights; a student is built only after the
    teacher it needs (loaded when it is not a preset) is released, so it does not count in its memory.
    """
    from vaekit.model.load import load_vae

    meta = only not in (None, "teacher") and teacher_spec.startswith("preset:")
    with torch.device("meta") if meta else contextlib.nullcontext():
        teacher = load_vae(teacher_spec, seed=0)
    arguments = student_arguments(teacher_spec, teacher)
    models = {"teacher": teacher} if only in (None, "teacher") else {}
    del teacher
    release_memory()
    for name, (source, overrides) in arguments.items():
        if only in (None, name):
            models[name] = load_vae(source, overrides=overrides, seed=0)
    return models


def release_memory():
    """Return freed memory to the system, so a later measurement of RSS growth starts from what is in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks otherwise, and RSS would not grow


def latents_for(models, args, device, dtype):
    """The batch every model decodes: the same normalised latents, in each model's own latent space."""
    from vaekit.model.architecture import downsample_factor, latent_channels
    from vaekit.model.normalization import denormalize_latents

    teacher = models["teacher"]
    side = args.size // downsample_factor(teacher)
    generator = torch.Generator().manual_seed(0)
    normalised = torch.randn(args.batch, latent_channels(teacher), side, side, generator=generator)
    return {name: denormalize_latents(vae, normalised).to(device, dtype) for name, vae in models.items()}


def decode_fn(vae, z):
    """One decode as a diffusers pipeline runs it."""
    def run():
        with torch.inference_mode():
            return vae.decode(z).sample
    return run


def run_worker(args):
    """Decode once with one model in this fresh process; print its peak memory growth (MiB) as JSON."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = cast_vae(build_models(args.teacher, only=args.worker)[args.worker], device, dtype).eval()
    from vaekit.model.architecture import downsample_factor, latent_channels
    from vaekit.model.normalization import denormalize_latents

    side = args.size // downsample_factor(vae)
    z = torch.randn(args.batch, latent_channels(vae), side, side, generator=torch.Generator().manual_seed(0))
    z = denormalize_latents(vae, z).to(device, dtype)
    decode_fn(vae, z[:, :, :8, :8])()  # one-time allocations on a small input do not count
    release_memory()
    sync(device)
    reset_peak_memory(device)
    before = current_memory_mib(device)
    decode_fn(vae, z)()
    sync(device)
    print(json.dumps({"peak_mib": peak_memory_mib(device) - before}))
    return 0


def measure_memory(args, name):
    """Peak memory growth of one decode by model `name`, measured in a process of its own."""
    command = [sys.executable, __file__, "--worker", name, "--teacher", args.teacher, "--size", str(args.size),
               "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    from vaekit.model.architecture import describe

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {name: cast_vae(vae, device, dtype).eval() for name, vae in build_models(args.teacher).items()}
    latents = latents_for(models, args, device, dtype)
    runs = {name: decode_fn(vae, latents[name]) for name, vae in models.items()}
    times, first = interleaved_times(runs, device, args.warmup, args.repeats)
    rows = []
    teacher_s = statistics.median(times["teacher"])
    for name, vae in models.items():
        seconds = statistics.median(times[name])
        info = describe(vae)
        log(f"peak memory of {name} ...")
        rows.append({"model": name, "class": info["class"], "parameters": info["parameters"]["total"],
                     "decoder_parameters": info["parameters"]["decoder"], "seconds": seconds,
                     "ms_per_image": 1000 * seconds / args.batch, "first_call_s": first[name],
                     "speedup": teacher_s / seconds, "target": TARGETS.get(name),
                     "peak_mib": measure_memory(args, name), "times": times[name]})
    machine = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d")}
    report = render(rows, args, machine)
    print(report)
    if args.json:
        write_json(Path(args.json), {"teacher": args.teacher, "size": args.size, "batch": args.batch,
                                     "dtype": args.dtype, "machine": machine, "rows": rows})
    if args.out:
        write_text(Path(args.out), report + "\n")
    return 0


def render(rows, args, machine):
    """The markdown report: what was measured, the table, the targets."""
    table = markdown_table(
        [("model", "l"), ("class", "l"), ("parameters (decoder)", "r"), (f"decode {args.size} px, ms / image", "r"),
         ("vs teacher", "r"), ("peak memory growth (MiB)", "r")],
        [[row["model"], row["class"], f"{row['parameters'] / 1e6:.2f}M ({row['decoder_parameters'] / 1e6:.2f}M)",
          f"{row['ms_per_image']:.0f}", f"{row['speedup']:.1f}x", fmt(row["peak_mib"], ".0f")] for row in rows])
    lines = [f"- teacher `{args.teacher}`; students from configs/train/distill_kl_half.yaml and distill_tiny.yaml; "
             f"decode of {args.batch} x {args.size} px latents ({args.dtype}, `vae.decode`), median of "
             f"{args.repeats} interleaved rounds after {args.warmup}",
             f"- {machine['device']}, {machine['threads']} threads, torch {machine['torch']}, {machine['date']}",
             "", table, ""]
    for row in rows:
        if row["target"] is not None:
            verdict = "met" if row["speedup"] >= row["target"] else "NOT met"
            lines.append(f"- {row['model']}: {row['speedup']:.1f}x the teacher's decode speed (target "
                         f">= {row['target']:g}x): {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
