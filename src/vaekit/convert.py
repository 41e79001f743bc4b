"""diffusers <-> original latent-diffusion ("single-file") key layout for AutoencoderKL.

The original layout is the one of CompVis/latent-diffusion's `ldm.modules.diffusionmodules.model`
(Encoder/Decoder with `down.{i}.block.{j}`, `mid.block_1`, `mid.attn_1` with 1x1-conv q/k/v/proj_out),
as stored in Stable Diffusion checkpoints and read by single-file tools. diffusers only ships the
ldm -> diffusers direction, inside its single-file loader; we need both directions for any
architecture, so the mapping is written here as a table of rename rules.
"""

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from vaekit.errors import VaekitError
from vaekit.io import save_safetensors
from vaekit.model import load_state_dict_checked, make_config, vae_config

METADATA_KEY = "vaekit_config"
PREFIXES = ("first_stage_model.", "vae.")
_ATTN = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}


def _resnet_to_original(name):
    return name.replace("conv_shortcut", "nin_shortcut")


def _resnet_to_diffusers(name):
    return name.replace("nin_shortcut", "conv_shortcut")


def diffusers_key_to_original(key, levels):
    """One diffusers key in the original layout; `levels` is len(block_out_channels)."""
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv keep their names
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        kind, i, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        # diffusers numbers decoder blocks from the lowest resolution, the original from the highest
        level = i if kind == "down" else levels - 1 - i
        return f"{side}.{kind}.{level}.block.{j}.{_resnet_to_original(tail)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        return f"{side}.down.{m.group(1)}.downsample.{m.group(2)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{side}.up.{levels - 1 - int(m.group(1))}.upsample.{m.group(2)}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{_resnet_to_original(m.group(2))}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        if m.group(1) not in _ATTN:
            raise VaekitError(f"Unexpected attention key '{key}' in a diffusers AutoencoderKL state dict.")
        return f"{side}.mid.attn_1.{_ATTN[m.group(1)]}.{m.group(2)}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.split('.', 1)[1]}"
    return key  # conv_in, conv_out


def original_key_to_diffusers(key, levels):
    """One original-layout key in diffusers' layout; `levels` is the number of resolution levels."""
    side, rest = key.split(".", 1)
    if side not in ("encoder", "decoder"):
        return key
    if m := re.fullmatch(r"(down|up)\.(\d+)\.block\.(\d+)\.(.+)", rest):
        kind, level, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        i = level if kind == "down" else levels - 1 - level
        return f"{side}.{kind}_blocks.{i}.resnets.{j}.{_resnet_to_diffusers(tail)}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.(.+)", rest):
        return f"{side}.down_blocks.{m.group(1)}.downsamplers.0.{m.group(2)}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.(.+)", rest):
        return f"{side}.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.{m.group(2)}"
    if m := re.fullmatch(r"mid\.block_(\d+)\.(.+)", rest):
        return f"{side}.mid_block.resnets.{int(m.group(1)) - 1}.{_resnet_to_diffusers(m.group(2))}"
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)\.(weight|bias)", rest):
        if m.group(1) not in _ATTN_BACK:
            raise VaekitError(f"Unexpected attention key '{key}' in an original-layout VAE checkpoint.")
        return f"{side}.mid_block.attentions.0.{_ATTN_BACK[m.group(1)]}.{m.group(2)}"
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest.split('.', 1)[1]}"
    return key


def _count_levels(keys, pattern):
    levels = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(levels) + 1 if levels else 0


