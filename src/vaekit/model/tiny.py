"""diffusers' AutoencoderTiny (the TAESD architecture): its config checks, building, and TAESD's own two-file layout.

An AutoencoderTiny's encoder maps images in [-1, 1] straight to a teacher's *normalised* latents and
its decoder maps them back, so its config holds scaling_factor 1.0 and shift_factor 0.0: a diffusers
pipeline's `latents / vae.config.scaling_factor + vae.config.shift_factor` step then hands the
decoder exactly the latents the denoiser made (diffusers' convention for TAESD, TAESDXL, TAESD3 and
TAEF1). `latent_magnitude` and `latent_shift` only map latents to [0, 1] for storing them as 8-bit
images; they never enter encode or decode.

TAESD's own layout is two files, `NAME_encoder.safetensors` and `NAME_decoder.safetensors`, each the
state dict of an `nn.Sequential` (madebyollin/taesd). ComfyUI's VAELoader reads such a pair from
`models/vae_approx/` for NAME in taesd, taesdxl, taesd3 and taef1 and assumes that family's latent
normalisation (`TAESD_FAMILIES`). Its Sequential numbers layers as diffusers' EncoderTiny does; its
decoder starts with the input clamp as a layer of its own, so every decoder index is one above
diffusers'.
"""

import math
from pathlib import Path

from diffusers import AutoencoderTiny

from vaekit.errors import VaekitError
from vaekit.io import atomic_folder, save_safetensors
from vaekit.model.architecture import (ACTIVATIONS, MAX_LEVELS, MAX_WIDTH, _bad, _finite_number, _integer,
                                       config_keys, construct, vae_config, vae_from_state_dict)
from vaekit.model.presets import TINY_PRESETS
from vaekit.model.single_file import read_checkpoint

TINY_INT_RANGES = {"in_channels": (1, 64), "out_channels": (1, 64), "latent_channels": (1, 1024),
                   "upsampling_scaling_factor": (1, 8)}
UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")  # what nn.Upsample takes for images
MAX_BLOCKS = 32  # blocks of one level

# ComfyUI's VAELoader.load_taesd: file-name prefix -> (latent channels, scaling_factor, shift_factor) it assumes.
TAESD_FAMILIES = {
    "taesd": (4, 0.18215, 0.0),
    "taesdxl": (4, 0.13025, 0.0),
    "taesd3": (16, 1.5305, 0.0609),
    "taef1": (16, 0.3611, 0.1159),
}
TAESD_SUFFIXES = (".safetensors", ".pth")


def make_tiny_config(base, overrides=None, source="the model config"):
    """A full AutoencoderTiny config: `base` plus `overrides`, each field checked; errors name it and `source`."""
    if not isinstance(base, dict):
        raise VaekitError(f"{source}: the model config must be a mapping of AutoencoderTiny fields, got "
                          f"{type(base).__name__}.")
    keys = config_keys(AutoencoderTiny)
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in keys]
    if unknown:
        raise VaekitError(f"Unknown AutoencoderTiny config key '{unknown[0]}'. Valid keys: {', '.join(keys)}.")
    config = {k: v for k, v in {**TINY_PRESETS["taesd"], **base, **overrides}.items() if k in keys}
    for key, (low, high) in TINY_INT_RANGES.items():
        value = _integer(config[key])
        if value is None or not low <= value <= high:
            raise _bad(source, key, config[key], f"an integer from {low} to {high}")
        config[key] = value
    for side in ("encoder", "decoder"):
        widths, blocks = f"{side}_block_out_channels", f"num_{side}_blocks"
        config[widths] = _int_list(config[widths], widths, 1, MAX_WIDTH, source)
        config[blocks] = _int_list(config[blocks], blocks, 0, MAX_BLOCKS, source)
        if len(config[widths]) != len(config[blocks]):
            raise VaekitError(f"{source}: {widths} has {len(config[widths])} levels but {blocks} "
                              f"{len(config[blocks])}; give one entry per level to both.")
    if config["act_fn"] not in ACTIVATIONS:
        raise _bad(source, "act_fn", config["act_fn"], f"one of {', '.join(ACTIVATIONS)}")
    if config["upsample_fn"] not in UPSAMPLE_MODES:
        raise _bad(source, "upsample_fn", config["upsample_fn"], f"one of {', '.join(UPSAMPLE_MODES)}")
    for key, positive in (("scaling_factor", True), ("latent_magnitude", True), ("shift_factor", False),
                          ("latent_shift", False)):
        value = config[key]
        if not _finite_number(value) or (positive and value <= 0):
            raise _bad(source, key, value, "a finite number" + (" above 0" if positive else ""))
    if not isinstance(config["force_upcast"], bool):
        raise _bad(source, "force_upcast", config["force_upcast"], "true or false")
    down = 2 ** (len(config["encoder_block_out_channels"]) - 1)
    up = config["upsampling_scaling_factor"] ** (len(config["decoder_block_out_channels"]) - 1)
    if down != up:
        raise VaekitError(f"{source}: the encoder downsamples {down}x but the decoder upsamples {up}x; give both "
                          f"the same number of levels (and upsampling_scaling_factor 2).")
    return config


def _int_list(value, key, low, high, source):
    """A list of 1 to MAX_LEVELS integers in [low, high], or the error naming `key`."""
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_LEVELS:
        raise _bad(source, key, value, f"a list of 1 to {MAX_LEVELS} integers")
    checked = [_integer(v) for v in value]
    if any(v is None or not low <= v <= high for v in checked):
        raise _bad(source, key, value, f"integers from {low} to {high}")
    return checked


