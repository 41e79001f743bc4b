"""Training checkpoints: one folder per step, written and read by the functions of this module only.

    checkpoint-NNNNNN/
      meta.json            format, step, resolved config, VAE class and config, data position, loop counters,
                           scheduler / EMA / grad-scaler state (plain JSON: never a pickled object)
      vae.safetensors      the raw VAE weights
      ema.safetensors      the EMA weights (when EMA is on): what exports use
      disc.safetensors     the discriminator (when it is on)
      align.safetensors    the latent-alignment projection (when loss.align_weight > 0)
      fp16_best.safetensors  model.mode=fp16_safe: the trained parameters of the check with headroom closest to
                           the original, which the run exports (once a check had headroom)
      optimizer.pt         optimizer states, {"vae": ..., "disc": ...}, read with weights_only=True
      rng.pt               Python, numpy and torch RNG states, read with weights_only=True

A checkpoint is written into a temporary folder and renamed into place whole, so a folder named
checkpoint-NNNNNN is always complete. `load_checkpoint_vae` turns one into an AutoencoderKL (or the
AutoencoderTiny of a distillation run) without the trainer, which is how model arguments load
checkpoints. A distillation run's teacher is never part of a checkpoint: it is loaded again from
`distill.teacher`, and its fingerprint in meta.json says whether it is the same one.
"""

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from vaekit.errors import VaekitError
from vaekit.io import atomic_folder, atomic_path, save_safetensors, write_json
from vaekit.model.architecture import make_config, vae_from_state_dict
from vaekit.model.tiny import make_tiny_config, tiny_from_state_dict

CHECKPOINT_FORMAT = "vaekit-train-checkpoint"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = {"vae": "vae.safetensors", "ema": "ema.safetensors", "disc": "disc.safetensors",
                "align": "align.safetensors", "fp16_best": "fp16_best.safetensors"}


@dataclass
class Checkpoint:
    """What one checkpoint folder holds; a weights entry is None when the run had no such part."""

    path: Path
    meta: dict
    weights: dict  # "vae" / "ema" / "disc" / "align" -> state dict of CPU tensors, or None
    optimizers: dict  # "vae" / "disc" -> optimizer state dict ({} when absent)
    rng: dict


def checkpoint_path(out_dir, step):
    """The folder of the checkpoint of `step` in a run folder."""
    return Path(out_dir) / f"checkpoint-{step:06d}"


def save_checkpoint(out_dir, step, weights, optimizers, rng, meta):
    """Write checkpoint-<step>/ atomically and return its path; the inverse of `load_checkpoint`.

    `weights`: "vae" / "ema" / "disc" / "align" -> state dict (None entries are left out); `optimizers`: a dict
    of optimizer state dicts; `rng`: `rng_state()`; `meta`: the JSON-safe rest (step and format added).
    """
    final = checkpoint_path(out_dir, step)
    with atomic_folder(final) as tmp:
        for name, state in weights.items():
            if state is not None:
                save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, tmp / WEIGHT_FILES[name])
        with atomic_path(tmp / "optimizer.pt") as path:
            torch.save(optimizers, path)
        with atomic_path(tmp / "rng.pt") as path:
            torch.save(rng, path)
        write_json(tmp / "meta.json", {"format": CHECKPOINT_FORMAT, "step": step, **meta})
    return final


def load_checkpoint(path):
    """Read every part of a checkpoint folder on the CPU; the inverse of `save_checkpoint`.

    Tensors are loaded onto the CPU: `optimizer.load_state_dict` moves its state to the parameters'
    device itself, so a checkpoint restores on any launcher and device.
    """
    path = Path(path)
    meta = read_meta(path)
    weights = {name: load_file(str(path / file)) if (path / file).is_file() else None
               for name, file in WEIGHT_FILES.items()}
    optimizers = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    return Checkpoint(path, meta, weights, optimizers, rng)


def rng_state():
    """Python, numpy and torch RNG states in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() saved."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir):
    """Finished checkpoint folders under `out_dir`, oldest step first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / "meta.json").is_file()]


def prune_checkpoints(out_dir, keep_last):
    """Delete the oldest checkpoints beyond `keep_last` (0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume, out_dir):
    """`latest` -> newest checkpoint in out_dir (None when there is none), or a checked PATH."""
    if resume in (None, ""):
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise VaekitError(f"--resume {resume}: not a training checkpoint (no meta.json). Pass a checkpoint-NNNNNN "
                          f"folder or 'latest'.")
    return path


def is_training_checkpoint(folder):
    """Whether a folder looks like a vaekit training checkpoint."""
    return (Path(folder) / "meta.json").is_file() and (Path(folder) / WEIGHT_FILES["vae"]).is_file()


def read_meta(path):
    """meta.json of a training checkpoint, checked."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VaekitError(f"Cannot read {path}/meta.json ({e}); is this a vaekit training checkpoint?") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise VaekitError(f"{path}/meta.json is not a vaekit training checkpoint (format {found!r}).")
    return meta


def checkpoint_vae(meta, state_dict, source, overrides=None):
    """The model (eval mode) of the class and architecture in a checkpoint's meta, holding `state_dict`."""
    if meta.get("vae_class", "AutoencoderKL") == "AutoencoderTiny":
        return tiny_from_state_dict(make_tiny_config(meta["vae_config"], overrides, source=source), state_dict,
                                    str(source))
    return vae_from_state_dict(make_config(meta["vae_config"], overrides, source=source), state_dict, str(source))


def load_checkpoint_vae(path, weights="ema", overrides=None):
    """The trained model (eval mode) of a training checkpoint folder: EMA weights when it has them, or raw."""
    path = Path(path)
    meta = read_meta(path)
    if weights not in ("ema", "raw"):
        raise VaekitError(f"weights must be 'ema' or 'raw', got {weights!r}.")
    file = path / WEIGHT_FILES["ema"]
    if weights == "raw" or not file.is_file():
        file = path / WEIGHT_FILES["vae"]
    return checkpoint_vae(meta, load_file(str(file)), file, overrides)
