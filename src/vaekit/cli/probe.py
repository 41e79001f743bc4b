"""`vaekit probe`: how easily a diffusion model learns each VAE's latent space, by training a small one on each."""

from pathlib import Path

from vaekit.cli.args import add_command, add_config_argument, add_model_arguments, config_from_args, flag
from vaekit.eval.config import ProbeConfig


def register(subparsers):
    """Add probe."""
    p = add_command(
        subparsers, "probe", "train the same small denoiser on each VAE's latents; compare the losses",
        "Encode the same images with each --vae (or read their latents from --cache), train the same small "
        "denoiser with the same budget and seed on each, and write the held-out loss curve and the final loss per "
        "noise level side by side: probe.json and probe.png in --out. Lower loss: a latent space a diffusion model "
        "learns more easily. Flags override keys of an optional --config YAML.",
    )
    add_config_argument(p, "ProbeConfig")
    add_model_arguments(p, name="vae", positional=False, repeatable=True, help_text="a model whose latents to probe")
    p.add_argument("--label", action="append", help="display name for each model, in order (repeatable)")
    p.add_argument("--cache", action="append", metavar="DIR",
                   help="a latent cache (`vaekit encode`) per --vae, in order, instead of encoding --data (repeatable)")
    p.add_argument("--data", help="images to encode: folder, Hugging Face data set, WebDataset shards or builtin:photos")
    p.add_argument("--out", help="output folder (latents encoded here are reused by the next run)")
    p.add_argument("--limit", type=int, help="images to use (default 512)")
    p.add_argument("--size", type=int, help="short side + centre crop of encoded images in px (default 128)")
    p.add_argument("--holdout", type=int, help="images held out for the final loss (default 64)")
    p.add_argument("--steps", type=int, help="denoiser training steps per model (default 400)")
    p.add_argument("--batch_size", type=int, help="latents per step (default 16)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--width", type=int, help="denoiser channels, a multiple of 8 (default 32)")
    p.add_argument("--blocks", type=int, help="denoiser residual blocks (default 4)")
    p.add_argument("--noise_levels", type=int, help="noise levels of the final loss (default 8)")
    p.add_argument("--eval_every", type=int, help="steps between points of the held-out curve (default 50)")
    flag(p, "sample", "train on posterior samples z ~ q(z|x) (default) rather than the means")
    p.add_argument("--seed", type=int, help="seed of the denoiser, its batches and noise (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_probe)


def run_probe(args):
    """Probe the models and print the comparison."""
    from vaekit.eval.probe import probe  # torch and diffusers: only once the command runs

    config = config_from_args(ProbeConfig, args)
    result = probe(config, progress=not args.quiet)
    print_probe(result)
    print(f"wrote {Path(config.out) / 'probe.json'} and probe.png")
    return 0


def print_probe(result):
    """The final held-out loss per model and noise level, easiest first."""
    data = result["data"]
    print(f"{data['images']} images ({data['train']} to train on, {data['held_out']} held out); "
          f"{result['config']['steps']} steps of {result['config']['batch_size']} per model")
    times = result["models"][0]["final"]["t"]
    print(f"{'model':<28} {'latents':>10} {'final':>8} {'vs noise':>8}  " + " ".join(f"t={t:<5.3g}" for t in times))
    by_label = {m["label"]: m for m in result["models"]}
    for label in result["ranking"]:
        m = by_label[label]
        shape = "x".join(str(v) for v in m["latent_shape"])
        print(f"{label[:28]:<28} {shape:>10} {m['final']['mean']:>8.4f} {m['final']['relative_mean']:>8.3f}  "
              + " ".join(f"{v:<7.4f}" for v in m["final"]["loss"]))
    print(result["verdict"])
