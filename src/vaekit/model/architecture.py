"""Building, checking, copying, describing and fingerprinting diffusers' AutoencoderKL.

Copying, describing, fingerprinting and the geometry helpers also take an AutoencoderTiny (the TAESD
architecture, whose own config checks and file layout live in vaekit.model.tiny).
"""

import hashlib
import inspect
import json
import math

import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from vaekit.errors import VaekitError
from vaekit.model.normalization import scale_shift
from vaekit.model.presets import PRESETS, TINY_PRESETS


def config_keys(cls=AutoencoderKL):
    """Names that the config of `cls` (AutoencoderKL by default) accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [name for name in params if name != "self"]


def is_tiny(vae):
    """Whether `vae` is an AutoencoderTiny (TAESD): deterministic encoder, no GroupNorm, its own layout."""
    return isinstance(vae, AutoencoderTiny)


# Sane ranges of AutoencoderKL's integer fields. A model file's config is untrusted input: checked
# before anything is built, so a crafted file cannot make the loader allocate or loop without bound.
INT_RANGES = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "latent_channels": (1, 1024),
    "layers_per_block": (1, 32),
    "norm_num_groups": (1, 1024),
}
MAX_LEVELS = 8  # resolution levels: 2^7 = 128x downsampling
MAX_WIDTH = 8192  # channels of one level
MAX_SAMPLE_SIZE = 1 << 16
BOOL_KEYS = ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")  # what diffusers' get_activation accepts
DOWN_BLOCKS = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
UP_BLOCKS = ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")


def make_config(base, overrides=None, source="the model config"):
    """A full AutoencoderKL config: `base` plus `overrides`, with block types sized to the levels, checked.

    Every field is checked for its type and a sane range (`check_architecture`); an error names the
    field and `source`.
    """
    if not isinstance(base, dict):
        raise VaekitError(f"{source}: the model config must be a mapping of AutoencoderKL fields, got "
                          f"{type(base).__name__}.")
    config = dict(base)
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in config_keys()]
    if unknown:
        raise VaekitError(
            f"Unknown model config key '{unknown[0]}'. Valid keys: {', '.join(config_keys())}."
        )
    config.update(overrides)
    check_levels(config, source)
    levels = len(config.get("block_out_channels", [64]))
    if "down_block_types" not in overrides:
        config["down_block_types"] = ["DownEncoderBlock2D"] * levels
    if "up_block_types" not in overrides:
        config["up_block_types"] = ["UpDecoderBlock2D"] * levels
    config = {k: v for k, v in config.items() if k in config_keys()}
    check_architecture(config, source)
    return config


def _bad(source, key, value, expected):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return VaekitError(f"{source}: model config field '{key}' is {shown}; expected {expected}. Fix the config "
                       f"(or the file's metadata), or pass the right architecture with -o {key}=VALUE.")


def _integer(value):
    """An int from an int or an integral float (JSON writers differ), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def check_levels(config, source):
    """block_out_channels is a short list of sane widths (checked first: the block lists are sized by it)."""
    widths = config.get("block_out_channels", [64])
    if not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_LEVELS:
        raise _bad(source, "block_out_channels", widths, f"a list of 1 to {MAX_LEVELS} channel counts")
    checked = [_integer(w) for w in widths]
    if any(w is None or not 1 <= w <= MAX_WIDTH for w in checked):
        raise _bad(source, "block_out_channels", widths, f"channel counts from 1 to {MAX_WIDTH}")
    config["block_out_channels"] = checked


def check_architecture(config, source="the model config"):
    """Raise VaekitError naming the first AutoencoderKL config field of the wrong type or out of range."""
    for key, (low, high) in INT_RANGES.items():
        if key in config:
            value = _integer(config[key])
            if value is None or not low <= value <= high:
                raise _bad(source, key, config[key], f"an integer from {low} to {high}")
            config[key] = value
    groups = config.get("norm_num_groups", 32)
    if any(w % groups for w in config["block_out_channels"]):
        raise VaekitError(f"{source}: block_out_channels {config['block_out_channels']} must all be multiples of "
                          f"norm_num_groups={groups}.")
    for key in BOOL_KEYS:
        if key in config and not isinstance(config[key], bool):
            raise _bad(source, key, config[key], "true or false")
    if "act_fn" in config and config["act_fn"] not in ACTIVATIONS:
        raise _bad(source, "act_fn", config["act_fn"], f"one of {', '.join(ACTIVATIONS)}")
    levels = len(config["block_out_channels"])
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        value = config.get(key)
        if not isinstance(value, (list, tuple)) or len(value) != levels or any(v not in allowed for v in value):
            raise _bad(source, key, value, f"{levels} block names from {', '.join(allowed)}")
    size = config.get("sample_size", 512)
    sizes = size if isinstance(size, (list, tuple)) else [size]
    if not 1 <= len(sizes) <= 2 or any(_integer(s) is None or not 1 <= _integer(s) <= MAX_SAMPLE_SIZE for s in sizes):
        raise _bad(source, "sample_size", size, f"a pixel size from 1 to {MAX_SAMPLE_SIZE}")
    scale = config.get("scaling_factor", 0.18215)
    if not _finite_number(scale) or scale <= 0:
        raise _bad(source, "scaling_factor", scale, "a finite number above 0")
    if config.get("shift_factor") is not None and not _finite_number(config["shift_factor"]):
        raise _bad(source, "shift_factor", config["shift_factor"], "a finite number or null")
    channels = config.get("latent_channels", 4)
    for key in ("latents_mean", "latents_std"):
        value = config.get(key)
        if value is None:
            continue
        if (not isinstance(value, (list, tuple)) or len(value) != channels or not all(map(_finite_number, value))
                or (key == "latents_std" and any(v <= 0 for v in value))):
            raise _bad(source, key, value, f"null or {channels} finite numbers" + (" above 0" if key == "latents_std"
                                                                                  else ""))
    return config


