"""`vaekit info`, `vaekit export`, `vaekit convert`: describing and writing models."""

import json

from vaekit.cli.args import add_command, add_model_arguments, load_model_from_args
from vaekit.config import DTYPE_NAMES

# The TAESD file-name prefixes ComfyUI knows (vaekit.model.tiny.TAESD_FAMILIES), here without loading torch.
TAESD_FAMILIES = ("taesd", "taesdxl", "taesd3", "taef1")


def register(subparsers):
    """Add info, export and convert."""
    p = add_command(subparsers, "info", "describe a VAE: architecture, parameters, latent normalisation")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_info)

    p = add_command(subparsers, "export", "write a VAE as a diffusers folder or a single-file safetensors",
                    "Write any model argument as a diffusers folder (what AutoencoderKL.from_pretrained reads), "
                    "one original-layout .safetensors (what single-file tools read) or, for an AutoencoderTiny, "
                    "TAESD's encoder/decoder pair (what ComfyUI reads from models/vae_approx), atomically.")
    add_model_arguments(p, name="src", help_text="what to export")
    p.add_argument("--out", required=True, help="output folder (diffusers, taesd) or .safetensors path (single-file)")
    p.add_argument("--format", choices=["diffusers", "single-file", "taesd"], default="diffusers",
                   help="diffusers folder (default), original-layout single file, or a TAESD pair (AutoencoderTiny)")
    p.add_argument("--taesd_name", choices=sorted(TAESD_FAMILIES), default="taesd",
                   help="--format taesd: the file-name prefix, which tells ComfyUI the teacher's latent "
                        "normalisation (taesd: SD 1.x/2.x, taesdxl: SDXL, taesd3: SD3, taef1: FLUX; default taesd)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="dtype of the stored weights (default fp32)")
    p.set_defaults(func=run_export)

    p = add_command(subparsers, "convert", "convert between diffusers and original single-file layouts",
                    "Convert a VAE between the diffusers and the original latent-diffusion layout with one mapping "
                    "table, keeping the dtype the weights are stored in.")
    add_model_arguments(p, name="src", help_text="what to convert")
    p.add_argument("--to", choices=["diffusers", "single-file", "taesd"], required=True,
                   help="the layout to write (taesd: an AutoencoderTiny's encoder/decoder pair, named taesd_*)")
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors path (single-file)")
    p.set_defaults(func=run_convert)


def run_info(args):
    """Print architecture, parameter counts, downsampling and latent normalisation."""
    from vaekit.model.architecture import describe  # torch and diffusers: only once the command runs

    info = describe(load_model_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["parameters"]
    if info["class"] == "AutoencoderTiny":
        print(f"AutoencoderTiny (TAESD)  {args.model}")
        print(f"  downsampling     {info['downsample_factor']}x  (latent = image / {info['downsample_factor']} per side)")
        print(f"  latent channels  {info['latent_channels']}  (normalised latents: no posterior variance)")
        print(f"  encoder          widths {info['encoder_block_out_channels']}  blocks {info['num_encoder_blocks']}")
        print(f"  decoder          widths {info['decoder_block_out_channels']}  blocks {info['num_decoder_blocks']}")
        print(f"  scaling factor   {info['scaling_factor']}")
        print(f"  shift factor     {info['shift_factor']}")
        print(f"  parameters       encoder {params['encoder']:,}  decoder {params['decoder']:,}  total {params['total']:,}")
        return 0
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


def run_export(args):
    """Export any model argument as diffusers or single-file safetensors."""
    from vaekit.device import DTYPES  # torch: only once the command runs
    from vaekit.model.load import write_model

    path = write_model(load_model_from_args(args, name="src"), args.out, args.format, DTYPES[args.dtype],
                       taesd_name=args.taesd_name, source=args.src)
    print(f"wrote {args.format} ({args.dtype}) to {path}")
    return 0


def run_convert(args):
    """Convert between the diffusers and the original single-file layout, keeping the stored dtype."""
    from vaekit.model.load import source_dtype, write_model  # torch and diffusers: only once the command runs

    path = write_model(load_model_from_args(args, name="src"), args.out, args.to, source_dtype(args.src),
                       source=args.src)
    print(f"converted {args.src} to {args.to} at {path}")
    return 0
