"""Building, checking, copying, describing and fingerprinting diffusers' AutoencoderKL."""

import hashlib
import inspect
import json

import torch
from diffusers import AutoencoderKL

from vaekit.errors import VaekitError
from vaekit.model.normalization import scale_shift
from vaekit.model.presets import PRESETS


def config_keys():
    """Names that AutoencoderKL's config accepts."""
    params = inspect.signature(AutoencoderKL.__init__).parameters
    return [name for name in params if name != "self"]


def make_config(base, overrides=None):
    """A full AutoencoderKL config: `base` plus `overrides`, with block types sized to the levels."""
    config = dict(base)
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in config_keys()]
    if unknown:
        raise VaekitError(
            f"Unknown model config key '{unknown[0]}'. Valid keys: {', '.join(config_keys())}."
        )
    config.update(overrides)
    levels = len(config.get("block_out_channels", [64]))
    if "down_block_types" not in overrides:
        config["down_block_types"] = ["DownEncoderBlock2D"] * levels
    if "up_block_types" not in overrides:
        config["up_block_types"] = ["UpDecoderBlock2D"] * levels
    groups = config.get("norm_num_groups", 32)
    bad = [c for c in config.get("block_out_channels", []) if c % groups]
    if bad:
        raise VaekitError(
            f"block_out_channels {config['block_out_channels']} must all be multiples of norm_num_groups={groups}."
        )
    return {k: v for k, v in config.items() if k in config_keys()}


def build_vae(config):
    """A randomly initialised AutoencoderKL from a config dict."""
    config = make_config({}, config) if "down_block_types" not in config else config
    return AutoencoderKL(**{k: v for k, v in config.items() if k in config_keys()})


def build_preset(name, overrides=None, seed=None):
    """A randomly initialised AutoencoderKL of a named preset architecture; `seed` fixes its weights.

    Without `seed` the weights come from torch's global RNG (a trainer seeds it); with one, every
    process and every run builds the same model without touching the global RNG.
    """
    if name not in PRESETS:
        raise VaekitError(f"Unknown preset '{name}'. Choose one of: {', '.join(PRESETS)}.")
    config = make_config(PRESETS[name], overrides)
    if seed is None:
        return AutoencoderKL(**config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**config)


def vae_config(vae):
    """The model's config as a plain dict of AutoencoderKL arguments (JSON-safe)."""
    keys = config_keys()
    config = {k: v for k, v in dict(vae.config).items() if k in keys}
    return json.loads(json.dumps(config))


def copy_vae(vae, config=None):
    """A separate AutoencoderKL with `vae`'s weights and its config updated by `config` (e.g. a new normalisation).

    On the device of `vae`, in float32, eval mode, no gradients: for validation, export and re-saving.
    """
    copy = AutoencoderKL(**{**vae_config(vae), **(config or {})})
    copy.load_state_dict(vae.state_dict())
    return cast_vae(copy, device=model_device(vae), dtype=torch.float32).eval().requires_grad_(False)


def load_state_dict_checked(vae, state_dict, source):
    """Load `state_dict` into `vae` strictly; on mismatch, name the first offending key and both shapes."""
    expected = vae.state_dict()
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
    vae.load_state_dict({k: v.to(expected[k].dtype) for k, v in state_dict.items()}, strict=True)
    return vae


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
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae):
    """Number of latent channels."""
    return vae.config.latent_channels


def fingerprint(vae):
    """sha256 over the architecture and latent normalisation and every weight: a cache key."""
    digest = hashlib.sha256()
    digest.update(json.dumps(vae_config(vae), sort_keys=True).encode())
    for key, tensor in sorted(vae.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe(vae):
    """Architecture, parameter counts and latent normalisation as a JSON-safe dict."""
    scale, shift = scale_shift(vae)
    config = vae_config(vae)
    count = lambda module: sum(p.numel() for p in module.parameters()) if module is not None else 0  # noqa: E731
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