def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def build_vae(config):
    """A randomly initialised AutoencoderKL from a config dict."""
    config = make_config({}, config) if "down_block_types" not in config else config
    return AutoencoderKL(**{k: v for k, v in config.items() if k in config_keys()})


def build_preset(name, overrides=None, seed=None):
    """A randomly initialised AutoencoderKL of a named preset architecture; `seed` fixes its weights.

    Without `seed` the weights come from torch's global RNG (a trainer seeds it); with one, every
    process and every run builds the same model without touching the global RNG.
    """
    if name in TINY_PRESETS:
        raise VaekitError(f"preset:{name} is an AutoencoderTiny; build it with vaekit.model.load_vae('preset:{name}').")
    if name not in PRESETS:
        raise VaekitError(f"Unknown preset '{name}'. Choose one of: {', '.join([*PRESETS, *TINY_PRESETS])}.")
    return construct(AutoencoderKL, make_config(PRESETS[name], overrides), seed)


def construct(cls, config, seed=None):
    """A randomly initialised `cls(**config)`: from torch's global RNG, or with `seed` without touching it."""
    if seed is None:
        return cls(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(**config)


def vae_config(vae):
    """The model's config as a plain dict of its class's arguments (JSON-safe)."""
    keys = config_keys(type(vae))
    config = {k: v for k, v in dict(vae.config).items() if k in keys}
    return json.loads(json.dumps(config))


def copy_vae(vae, config=None):
    """A separate model of `vae`'s class with its weights and its config updated by `config` (e.g. a new normalisation).

    On the device of `vae`, in float32, eval mode, no gradients: for validation, export and re-saving.
    """
    copy = type(vae)(**{**vae_config(vae), **(config or {})})
    copy.load_state_dict(vae.state_dict())
    return cast_vae(copy, device=model_device(vae), dtype=torch.float32).eval().requires_grad_(False)


def check_state_dict(expected, state_dict, source):
    """Raise VaekitError naming the first key that is missing, extra or of another shape than `expected`'s."""
    for key, tensor in expected.items():
        if key not in state_dict:
            raise VaekitError(
                f"{source} does not fit this architecture: key '{key}' (shape {tuple(tensor.shape)}) is missing "
                f"from the checkpoint. Check the model config or pass the right architecture."
            )
        got = tuple(state_dict[key].shape)
        if got != tuple(tensor.shape):
            raise VaekitError(
                f"{source} does not fit this architecture: key '{key}' has shape {got} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model. Check the model config or pass the right architecture."
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise VaekitError(
            f"{source} does not fit this architecture: the checkpoint has key '{extra[0]}' "
            f"(shape {tuple(state_dict[extra[0]].shape)}) that the model lacks. Check the model config."
        )


def vae_from_state_dict(config, state_dict, source, cls=AutoencoderKL):
    """A model of `cls` (AutoencoderKL by default; fp32, eval mode) of `config` holding `state_dict`, checked before any
    weight is allocated.

    The model is built on the meta device (no memory), its shapes compared with the file's tensors,
    and the tensors then become its parameters (`assign=True`): loading allocates no more than the
    file's tensors need, whatever architecture the file claims.
    """
    with torch.device("meta"):
        vae = cls(**config)
    check_state_dict(vae.state_dict(), state_dict, source)
    tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()}
    vae.load_state_dict(tensors, strict=True, assign=True)
    return vae.eval()


def cast_vae(vae, device=None, dtype=None):
    """vae.to(device, dtype) in place, returning vae, without diffusers' notice on every dtype cast.

    diffusers' ModelMixin.to warns that some modules "should be kept in float32" on any cast to a
    dtype, even for AutoencoderKL, which keeps none (the list it prints is empty); torch's own
    Module.to does the same cast silently.
    """
    return torch.nn.Module.to(vae, device=device, dtype=dtype)


def model_dtype(vae):
    """The dtype of the model's weights."""
    return next(vae.parameters()).dtype


def model_device(vae):
    """The device of the model's weights."""
    return next(vae.parameters()).device


def downsample_factor(vae):
    """Pixels per latent along each side (8 for Stable Diffusion's VAE)."""
    if is_tiny(vae):  # every encoder level after the first has a stride-2 convolution
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae):
    """Number of latent channels."""
    return vae.config.latent_channels


