"""The one place that resolves devices, processes and dtypes.

- `resolve_device("auto" | "cpu" | "cuda" | "cuda:N")` for single-process commands;
- `launched_processes()`, `needs_cpu_collectives()` and `process_state()` for runs started by
  `torchrun` or `accelerate launch` (Accelerate's PartialState, told to use gloo on a machine
  without an accelerator);
- `DTYPES` (the names configs and flags use) and `resolve_compute_dtype` for inference precision.
"""

import os

import torch

from vaekit.errors import VaekitError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def has_accelerator():
    """Whether torch sees a GPU (or another accelerator) to run on."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def resolve_device(name="auto"):
    """torch.device for `auto`, `cpu`, `cuda`, `cuda:N`; a clear error for an unavailable GPU."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VaekitError(f"Unknown device '{name}'. Use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaekitError(f"--device {name} asked for a GPU but CUDA is not available here. Use --device cpu.")
    return device


def launched_processes():
    """How many processes the launcher (torchrun, accelerate launch) started; 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_cpu_collectives():
    """True when several processes were launched on a machine without an accelerator.

    Accelerate must then be told `cpu=True` to use gloo; otherwise it starts N unaware single-process runs.
    """
    return launched_processes() > 1 and not has_accelerator()


def process_state():
    """Accelerate's PartialState: rank, world size and device of this process (one process when run plainly)."""
    from accelerate import PartialState  # accelerate is slow to import; only multi-process jobs need it

    return PartialState(cpu=needs_cpu_collectives())


def synchronize(device):
    """Wait for queued GPU work, so timings measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX), where oneDNN runs bf16 convolutions
    about twice as fast as fp32; elsewhere bf16 is emulated and slower."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_compute_dtype(name, device):
    """The dtype inference runs in. auto: bf16 where the hardware has it (fp16 on CUDA without it), else fp32.

    Bulk caching is throughput-bound and the cache is stored in fp16 or bf16 anyway; a batch that
    overflows is redone in fp32 (vaekit.codec). `fp32` gives bit-reproducible fp32.
    """
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32
