"""Presets, and building, loading and saving diffusers' AutoencoderKL from any model argument.

A model argument is one of:
  preset:NAME               a randomly initialised model of a named architecture (see PRESETS)
  DIR                       a diffusers folder (config.json + diffusion_pytorch_model.safetensors),
                            a pipeline folder with a vae/ subfolder, or a vaekit training checkpoint
  FILE                      a single-file checkpoint in the original latent-diffusion layout
                            (.safetensors, or .ckpt/.pt/.pth read with weights_only=True)
  OWNER/NAME                a Hugging Face hub id (needs network, or the local hub cache)

The latent normalisation (scaling_factor, shift_factor) lives in the model config, never in code:
diffusion models see `normalize_latents(vae, z) = (z - shift) * scale`.
"""

import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from vaekit.errors import VaekitError

_SD_SHAPE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "mid_block_add_attention": True,
}

# Scaling and shift factors are the published ones for each family (diffusers' configs of
# stabilityai/sd-vae-ft-mse, sdxl-vae, stable-diffusion-3-medium and black-forest-labs/FLUX.1-dev).
PRESETS = {
    "sd": {**_SD_SHAPE, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
    "sdxl": {**_SD_SHAPE, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
    "sd3": {
        **_SD_SHAPE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
        "use_quant_conv": False, "use_post_quant_conv": False,
    },
    "flux": {
        **_SD_SHAPE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "use_quant_conv": False, "use_post_quant_conv": False,
    },
    # 16x downsampling with 32 latent channels: the same compression in floats per pixel as f8c8.
    # Its normalisation is unknown until measured: run `vaekit stats` and write it back.
    "f16c32": {
        **_SD_SHAPE, "block_out_channels": [128, 256, 512, 512, 512], "latent_channels": 32, "sample_size": 512,
        "scaling_factor": 1.0, "shift_factor": 0.0, "use_quant_conv": False, "use_post_quant_conv": False,
    },
    # About a million parameters, f8 like the real ones: for tests and the CPU demo. Groups stay 32
    # (every released VAE uses 32) so a single file without metadata still loads it exactly.
    "tiny": {
        **_SD_SHAPE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "latent_channels": 4,
        "sample_size": 64, "scaling_factor": 1.0, "shift_factor": 0.0,
    },
}


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


def build_preset(name, overrides=None):
    """A randomly initialised AutoencoderKL of a named preset architecture."""
    if name not in PRESETS:
        raise VaekitError(f"Unknown preset '{name}'. Choose one of: {', '.join(PRESETS)}.")
    return AutoencoderKL(**make_config(PRESETS[name], overrides))


def vae_config(vae):
    """The model's config as a plain dict of AutoencoderKL arguments (JSON-safe)."""
    keys = config_keys()
    config = {k: v for k, v in dict(vae.config).items() if k in keys}
    return json.loads(json.dumps(config))


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


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VaekitError(f"Cannot read {path}: {e}. Is it a diffusers config.json?") from None


def load_diffusers_folder(folder, overrides=None):
    """Load a diffusers AutoencoderKL folder with strict key and shape checks."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise VaekitError(f"{folder} holds a {config['_class_name']}, not an AutoencoderKL.")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        bins = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if bins:
            raise VaekitError(f"{folder} holds sharded weights; load it with diffusers and re-save it unsharded.")
        raise VaekitError(
            f"{folder} has a config.json but no diffusion_pytorch_model.safetensors. Export the weights as safetensors."
        )
    config = make_config({k: v for k, v in config.items() if k in config_keys()}, overrides)
    vae = AutoencoderKL(**config)
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise VaekitError(f"{weights} is not a readable safetensors file ({e}).") from None
    return load_state_dict_checked(vae, state_dict, str(weights))


def _is_training_checkpoint(folder):
    meta = Path(folder) / "meta.json"
    return meta.is_file() and (Path(folder) / "vae.safetensors").is_file()


# owner/name as the hub spells repository ids; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT_SUFFIX = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|json)$")


def _is_hub_id(spec):
    return bool(_HUB_ID.match(spec)) and not _CHECKPOINT_SUFFIX.search(spec)


def hub_reachable(timeout=3.0):
    """True when the hub's endpoint answers a TCP connection within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_from_hub(repo_id, overrides=None):
    """Load from the local hub cache or the hub, trying the repo root then `vae/`."""
    # The local cache first; then the network, but only when it answers: the hub client's own
    # retries take a minute to give up on a machine without network.
    attempts = [True] + ([False] if hub_reachable() else [])
    last = None
    for local_only in attempts:
        for subfolder in (None, "vae"):
            try:
                vae = AutoencoderKL.from_pretrained(repo_id, subfolder=subfolder, local_files_only=local_only)
                if overrides:
                    rebuilt = AutoencoderKL(**make_config(vae_config(vae), overrides))
                    vae = load_state_dict_checked(rebuilt, vae.state_dict(), repo_id)
                return vae
            except (OSError, ValueError, EnvironmentError) as e:  # hub and file errors all mean "not here"
                last = e
    reason = (
        "it is not in the local hub cache and there is no network access to the hub"
        if len(attempts) == 1 else f"loading failed ({str(last)[:200]})"
    )
    raise VaekitError(
        f"Could not load '{repo_id}' from the Hugging Face hub: {reason}. Pass a local path instead: a diffusers "
        f"folder (config.json + diffusion_pytorch_model.safetensors) or a single-file .safetensors checkpoint."
    )


def load_vae(spec, overrides=None, device=None, dtype=None, weights="ema"):
    """Build or load an AutoencoderKL from a model argument (see the module docstring); eval mode."""
    spec = str(spec)
    if spec.startswith("preset:"):
        vae = build_preset(spec.split(":", 1)[1], overrides)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if (path / "config.json").is_file():
                vae = load_diffusers_folder(path, overrides)
            elif (path / "vae" / "config.json").is_file():
                vae = load_diffusers_folder(path / "vae", overrides)
            elif _is_training_checkpoint(path):
                from vaekit.train import load_training_checkpoint

                vae = load_training_checkpoint(path, weights=weights, overrides=overrides)
            else:
                raise VaekitError(
                    f"{path} is a folder but not a diffusers VAE (no config.json), a pipeline (no vae/config.json) "
                    f"or a vaekit training checkpoint (no meta.json)."
                )
        elif path.is_file():
            from vaekit.convert import load_single_file

            vae = load_single_file(path, overrides=overrides)
        elif not _is_hub_id(spec):
            hint = " Presets are named preset:NAME." if spec in PRESETS else ""
            raise VaekitError(f"Model not found: {spec}. Pass an existing file or folder, preset:NAME or a hub id.{hint}")
        else:
            vae = load_from_hub(spec, overrides)
    vae.eval()
    if device is not None or dtype is not None:
        cast_vae(vae, device=device, dtype=dtype)
    return vae


def cast_vae(vae, device=None, dtype=None):
    """vae.to(device, dtype) in place, returning vae, without diffusers' notice on every dtype cast.

    diffusers' ModelMixin.to warns that some modules "should be kept in float32" on any cast to a
    dtype, even for AutoencoderKL, which keeps none (the list it prints is empty); torch's own
    Module.to does the same cast silently.
    """
    return torch.nn.Module.to(vae, device=device, dtype=dtype)


def save_diffusers(vae, out_dir, dtype=None):
    """Write a diffusers folder (config.json + diffusion_pytorch_model.safetensors) atomically.

    The folder is written under a temporary name and renamed into place, so an interrupted export
    never leaves a folder that looks complete; an existing folder is replaced only after success.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model = vae
        if dtype is not None:
            model = AutoencoderKL(**vae_config(vae))
            model.load_state_dict(vae.state_dict())
            cast_vae(model, dtype=dtype)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def downsample_factor(vae):
    """Pixels per latent along each side (8 for Stable Diffusion's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae):
    """Number of latent channels."""
    return vae.config.latent_channels


def scale_shift(vae):
    """(scaling_factor, shift_factor) from the model config; shift defaults to 0."""
    return float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)


def normalize_latents(vae, z):
    """Latents as a diffusion model sees them: (z - shift) * scale."""
    scale, shift = scale_shift(vae)
    return (z - shift) * scale


def denormalize_latents(vae, z):
    """Undo normalize_latents: z / scale + shift."""
    scale, shift = scale_shift(vae)
    return z / scale + shift


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
