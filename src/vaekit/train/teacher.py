"""The frozen teacher a run learns from: any model argument, loaded once, never trained, never checkpointed."""

import torch

from vaekit.model.load import load_vae


def load_teacher(spec, device, dtype=torch.float32):
    """The model argument `spec` as a teacher: on `device` in `dtype`, eval mode, every parameter frozen.

    A run reloads its teacher from the same argument when it resumes; checkpoints never hold it.
    """
    teacher = load_vae(spec, device=device, dtype=dtype)
    return teacher.eval().requires_grad_(False)
