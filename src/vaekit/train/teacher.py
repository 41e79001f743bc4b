"""A run's frozen teacher: a model loaded beside the one that trains, never trained and never saved in a checkpoint.

Distillation (vaekit.train.distill) learns from one; so does any recipe that keeps a trained model
close to where it started. Each process loads its own copy from the model argument, so a resumed
run loads it again (the checkpoint records its fingerprint to say whether it is the same one).
"""

import torch

from vaekit.model.architecture import cast_vae
from vaekit.model.load import load_vae


def load_teacher(spec, device, dtype=torch.float32, weights="ema"):
    """The model `spec` names, frozen: eval mode, no gradients, on `device` in `dtype`.

    Presets are built with seed 0, as `vaekit encode` builds them, so a preset teacher is the same
    model in every process, in every run and in a cache encoded from it. `weights` picks the EMA or
    raw weights of a training checkpoint. Run it in fp32, or bf16 (fp32's range): fp16 overflows in
    SDXL-class VAEs.
    """
    teacher = load_vae(spec, weights=weights, seed=0)
    teacher.requires_grad_(False).eval()
    return cast_vae(teacher, device=device, dtype=dtype)
