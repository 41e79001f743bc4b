"""diffusers <-> original latent-diffusion ("single-file") key layout for AutoencoderKL.

The original layout is the one of CompVis/latent-diffusion's `ldm.modules.diffusionmodules.model`
(Encoder/Decoder with `down.{i}.block.{j}`, `mid.block_1`, `mid.attn_1` with 1x1-conv q/k/v/proj_out),
as stored in Stable Diffusion checkpoints and read by single-file tools. diffusers only ships the
ldm -> diffusers direction, inside its single-file loader; we need both directions for any
architecture, so the mapping is one table of key templates (`KEY_TEMPLATES`) read both ways.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from vaekit.errors import VaekitError
from vaekit.io import atomic_folder, save_safetensors
from vaekit.model.architecture import make_config, vae_config, vae_from_state_dict

METADATA_KEY = "vaekit_config"
PREFIXES = ("first_stage_model.", "vae.")

# Attention parameter names: diffusers' linear layers -> the original's 1x1 convolutions.
_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}

# Each row pairs a diffusers key (after `encoder.` / `decoder.`) with its original-layout key. A field
# `{name}` matches the same part in both; FIELDS says how its text changes between the layouts.
KEY_TEMPLATES = (
    ("down_blocks.{level}.resnets.{index}.{resnet}", "down.{level}.block.{index}.{resnet}"),
    ("up_blocks.{up_level}.resnets.{index}.{resnet}", "up.{up_level}.block.{index}.{resnet}"),
    ("down_blocks.{level}.downsamplers.0.{tail}", "down.{level}.downsample.{tail}"),
    ("up_blocks.{up_level}.upsamplers.0.{tail}", "up.{up_level}.upsample.{tail}"),
    ("mid_block.resnets.{mid_index}.{resnet}", "mid.block_{mid_index}.{resnet}"),
    ("mid_block.attentions.0.{attention}.{param}", "mid.attn_1.{attention}.{param}"),
    ("conv_norm_out.{tail}", "norm_out.{tail}"),
)


def _attention_name(table, layout):
    """A field conversion through `table`, with a clear error for a name it does not know."""
    def convert(text, levels):
        if text not in table:
            raise VaekitError(f"Unexpected attention parameter '{text}' in a {layout} AutoencoderKL state dict.")
        return table[text]
    return convert


def _same(text, levels):
    return text


def _flip_level(text, levels):
    # diffusers numbers decoder blocks from the lowest resolution, the original from the highest.
    return str(levels - 1 - int(text))


# field -> (regex in the diffusers key, regex in the original key, to_original(text, levels), to_diffusers(text, levels))
FIELDS = {
    "level": (r"\d+", r"\d+", _same, _same),
    "up_level": (r"\d+", r"\d+", _flip_level, _flip_level),
    "index": (r"\d+", r"\d+", _same, _same),
    "mid_index": (r"\d+", r"\d+", lambda t, n: str(int(t) + 1), lambda t, n: str(int(t) - 1)),
    "resnet": (r".+", r".+", lambda t, n: t.replace("conv_shortcut", "nin_shortcut"),
               lambda t, n: t.replace("nin_shortcut", "conv_shortcut")),
    "attention": (r"[\w.]+?", r"\w+", _attention_name(_ATTENTION, "diffusers"),
                  _attention_name({v: k for k, v in _ATTENTION.items()}, "original-layout")),
    "param": (r"weight|bias", r"weight|bias", _same, _same),
    "tail": (r".+", r".+", _same, _same),
}


def _compile(template, side):
    """A regex for one template in one layout (side 0: diffusers, 1: original), its fields as named groups."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{FIELDS[p][side]})" for i, p in enumerate(parts))
    return re.compile(pattern)


_COMPILED = [(_compile(d, 0), _compile(o, 1), d, o) for d, o in KEY_TEMPLATES]


def _map_key(key, levels, to_original):
    """One key in the other layout; keys no template matches (conv_in, conv_out, quant convs) keep their name."""
    side, dot, rest = key.partition(".")
    if side not in ("encoder", "decoder") or not dot:
        return key
    for diffusers_re, original_re, diffusers_t, original_t in _COMPILED:
        match = (diffusers_re if to_original else original_re).fullmatch(rest)
        if match:
            convert = 2 if to_original else 3
            values = {name: FIELDS[name][convert](text, levels) for name, text in match.groupdict().items()}
            return f"{side}." + (original_t if to_original else diffusers_t).format(**values)
    return key


def diffusers_key_to_original(key, levels):
    """One diffusers key in the original layout; `levels` is len(block_out_channels)."""
    return _map_key(key, levels, to_original=True)


def original_key_to_diffusers(key, levels):
    """One original-layout key in diffusers' layout; `levels` is the number of resolution levels."""
    return _map_key(key, levels, to_original=False)


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
        config = metadata_config(metadata[METADATA_KEY], path)
    base = config if config is not None else infer_config(state_dict)
    config = make_config({k: v for k, v in base.items() if not k.startswith("_")}, overrides, source=path)
    return vae_from_state_dict(config, to_diffusers(state_dict), str(path))


def metadata_config(text, path):
    """The architecture JSON stored in a single file's metadata, checked to be a JSON mapping."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise VaekitError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON ({e}). Re-export the file, or "
                          f"load it without the metadata by converting it with another tool.") from None
    if not isinstance(config, dict):
        raise VaekitError(f"{path}: the '{METADATA_KEY}' metadata must be a JSON mapping of AutoencoderKL fields, "
                          f"got {type(config).__name__}.")
    return config


def config_folder(path):
    """Where the diffusers config of a single-file export goes: `vae.safetensors` -> `vae_config/`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_config")


def save_single_file(vae, path, dtype=None):
    """Write one .safetensors in the original layout, the exact config in its metadata and in `<stem>_config/`.

    diffusers' `AutoencoderKL.from_single_file` cannot read vaekit's metadata: without `config=` it
    takes any standalone VAE file for SD 1.x and fetches that config from the hub. The folder beside
    the file holds the matching diffusers config.json, so `from_single_file(path, config=folder)`
    loads the exact architecture offline.
    """
    state_dict = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in vae.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(vae_config(vae)), "format": "pt"}
    save_safetensors(to_original(state_dict), path, metadata=metadata)
    with atomic_folder(config_folder(path)) as tmp:
        vae.save_config(str(tmp))
    return Path(path)
