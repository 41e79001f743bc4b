"""Model subcommands: info, export, convert."""

import json
from pathlib import Path

import torch

from vaekit.config import DTYPES, parse_override
from vaekit.errors import VaekitError


def parse_model_overrides(items):
    """`-o key=value` strings as a dict of AutoencoderKL config overrides."""
    overrides = {}
    for text in items or ():
        path, value = parse_override(text)
        if len(path) != 1:
            raise VaekitError(f"Model override '{text}' must name a top-level config key, like scaling_factor=0.13.")
        overrides[path[0]] = value
    return overrides


def add_model_arguments(parser, name="model", positional=True, help_text="model argument", required=True):
    """Add the model argument and its `-o/--override key=value` option to a parser."""
    text = f"{help_text}: preset:NAME, a diffusers folder, a single-file checkpoint, a training checkpoint or a hub id"
    if positional:
        parser.add_argument(name, help=text)
    else:
        parser.add_argument(f"--{name}", required=required, help=text)
    parser.add_argument(
        "-o", "--override", action="append", default=[], metavar="KEY=VALUE",
        help="override an AutoencoderKL config field, e.g. -o scaling_factor=0.13025 (repeatable)",
    )
    parser.add_argument(
        "--weights", choices=["ema", "raw"], default="ema",
        help="for a training checkpoint: the EMA or the raw weights (default: ema)",
    )


def load_model_from_args(args, name="model", **kwargs):
    """Load the model named by `add_model_arguments` options."""
    from vaekit.model import load_vae

    return load_vae(getattr(args, name), parse_model_overrides(args.override), weights=args.weights, **kwargs)


def run_info(args):
    """Print architecture, parameter counts, downsampling and latent normalisation."""
    from vaekit.model import describe

    info = describe(load_model_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["parameters"]
    print(f"AutoencoderKL  {args.model}")
    print(f"  downsampling     {info['downsample_factor']}x  (latent = image / {info['downsample_factor']} per side)")
    print(f"  latent channels  {info['latent_channels']}")
    print(f"  widths           {info['block_out_channels']}  x{info['layers_per_block']} layers, "
          f"{info['norm_num_groups']} groups, mid attention {'on' if info['mid_block_attention'] else 'off'}")
    print(f"  quant convs      {'yes' if info['quant_conv'] else 'no'}")
    print(f"  scaling factor   {info['scaling_factor']}")
    print(f"  shift factor     {info['shift_factor']}")
    print(f"  parameters       encoder {params['encoder']:,}  decoder {params['decoder']:,}  total {params['total']:,}")
    return 0


def write_model(vae, out, fmt, dtype=None):
    """Write `vae` as a diffusers folder or one original-layout .safetensors; returns the path."""
    from vaekit.convert import save_single_file
    from vaekit.model import save_diffusers

    out = Path(out)
    if fmt == "diffusers":
        if out.suffix == ".safetensors":
            raise VaekitError(f"--out {out} names a file; the diffusers format is a folder. Pass a folder path.")
        return save_diffusers(vae, out, dtype=dtype)
    path = out if out.suffix == ".safetensors" else out / "vae.safetensors"
    return save_single_file(vae, path, dtype=dtype)


def run_export(args):
    """Export any model argument as diffusers or single-file safetensors."""
    vae = load_model_from_args(args, name="src")
    path = write_model(vae, args.out, args.format, DTYPES[args.dtype])
    print(f"wrote {args.format} ({args.dtype}) to {path}")
    return 0


def source_dtype(spec):
    """The floating dtype the weights of a file or diffusers folder are stored in (fp32 otherwise)."""
    from safetensors import safe_open

    path = Path(spec)
    if path.is_dir() and (path / "diffusion_pytorch_model.safetensors").is_file():
        path = path / "diffusion_pytorch_model.safetensors"
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_slice(key)
                dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(tensor.get_dtype())
                return dtype or torch.float32
    return torch.float32


def run_convert(args):
    """Convert between the diffusers and the original single-file layout, keeping the stored dtype."""
    vae = load_model_from_args(args, name="src")
    dtype = source_dtype(args.src)
    path = write_model(vae, args.out, args.to, dtype)
    print(f"converted {args.src} to {args.to} at {path}")
    return 0


def add_commands(subparsers):
    """Register info, export and convert."""
    p = subparsers.add_parser("info", help="describe a VAE: architecture, parameters, latent normalisation")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_info)

    p = subparsers.add_parser("export", help="write a VAE as a diffusers folder or a single-file safetensors")
    add_model_arguments(p, name="src", help_text="what to export")
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors path (single-file)")
    p.add_argument("--format", choices=["diffusers", "single-file"], default="diffusers")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the stored weights")
    p.set_defaults(func=run_export)

    p = subparsers.add_parser("convert", help="convert between diffusers and original single-file layouts")
    add_model_arguments(p, name="src", help_text="what to convert")
    p.add_argument("--to", choices=["diffusers", "single-file"], required=True)
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors path (single-file)")
    p.set_defaults(func=run_convert)
