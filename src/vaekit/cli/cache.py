"""`vaekit encode` and `vaekit stats`: building latent caches and measuring latent statistics."""

import argparse
import json
import os
from pathlib import Path

from vaekit.cache.config import STORE_MODES, EncodeConfig
from vaekit.cli.args import add_command, add_config_argument, add_model_arguments, config_from_args, flag
from vaekit.codec.options import parse_bytes
from vaekit.config import DTYPE_NAMES
from vaekit.data.config import SMALL_IMAGE_POLICIES, SOURCE_KINDS
from vaekit.errors import VaekitError


def register(subparsers):
    """Add encode and stats."""
    d = EncodeConfig()
    p = add_command(
        subparsers, "encode", "encode an image data set into a sharded, resumable latent cache",
        "Encode images to VAE latents for diffusion training (see docs/encoding.md). Re-running the same command "
        "resumes and encodes only new or changed images; a cache made with another VAE, size policy or dtype is "
        "refused (or replaced with --overwrite). Runs under accelerate launch and torchrun.",
    )
    add_model_arguments(p, name="vae", positional=False, required=False, help_text="the VAE")
    p.add_argument("--data", help="image folder, Hugging Face data set, builtin:photos, or WebDataset shards: a "
                   "folder of .tar/.tar.gz, a brace pattern (shards-{000..099}.tar), a pipe: command or a URL")
    p.add_argument("--out", help="cache folder")
    add_pipeline_arguments(p)
    p.add_argument("--store", choices=STORE_MODES,
                   help="mean_logvar (default) keeps the posterior so a trainer can sample; mode keeps the mean")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=f"storage dtype (default {d.dtype})")
    p.add_argument("--shard_size", type=int, help=f"samples per part file of a unit (default {d.shard_size})")
    p.add_argument("--unit_size", type=int,
                   help=f"images per unit of work and resume for folders and data sets (default {d.unit_size}); "
                        "a WebDataset shard is always one unit")
    p.add_argument("--lock_timeout", type=float,
                   help=f"seconds without a heartbeat after which a unit lock held on another host is taken over "
                        f"(default {d.lock_timeout:g})")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace a cache whose key differs instead of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_encode)

    p = add_command(subparsers, "cache", "maintain latent caches (verify and repair, migrate from an older format)",
                    "Maintenance of latent caches made by `vaekit encode`.")
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True, help="verify, migrate")
    verify = add_command(
        sub, "verify", "hash every part of a cache and check its indices and catalog; --repair fixes what it finds",
        "Check a latent cache whole: every part hashed against the xxh3 recorded when it was written, every unit "
        "index against its parts, the catalog against the units, the card against the identity every index "
        "repeats. Lists damaged units and exits 1 when there are any. --repair moves damaged units (and leftovers "
        "of killed runs) into CACHE/quarantine/ with the reason, never deleting, restores a damaged card from the "
        "catalog's copy, and encodes the moved units again from their source (the options recorded in the card; "
        "--data overrides the source). Safe to interrupt and run again.")
    verify.add_argument("cache", help="the cache folder")
    verify.add_argument("--repair", action="store_true", help="move damaged units aside and encode them again")
    verify.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="parts hashed at once (threads; default: the CPU count, at most 8)")
    verify.add_argument("--data", help="with --repair: the source to encode from, when it moved since the cache "
                        "was made (or the cache does not record it)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.add_argument("--quiet", action="store_true", help="no progress bar")
    verify.set_defaults(func=run_verify)
    migrate = add_command(sub, "migrate", "convert a cache of format 1 to format 2 in place (no image is read)",
                          "Convert a format-1 latent cache (per-image JSON manifests) to format 2 (units with Arrow "
                          "indices). Latents are copied, not recomputed; safe to interrupt and run again.")
    migrate.add_argument("cache", help="the cache folder")
    migrate.set_defaults(func=run_migrate)

    p = add_command(
        subparsers, "stats", "latent mean/std per channel; suggests scaling_factor and shift_factor",
        "Per-channel and global mean and standard deviation of latents, from a cache made by `vaekit encode` or "
        "from --vae MODEL --data SRC, and the normalisation they imply (scaling_factor = 1/std, shift_factor = "
        "mean). --write DIR exports the VAE with it.",
    )
    p.add_argument("cache", nargs="?", help="a latent cache folder (or give --data)")
    add_model_arguments(p, name="vae", positional=False, required=False,
                        help_text="the VAE (with --data; with a cache, only for --write, default: the cache's)")
    p.add_argument("--data", help="images to encode on the fly instead of a cache")
    add_pipeline_arguments(p)
    p.add_argument("--of", choices=["auto", "posterior", "mean"], default="auto",
                   help="statistics of posterior samples (auto, when logvar is known) or of the means")
    p.add_argument("--write", metavar="DIR", help="export the VAE with the suggested normalisation as a diffusers folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_stats)


def add_pipeline_arguments(parser):
    """Data, size-policy and speed options shared by encode and `stats --data`; defaults are EncodeConfig's."""
    d = EncodeConfig()
    add = parser.add_argument
    add_config_argument(parser, "EncodeConfig")
    add("--source", choices=SOURCE_KINDS, help="kind of --data (default: detect)")
    add("--split", help="Hugging Face split (default: train, or the only one)")
    add("--image_column", help="Hugging Face column or WebDataset field with the image")
    add("--key_column", help="Hugging Face column with unique ids (default: split/index)")
    add("--limit", type=int, help="only the first N images of the source")
    add("--resolution", type=int,
        help=f"square side in pixels; with --buckets the bucket area is resolution^2 (default {d.resolution})")
    flag(parser, "buckets", "aspect-ratio buckets: each image goes to the bucket nearest its aspect ratio")
    add("--min_aspect", type=float, help=f"narrowest bucket, W/H (default {d.min_aspect})")
    add("--max_aspect", type=float, help=f"widest bucket, W/H (default {d.max_aspect})")
    add("--bucket_step", type=int, help=f"bucket sides are multiples of this (default {d.bucket_step})")
    add("--small_images", choices=SMALL_IMAGE_POLICIES,
        help="images smaller than their crop: resize up, skip and list, or pad (default upscale)")
    add("--min_size", type=int, help="skip and list images whose shorter side is below this (default 0)")
    add("--max_pixels", type=int, help=f"decompression-bomb limit in pixels (default {d.max_pixels})")
    add("--max_image_bytes", type=parse_size,
        help="per-image byte limit, checked from a file's size or a tar member's header before reading: larger "
             "files are skipped unread and listed, e.g. 512M (default 1G)")
    add("--read_timeout", type=float,
        help=f"seconds a shard may send no data before it is given up as unreadable (stalled) and left for a "
             f"re-run (default {d.read_timeout:g})")
    add("--background", type=int, nargs=3, metavar=("R", "G", "B"), help="colour behind transparency (default white)")
    flag(parser, "flip", "also store the latents of the mirrored image")
    add("--compute_dtype", choices=("auto", *DTYPE_NAMES),
        help="encoder precision (default auto: bf16 on GPUs and on CPUs with native bf16, AVX512-BF16 or AMX; "
             "fp16 on GPUs without bf16; fp32 otherwise)")
    add("--tile", help="tiled encoding for large images: off (default), auto or a tile size in pixels")
    add("--batch_size", type=int, help=f"images per model step (default {d.batch_size})")
    add("--num_workers", type=int, help=f"DataLoader processes decoding and resizing (default {d.num_workers})")
    flag(parser, "channels_last", "channels-last convolutions (default on)")
    flag(parser, "compile", "torch.compile the encoder (pays off on large data sets)")


def parse_size(text):
    """Bytes from '1073741824', '512M' or '1G' (an argparse type: a bad value is a usage error)."""
    try:
        return parse_bytes(text)
    except VaekitError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size: use bytes or a number with K, M or G") from None


def run_encode(args):
    """Encode a data set into a latent cache."""
    from vaekit.cache.encode import encode_dataset  # torch and diffusers: only once the command runs

    config = config_from_args(EncodeConfig, args)
    summary = encode_dataset(config, progress=not args.quiet)
    if summary is None:
        return 0
    out = Path(config.out)
    print(f"encoded {summary['encoded']} images in {summary['seconds']} s "
          f"({summary['images_per_second']} images/s, {summary['processes']} process(es)); "
          f"{summary['units_unchanged']} of {summary['units_in_source']} units already done, "
          f"{summary['errors']} images skipped with errors"
          + (f" (listed in {out / 'errors.jsonl'})" if summary["errors"] else ""))
    if summary["units_repaired"]:
        first = summary["repaired"][0]
        print(f"{summary['units_repaired']} unit(s) failed their checks and were encoded again (first: "
              f"{first['label']}: {first['reason']})")
    print(f"cache {out}: {summary['cache_images']} images in {summary['cache_units']} units")
    return 0


def run_migrate(args):
    """Convert a format-1 cache in place."""
    from vaekit.cache.migrate import migrate_cache  # torch: only once the command runs

    result = migrate_cache(args.cache)
    if result["already"]:
        print(f"{args.cache} is already in format 2 ({result['units']} units, {result['images']} images)")
    else:
        print(f"migrated {args.cache} to format 2: {result['images']} images ({result['samples']} latents) "
              f"in {result['units']} units")
    return 0


def run_verify(args):
    """Verify a cache; with --repair, fix what was found. Exit 1 while damage remains."""
    from vaekit.cache.verify import format_report, repair_cache, report_json, verify_cache  # torch: only now

    if args.jobs < 1:
        raise VaekitError(f"--jobs must be at least 1, got {args.jobs}.")
    report = verify_cache(args.cache, jobs=args.jobs, progress=not (args.quiet or args.json))
    repair = None
    if args.repair and (report["damaged"] or report["pending"] or report["card"] or report["leftovers"]
                        or report["catalog"]):
        repair = repair_cache(args.cache, report, data=args.data, progress=not (args.quiet or args.json))
    print(json.dumps(report_json(report, repair), indent=2) if args.json else format_report(report, repair))
    if repair is not None:
        return 1 if repair["lost"] or repair["busy"] else 0
    return 1 if report["damaged"] or report["pending"] or report["card"] else 0


def run_stats(args):
    """Latent statistics of a cache or of a VAE on images; optionally export the VAE with them."""
    # torch and diffusers: only once the command runs
    from vaekit.cache.encode import load_encoder_vae
    from vaekit.cache.reader import open_card
    from vaekit.cache.stats import cache_statistics, data_statistics, suggest_normalization, write_normalization
    from vaekit.model.architecture import fingerprint
    from vaekit.model.normalization import scale_shift

    if bool(args.cache) == bool(args.data):
        raise VaekitError("Pass either a cache folder (vaekit stats CACHE) or --vae MODEL --data SRC.")
    vae = None
    if args.cache:
        info = open_card(args.cache)  # checked: a damaged card is one message
        stats = cache_statistics(args.cache, args.of)
        current = (info.scaling_factor, info.shift_factor)
        if args.write:
            if args.vae:
                vae = load_encoder_vae(config_from_args(EncodeConfig, args))
            else:  # the VAE the card names, loaded as `vaekit encode` loaded it
                source = info.card.get("vae") if isinstance(info.card.get("vae"), dict) else {}
                vae = load_encoder_vae(EncodeConfig(vae=source.get("source") or "", override=source.get("override", []),
                                                    weights=source.get("weights", "ema")))
            if fingerprint(vae) != info.key.get("vae_fingerprint"):
                raise VaekitError(f"This VAE is not the one that encoded {args.cache}; pass that one with --vae.")
    else:
        if not args.vae:
            raise VaekitError("--data needs --vae MODEL: the VAE whose latents to measure.")
        config = config_from_args(EncodeConfig, args, dtype="fp32")
        vae = load_encoder_vae(config)
        current = scale_shift(vae)
        stats = data_statistics(vae, config, args.of, progress=not args.json)
    suggestion = suggest_normalization(stats)
    if args.json:
        print(json.dumps({"statistics": stats, "suggested": suggestion}, indent=2))
    else:
        print(format_statistics(stats, suggestion, current))
    if args.write:
        path = write_normalization(vae.float(), suggestion, args.write)
        if not args.json:
            print(f"wrote the VAE with this normalisation (and per-channel latents_mean/latents_std) to {path}")
    return 0


def format_statistics(stats, suggestion, current):
    """The stats table printed by `vaekit stats`."""
    what = "posterior samples z ~ N(mean, exp(logvar))" if stats["of"] == "posterior" else "posterior means"
    lines = [f"latent statistics of {what}: {stats['channels']} channels, {stats['count']:,} values per channel",
             f"{'channel':>8}  {'mean':>10}  {'std':>10}"]
    for c, (m, s) in enumerate(zip(stats["mean"], stats["std"])):
        lines.append(f"{c:>8}  {m:>10.5f}  {s:>10.5f}")
    lines.append(f"{'global':>8}  {stats['global_mean']:>10.5f}  {stats['global_std']:>10.5f}")
    lines.append(f"suggested: scaling_factor = 1/std = {suggestion['scaling_factor']:.6g}, "
                 f"shift_factor = mean = {suggestion['shift_factor']:.6g}")
    if current is not None:
        lines.append(f"current:   scaling_factor = {current[0]:.6g}, shift_factor = {current[1]:.6g}")
    return "\n".join(lines)