def to_original(state_dict):
    """A diffusers AutoencoderKL state dict in the original layout (attention as 1x1 convs)."""
    levels = _count_levels(state_dict, r"encoder\.down_blocks\.(\d+)\.")
    out = {}
    for key, tensor in state_dict.items():
        new = diffusers_key_to_original(key, levels)
        if ".mid.attn_1." in new and new.endswith("weight") and not new.endswith("norm.weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # (C, C) linear -> (C, C, 1, 1) conv, as the original stores it
        out[new] = tensor
    return out


def to_diffusers(state_dict):
    """An original-layout VAE state dict in diffusers' layout (attention as linear layers)."""
    levels = _count_levels(state_dict, r"encoder\.down\.(\d+)\.")
    out = {}
    for key, tensor in state_dict.items():
        new = original_key_to_diffusers(key, levels)
        if ".attentions.0.to_" in new and new.endswith("weight") and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # (C, C, 1, 1) conv -> (C, C) linear
        out[new] = tensor
    return out


def strip_prefix(state_dict):
    """Keep only the VAE's keys of a full checkpoint (`first_stage_model.` / `vae.` prefixes removed)."""
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def is_original_layout(state_dict):
    """True when keys look like latent-diffusion's (`encoder.down.0.block.0...`)."""
    return any(k.startswith("encoder.down.") for k in state_dict) or "encoder.norm_out.weight" in state_dict


def infer_config(state_dict):
    """Architecture of an original-layout VAE state dict, from tensor shapes alone.

    norm_num_groups cannot be read from shapes; it is taken as 32 (every released VAE), and files
    written by vaekit carry the exact config in their metadata.
    """
    keys = list(state_dict)
    levels = _count_levels(keys, r"encoder\.down\.(\d+)\.")
    if not levels or "encoder.conv_in.weight" not in state_dict or "decoder.conv_out.weight" not in state_dict:
        raise VaekitError(
            "This checkpoint does not hold an AutoencoderKL in either the diffusers or the original layout "
            f"(first keys: {', '.join(keys[:3]) or 'none'}). Pass a VAE checkpoint."
        )
    widths = []
    for level in range(levels):
        blocks = _count_levels(keys, rf"encoder\.down\.{level}\.block\.(\d+)\.")
        widths.append(state_dict[f"encoder.down.{level}.block.{blocks - 1}.conv2.weight"].shape[0])
    layers = _count_levels(keys, r"encoder\.down\.0\.block\.(\d+)\.")
    latent = state_dict["decoder.conv_in.weight"].shape[1]
    config = {
        "in_channels": state_dict["encoder.conv_in.weight"].shape[1],
        "out_channels": state_dict["decoder.conv_out.weight"].shape[0],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": 32,
        "use_quant_conv": "quant_conv.weight" in state_dict,
        "use_post_quant_conv": "post_quant_conv.weight" in state_dict,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict,
    }
    # Without metadata the latent normalisation is unknown; use the family default for the shape.
    if latent == 4 and widths == [128, 256, 512, 512]:
        config["scaling_factor"] = 0.18215
    else:
        config["scaling_factor"], config["shift_factor"] = 1.0, 0.0
    return make_config(config)


def read_checkpoint(path):
    """Tensors and metadata of a .safetensors file, or a .ckpt/.pt/.pth loaded with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise VaekitError(f"Checkpoint not found: {path}.")
    if path.stat().st_size == 0:
        raise VaekitError(f"{path} is empty (0 bytes). Was its download or export interrupted?")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except Exception as e:  # safetensors has no public error base class
            raise VaekitError(f"{path} is not a readable safetensors file ({e}).") from None
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise VaekitError(f"{path}: unknown checkpoint type '{path.suffix}'. Use .safetensors, .ckpt, .pt or .pth.")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise VaekitError(
                f"{path} holds Python objects besides tensors, and vaekit only loads checkpoints with "
                f"torch.load(weights_only=True) (a pickle can run arbitrary code). If you trust the file, convert it "
                f"once to safetensors: torch.load it yourself and save its state_dict with safetensors."
            ) from None
        raise VaekitError(f"{path} is not a readable PyTorch checkpoint ({text.splitlines()[0][:200]}).") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VaekitError(f"{path} does not hold a state dict of tensors.")
    return obj, {}


def load_single_file(path, overrides=None, config=None):
    """Load an AutoencoderKL from one checkpoint file (original or diffusers layout, any prefix).

    The architecture comes from, in order: `config`, the vaekit metadata in the file, the tensor shapes.
    """
    tensors, metadata = read_checkpoint(path)
    state_dict = strip_prefix(tensors)
    if not is_original_layout(state_dict):
        if not any(k.startswith("encoder.down_blocks.") for k in state_dict):
            first = ", ".join(list(tensors)[:3]) or "none"
            raise VaekitError(
                f"{path} does not hold an AutoencoderKL (first keys: {first}). Pass a VAE checkpoint, or a full "
                f"Stable Diffusion checkpoint whose VAE keys start with 'first_stage_model.'."
            )
        state_dict = to_original(state_dict)
    if config is None and METADATA_KEY in metadata:
        config = json.loads(metadata[METADATA_KEY])
    base = config if config is not None else infer_config(state_dict)
    vae = AutoencoderKL(**make_config({k: v for k, v in base.items() if not k.startswith("_")}, overrides))
    return load_state_dict_checked(vae, to_diffusers(state_dict), str(path)).eval()


def save_single_file(vae, path, dtype=None):
    """Write one .safetensors in the original layout, the exact config kept in its metadata."""
    state_dict = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in vae.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(vae_config(vae)), "format": "pt"}
    save_safetensors(to_original(state_dict), path, metadata=metadata)
    return Path(path)