def tiny_from_state_dict(config, state_dict, source):
    """An AutoencoderTiny (fp32, eval mode) of `config` holding `state_dict`, shapes checked before allocation."""
    return vae_from_state_dict(config, state_dict, source, cls=AutoencoderTiny)


def build_tiny_preset(name, overrides=None, seed=None):
    """A randomly initialised AutoencoderTiny of a TINY_PRESETS architecture; `seed` fixes its weights."""
    return construct(AutoencoderTiny, make_tiny_config(TINY_PRESETS[name], overrides, source=f"preset:{name}"), seed)


# ---------------------------------------------------------------------------------------------------
# TAESD's two-file layout


def taesd_name(latent_channels, scale, shift):
    """The TAESD_FAMILIES name whose latent channels and normalisation match, or None."""
    for name, (channels, family_scale, family_shift) in TAESD_FAMILIES.items():
        if channels == latent_channels and math.isclose(scale, family_scale, rel_tol=1e-4) \
                and math.isclose(shift, family_shift, abs_tol=1e-4):
            return name
    return None


def taesd_mismatch(vae):
    """Why `vae` does not have TAESD's exact architecture (what the two-file layout holds), or None."""
    config, standard = vae_config(vae), TINY_PRESETS["taesd"]
    for key in ("in_channels", "out_channels", "act_fn", "upsample_fn", "upsampling_scaling_factor",
                "encoder_block_out_channels", "decoder_block_out_channels", "num_encoder_blocks", "num_decoder_blocks"):
        if config[key] != standard[key]:
            return f"{key} is {config[key]}, TAESD's is {standard[key]}"
    return None


def save_taesd(vae, folder, name="taesd", dtype=None):
    """Write `NAME_encoder.safetensors` and `NAME_decoder.safetensors` into `folder` (atomically); returns the paths."""
    if name not in TAESD_FAMILIES:
        raise VaekitError(f"TAESD file names start with one of {', '.join(TAESD_FAMILIES)} (what ComfyUI looks for), "
                          f"got {name!r}.")
    reason = taesd_mismatch(vae)
    if reason:
        raise VaekitError(f"The TAESD file layout holds only TAESD's own architecture, and this model differs "
                          f"({reason}); export it as a diffusers folder instead.")
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in vae.state_dict().items()}
    encoder = {key.removeprefix("encoder.layers."): v for key, v in state.items() if key.startswith("encoder.")}
    decoder = {}
    for key, v in state.items():
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            decoder[f"{int(index) + 1}.{rest}"] = v  # TAESD's decoder has its clamp as layer 0
    with atomic_folder(folder) as tmp:
        save_safetensors(encoder, tmp / f"{name}_encoder.safetensors")
        save_safetensors(decoder, tmp / f"{name}_decoder.safetensors")
    return [Path(folder) / f"{name}_encoder.safetensors", Path(folder) / f"{name}_decoder.safetensors"]


def find_taesd_pair(path):
    """(encoder file, decoder file) of the TAESD pair `path` is a file of, or the one pair a folder holds; else None."""
    path = Path(path)
    if path.is_file():
        stem, suffix = path.stem, path.suffix
        for own, other in (("_encoder", "_decoder"), ("_decoder", "_encoder")):
            if stem.endswith(own) and suffix in TAESD_SUFFIXES:
                sibling = path.with_name(stem[: -len(own)] + other + suffix)
                if not sibling.is_file():
                    raise VaekitError(f"{path} is one half of a TAESD pair; {sibling.name} must lie beside it.")
                return (path, sibling) if own == "_encoder" else (sibling, path)
        return None
    if not path.is_dir():
        return None
    pairs = []
    for encoder in sorted(path.iterdir()):
        if encoder.suffix in TAESD_SUFFIXES and encoder.stem.endswith("_encoder"):
            decoder = encoder.with_name(encoder.stem[: -len("_encoder")] + "_decoder" + encoder.suffix)
            if decoder.is_file():
                pairs.append((encoder, decoder))
    if len(pairs) > 1:
        raise VaekitError(f"{path} holds {len(pairs)} TAESD pairs ({', '.join(p[0].name for p in pairs)}); pass one "
                          f"of the files.")
    return pairs[0] if pairs else None


def load_taesd(encoder_path, decoder_path, overrides=None):
    """An AutoencoderTiny from a TAESD pair (safetensors, or .pth read with weights_only=True); eval mode."""
    encoder, _ = read_checkpoint(encoder_path)
    decoder, _ = read_checkpoint(decoder_path)
    first = decoder.get("1.weight")
    if first is None or first.ndim != 4:
        raise VaekitError(f"{decoder_path} is not a TAESD decoder (no '1.weight' convolution; first keys: "
                          f"{', '.join(list(decoder)[:3]) or 'none'}).")
    state = {f"encoder.layers.{k}": v for k, v in encoder.items()}
    for key, v in decoder.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or int(index) == 0:
            raise VaekitError(f"{decoder_path} is not a TAESD decoder (unexpected key '{key}').")
        state[f"decoder.layers.{int(index) - 1}.{rest}"] = v
    config = make_tiny_config(TINY_PRESETS["taesd"], {"latent_channels": int(first.shape[1]), **(overrides or {})},
                              source=decoder_path)
    return tiny_from_state_dict(config, state, f"{encoder_path} + {decoder_path}")
