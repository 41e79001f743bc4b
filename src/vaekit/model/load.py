"""`load_vae(spec)`: an AutoencoderKL (or AutoencoderTiny) from any model argument, and writing diffusers folders.

A model argument is one of:
  preset:NAME               a randomly initialised model of a named architecture (vaekit.model.presets;
                            preset:taesd is an AutoencoderTiny)
  DIR                       a diffusers folder (config.json + diffusion_pytorch_model.safetensors) of an
                            AutoencoderKL or AutoencoderTiny, a pipeline folder with a vae/ subfolder, a
                            vaekit training checkpoint, or a folder holding one TAESD pair
                            (NAME_encoder / NAME_decoder .safetensors or .pth, vaekit.model.tiny)
  FILE                      a single-file checkpoint in the original latent-diffusion layout
                            (.safetensors, or .ckpt/.pt/.pth read with weights_only=True), or one file
                            of a TAESD pair (the other must lie beside it)
  OWNER/NAME                a Hugging Face hub id (needs network, or the local hub cache)
"""

import json
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import load_file

from vaekit.config import flat_overrides
from vaekit.errors import VaekitError
from vaekit.io import atomic_folder
from vaekit.model.architecture import (build_preset, cast_vae, config_keys, copy_vae, is_tiny, make_config, vae_config,
                                       vae_from_state_dict)
from vaekit.model.card import model_card
from vaekit.model.presets import PRESETS, TINY_PRESETS
from vaekit.model.single_file import load_single_file, save_single_file
from vaekit.model.tiny import (build_tiny_preset, find_taesd_pair, load_taesd, make_tiny_config, save_taesd,
                              tiny_from_state_dict)
from vaekit.train.checkpoint import is_training_checkpoint, load_checkpoint_vae


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VaekitError(f"Cannot read {path}: {e}. Is it a diffusers config.json?") from None


def load_diffusers_folder(folder, overrides=None):
    """Load a diffusers AutoencoderKL or AutoencoderTiny folder with strict key and shape checks."""
    folder = Path(folder)
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise VaekitError(f"{folder / 'config.json'} is not a diffusers config (a JSON mapping).")
    kind = config.get("_class_name", "AutoencoderKL")
    if kind not in VAE_CLASSES:
        raise VaekitError(f"{folder} holds a {kind}, not an AutoencoderKL or AutoencoderTiny.")
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        bins = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if bins:
            raise VaekitError(f"{folder} holds sharded weights; load it with diffusers and re-save it unsharded.")
        raise VaekitError(
            f"{folder} has a config.json but no diffusion_pytorch_model.safetensors. Export the weights as safetensors."
        )
    config = make_vae_config(kind, config, overrides, folder / "config.json")
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise VaekitError(f"{weights} is not a readable safetensors file ({e}).") from None
    if kind == "AutoencoderTiny":
        return tiny_from_state_dict(config, state_dict, str(weights))
    return vae_from_state_dict(config, state_dict, str(weights))


VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}


def make_vae_config(kind, config, overrides, source):
    """The checked config of a `kind` (class name) model from a config.json's fields plus overrides."""
    if kind == "AutoencoderTiny":
        return make_tiny_config({k: v for k, v in config.items() if k in config_keys(AutoencoderTiny)}, overrides,
                                source=source)
    return make_config({k: v for k, v in config.items() if k in config_keys()}, overrides, source=source)


# owner/name as the hub spells repository ids; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT_SUFFIX = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|json)$")


def is_hub_id(spec):
    """Whether a model argument that is no existing path reads as a hub id (owner/name, not a file name)."""
    return bool(_HUB_ID.match(spec)) and not _CHECKPOINT_SUFFIX.search(spec)


def hub_reachable(timeout=3.0):
    """True when the hub's endpoint answers a TCP connection within `timeout` seconds."""
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
                # The repository's config is checked before diffusers builds anything from it.
                config = AutoencoderKL.load_config(repo_id, subfolder=subfolder, local_files_only=local_only)
                kind = config.get("_class_name", "AutoencoderKL")
                if kind not in VAE_CLASSES:
                    raise VaekitError(f"'{repo_id}' holds a {kind}, not an AutoencoderKL or AutoencoderTiny.")
                make_vae_config(kind, config, None, f"{repo_id} config.json")
                vae = VAE_CLASSES[kind].from_pretrained(repo_id, subfolder=subfolder, local_files_only=local_only)
                if overrides:
                    config = make_vae_config(kind, vae_config(vae), overrides, repo_id)
                    build = tiny_from_state_dict if kind == "AutoencoderTiny" else vae_from_state_dict
                    vae = build(config, vae.state_dict(), repo_id)
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