def set_initial_logvar(vae, value):
    """Set the posterior log-variance a freshly built AutoencoderKL starts from to about `value`, in place.

    The bias of the layer that outputs the log-variance half of the moments (quant_conv, or the encoder's
    conv_out without one) becomes `value`; the weights stay as initialised. At the usual initialisation the
    log-variance starts near 0, so a short run decodes latents with noise of standard deviation ~1 and
    learns slowly until the bias has moved far enough (Adam moves it about lr per step).
    """
    if is_tiny(vae):
        raise VaekitError("An AutoencoderTiny has no posterior variance to initialise.")
    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    with torch.no_grad():
        layer.bias[vae.config.latent_channels:] = value


def _digest(config, state_dict):
    """sha256 over a config dict and named tensors (their dtype and row-major bytes)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True).encode())
    for key, tensor in sorted(state_dict.items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        # Row-major bytes whatever the memory format: a channels-last 1x1 kernel passes is_contiguous() with
        # strides that `view(torch.uint8)` refuses, and the same weights must give the same key.
        data = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def count_parameters(module):
    """Number of parameters of a module (0 for None)."""
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def fingerprint(vae):
    """sha256 over the architecture and latent normalisation and every weight: a cache key."""
    return _digest(vae_config(vae), vae.state_dict())


# Config fields that only shape the decoder: a decoder fine-tune may not change the latents, whatever these are.
DECODER_ONLY_KEYS = ("out_channels", "up_block_types", "use_post_quant_conv")


def encoder_fingerprint(vae):
    """sha256 over what fixes the latents a VAE gives: the encoder's architecture and weights, quant_conv and the
    latent normalisation. Equal for a VAE and its decoder fine-tunes, whose latents are bit-identical."""
    config = {k: v for k, v in vae_config(vae).items() if k not in DECODER_ONLY_KEYS}
    tensors = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    return _digest(config, tensors)


def describe(vae):
    """Architecture, parameter counts and latent normalisation as a JSON-safe dict."""
    if is_tiny(vae):
        return describe_tiny(vae)
    scale, shift = scale_shift(vae)
    config = vae_config(vae)
    count = count_parameters
    return {
        "class": "AutoencoderKL",
        "downsample_factor": downsample_factor(vae),
        "latent_channels": latent_channels(vae),
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "block_out_channels": list(config["block_out_channels"]),
        "layers_per_block": config["layers_per_block"],
        "norm_num_groups": config["norm_num_groups"],
        "mid_block_attention": config.get("mid_block_add_attention", True),
        "quant_conv": config.get("use_quant_conv", True),
        "post_quant_conv": config.get("use_post_quant_conv", True),
        "scaling_factor": scale,
        "shift_factor": shift,
        "latents_mean": config.get("latents_mean"),
        "latents_std": config.get("latents_std"),
        "parameters": {
            "encoder": count(vae.encoder) + count(getattr(vae, "quant_conv", None)),
            "decoder": count(vae.decoder) + count(getattr(vae, "post_quant_conv", None)),
            "total": count(vae),
        },
    }


def describe_tiny(vae):
    """`describe` of an AutoencoderTiny: its levels, blocks and latent range besides the common fields."""
    scale, shift = scale_shift(vae)
    config = vae_config(vae)
    return {
        "class": "AutoencoderTiny",
        "downsample_factor": downsample_factor(vae),
        "latent_channels": latent_channels(vae),
        "in_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "encoder_block_out_channels": list(config["encoder_block_out_channels"]),
        "decoder_block_out_channels": list(config["decoder_block_out_channels"]),
        "num_encoder_blocks": list(config["num_encoder_blocks"]),
        "num_decoder_blocks": list(config["num_decoder_blocks"]),
        "act_fn": config["act_fn"],
        "scaling_factor": scale,
        "shift_factor": shift,
        "latent_magnitude": config["latent_magnitude"],
        "latent_shift": config["latent_shift"],
        "parameters": {"encoder": count_parameters(vae.encoder), "decoder": count_parameters(vae.decoder),
                       "total": count_parameters(vae)},
    }
