"""What the benchmark scripts share: timing, peak memory, the machine they ran on, and markdown rows.

A script imports it from beside itself (`sys.path` holds the script's folder when it runs as
`python scripts/NAME.py`; a script loaded another way adds it first). Torch is imported inside the
functions that need it, so gpu_bench.py can import this before it has checked that torch loads.
"""

import contextlib
import gc
import platform
import statistics
import sys
import time
from pathlib import Path


def log(text):
    """Progress to stderr, so stdout carries only the table."""
    print(text, file=sys.stderr, flush=True)


def fmt(value, spec):
    """A number formatted, or an en dash for a missing one."""
    return "–" if value is None else format(value, spec)


def markdown_table(columns, rows):
    """A markdown table: `columns` is [(title, align)] with align "l" or "r", `rows` lists of cell texts."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |",
             "|" + "|".join("---:" if align == "r" else "---" for _, align in columns) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, or what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def is_oom(error):
    """Whether an exception is the CUDA allocator running out of memory."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def error_text(error):
    """How a row records a failure: "OOM", or the exception's type and first line."""
    if is_oom(error):
        return "OOM"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


# ----------------------------------------------------------------------------------------------
# Devices: synchronisation and memory


def sync(device):
    """Wait for queued GPU work, so a wall-clock interval covers it."""
    import torch  # see the module docstring

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_memory_bytes(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssAnon) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_memory(device):
    """Start a new peak-memory window: CUDA allocator peak, or the process's peak RSS on Linux."""
    import torch  # see the module docstring

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current RSS (Linux >= 4.0)


def peak_memory_mib(device):
    """Peak memory since reset_peak_memory: torch.cuda.max_memory_allocated, or the process's peak RSS."""
    import torch  # see the module docstring

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, StopIteration):
        return process_memory_bytes("VmHWM") / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_memory_mib(device):
    """Memory in use now: torch.cuda.memory_allocated, or the process's RSS."""
    import torch  # see the module docstring

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return process_memory_bytes("VmRSS") / 2**20


def free_memory(device):
    """Drop freed tensors so the next row starts from the same memory state."""
    import torch  # see the module docstring

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Timing


def time_calls(fn, device, warmup, repeats, graphs=False):
    """(median seconds, first-call seconds, peak MiB, last output) of `fn` after `warmup` untimed calls."""
    import torch  # see the module docstring

    first = None
    for i in range(max(1, warmup)):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    reset_peak_memory(device)
    times, out = [], None
    for _ in range(repeats):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = peak_memory_mib(device)
    # A CUDA-graph replay overwrites its output buffer on the next call, so keep a copy of this one.
    out = out.detach().clone() if torch.is_tensor(out) else out
    return statistics.median(times), first, peak, out


def interleaved_times(runs, device, warmup=1, repeats=3):
    """Time `runs` ({name: fn}) in turn, round after round, so every one sees the same machine state.

    Returns ({name: [seconds of each timed round]}, {name: seconds of its first call}); the first
    `warmup` rounds are not timed.
    """
    times, first = {name: [] for name in runs}, {}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            seconds = time.perf_counter() - start
            first.setdefault(name, seconds)
            if round_ >= warmup:
                times[name].append(seconds)
        log(f"round {round_ + 1} of {warmup + repeats}: "
            + ", ".join(f"{name} {(times[name] or [first[name]])[-1]:.3f} s" for name in runs))
    return times, first


def write_synthetic_unit(out, unit, token, card, latents, keys, bucket, original, label="", signature=""):
    """One unit of a format-2 cache as `vaekit encode` writes it, from made-up latents (no VAE, no images).

    One part holding `latents` (N, C, h, w) as both mean and logvar in the (W, H) `bucket`, checksums
    included, and the unit's index naming the images `keys` (each `original` (W, H) in size); returns
    the index's path. For the cache benchmarks, which need caches of 10^5-10^6 images in seconds.
    """
    from vaekit.cache.format import FORMAT_VERSION, card_hash, index_path, index_table, part_digest, write_index
    from vaekit.io import save_safetensors

    count, (width, height) = len(latents), bucket
    part = f"u-{unit:08d}.p000.{token}.safetensors"
    save_safetensors({f"mean/{width}x{height}": latents, f"logvar/{width}x{height}": latents.clone()},
                     Path(out) / "units" / part, metadata={"count": str(count)})
    rows = [{"key": key, "path": None, "sha256": bytes(32), "part": 0, "bucket_w": width, "bucket_h": height,
             "offset": i, "flip_offset": -1, "original_w": original[0], "original_h": original[1],
             "resized_w": width, "resized_h": height, "crop_left": 0, "crop_top": 0, "crop_right": width,
             "crop_bottom": height} for i, key in enumerate(keys)]
    meta = {"format": FORMAT_VERSION, "unit": unit, "label": label or f"unit {unit}", "signature": signature,
            "token": token, "parts": [part], "part_files": [{"name": part, **part_digest(Path(out) / "units" / part)}],
            "rows": count, "card": card_hash(card), "errors": [], "retry": False}
    path = index_path(out, unit)
    write_index(path, index_table(rows, meta))
    return path


def chosen(text, known, what="variant"):
    """The names of a comma-separated `--variants`-style list, each one of `known`; exits naming the first unknown."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    return names