def load_vae(spec, overrides=None, device=None, dtype=None, weights="ema", seed=None):
    """Build or load an AutoencoderKL or AutoencoderTiny from a model argument (see the module docstring); eval mode.

    `overrides`: AutoencoderKL config fields, a dict or `key=value` strings. `weights`: for a training
    checkpoint, its EMA or raw weights. `seed`: fixes a preset's random weights (see build_preset).
    """
    spec = str(spec)
    overrides = flat_overrides(overrides) or None
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name in TINY_PRESETS:
            vae = build_tiny_preset(name, overrides, seed=seed)
        else:
            vae = build_preset(name, overrides, seed=seed)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if (path / "config.json").is_file():
                vae = load_diffusers_folder(path, overrides)
            elif (path / "vae" / "config.json").is_file():
                vae = load_diffusers_folder(path / "vae", overrides)
            elif is_training_checkpoint(path):
                vae = load_checkpoint_vae(path, weights=weights, overrides=overrides)
            elif (pair := find_taesd_pair(path)) is not None:
                vae = load_taesd(*pair, overrides=overrides)
            else:
                raise VaekitError(
                    f"{path} is a folder but not a diffusers VAE (no config.json), a pipeline (no vae/config.json), "
                    f"a vaekit training checkpoint (no meta.json) or a TAESD pair (NAME_encoder / NAME_decoder files)."
                )
        elif path.is_file():
            pair = find_taesd_pair(path)
            vae = load_taesd(*pair, overrides=overrides) if pair else load_single_file(path, overrides=overrides)
        elif not is_hub_id(spec):
            hint = " Presets are named preset:NAME." if spec in PRESETS else ""
            raise VaekitError(f"Model not found: {spec}. Pass an existing file or folder, preset:NAME or a hub id.{hint}")
        else:
            vae = load_from_hub(spec, overrides)
    vae.eval()
    if device is not None or dtype is not None:
        cast_vae(vae, device=device, dtype=dtype)
    return vae


def save_diffusers(vae, out_dir, dtype=None, card=None, source=None):
    """Write a diffusers folder (config.json + diffusion_pytorch_model.safetensors + README.md) atomically.

    README.md is the model card (`vaekit.model.card`): `card` when given, else the one `model_card`
    writes for `vae` made from `source`. The folder is written under a temporary name and renamed
    into place, so an interrupted export never leaves a folder that looks complete (or one without
    its card); an existing folder is replaced only after success.
    """
    text = card if card is not None else model_card(vae, out_dir, source=source)
    with atomic_folder(out_dir) as tmp:
        model = vae
        if dtype is not None:
            model = cast_vae(copy_vae(vae), dtype=dtype)
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").write_text(text, encoding="utf-8")
    return Path(out_dir)


def write_model(vae, out, fmt, dtype=None, taesd_name="taesd", source=None):
    """Write `vae` as a diffusers folder (with its model card), an original-layout .safetensors or a TAESD pair's
    folder; returns the path. `source`: the model argument `vae` came from, named in the card.
    """
    out = Path(out)
    if fmt in ("diffusers", "taesd") and out.suffix == ".safetensors":
        raise VaekitError(f"--out {out} names a file; the {fmt} format is a folder. Pass a folder path.")
    if fmt == "diffusers":
        return save_diffusers(vae, out, dtype=dtype, source=source)
    if fmt == "taesd":
        if not is_tiny(vae):
            raise VaekitError("The TAESD layout holds an AutoencoderTiny; this is an AutoencoderKL. Export it as "
                              "diffusers or single-file.")
        save_taesd(vae, out, taesd_name, dtype=dtype)
        return out
    if is_tiny(vae):
        raise VaekitError("The original latent-diffusion single-file layout has no AutoencoderTiny; export it as "
                          "diffusers, or as TAESD's own two files (--format taesd, what ComfyUI's vae_approx reads).")
    path = out if out.suffix == ".safetensors" else out / "vae.safetensors"
    return save_single_file(vae, path, dtype=dtype)


def source_dtype(spec):
    """The floating dtype the weights of a file or diffusers folder are stored in (fp32 otherwise)."""
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
