"""`vaekit train`: a training run from a YAML config and key=value overrides."""

import signal

from vaekit.cli.args import add_command


def register(subparsers):
    """Add train."""
    p = add_command(
        subparsers, "train", "train a VAE from scratch, fine-tune its decoder, or distil a smaller one from a teacher",
        "Train an AutoencoderKL from a YAML config, or with distill.teacher=MODEL a smaller AutoencoderKL or an "
        "AutoencoderTiny that keeps the teacher's latent space; key=value arguments override config keys "
        "(e.g. train.steps=200 data.path=photos/). The resolved config is saved in out_dir.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML config (see configs/train/); defaults apply to keys it leaves out")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the newest checkpoint in out_dir, or from a checkpoint folder")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=200")
    p.set_defaults(func=run_train)


def run_train(args):
    """Load the config, apply key=value overrides, train."""
    from vaekit.config import load_config
    from vaekit.train.config import TrainConfig
    from vaekit.train.loop import train  # torch, diffusers and accelerate: only once the command runs

    result = train(load_config(TrainConfig, args.config, args.overrides), resume=args.resume)
    if result.get("interrupted"):
        # The shell's convention for a process stopped by a signal (130 for Ctrl-C, 143 for SIGTERM), so
        # scripts and `make demo` can tell a stopped run from a finished one; the checkpoint is saved.
        return 128 + getattr(signal, result.get("signal") or "SIGINT", signal.SIGINT)
    return 0
