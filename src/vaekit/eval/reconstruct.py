"""Image files of any size, and the images in folders, through encode and decode to PNGs (`vaekit reconstruct`).

Each image goes through vaekit.codec: padded to the downsampling factor and cropped back, tiled
with image-wide GroupNorm statistics when asked (`tile="auto"` tiles when the untiled pass would not
fit the memory budget, or after an out-of-memory error), and a half-precision batch that overflows
is redone in fp32. tile_mode "fast" trades exactness for one pass of tiles; with a process group,
every process runs a share of each image's tiles and the first one writes the PNGs.
"""

import math
import time
import warnings
from pathlib import Path

from vaekit.codec.inference import encode_decode
from vaekit.codec.parallel import Processes
from vaekit.data.crops import to_pil, to_tensor
from vaekit.data.decode import ImageError, decode_image
from vaekit.data.sources import list_images
from vaekit.errors import VaekitError
from vaekit.eval.metrics import psnr
from vaekit.eval.report import save_png


def expand_inputs(paths):
    """[(image file, output path relative to --out, or None and the reason it is skipped)] for reconstruct's
    arguments, in order. A folder gives its images, found as an image folder source finds them
    (recursively; hidden, special and unreadable files skipped with their reason).

    The output of an input is its path relative to the folder its argument is in, as a .png: a
    file argument gives `<stem>.png`, a folder argument `<folder>/<path inside it>.png`, so
    `reconstruct corpus/* --out recon/` mirrors corpus/ in recon/.
    """
    entries = []
    for arg in map(Path, paths):
        if not arg.is_dir():  # a file, or something that will fail to read with its own reason
            entries.append((arg, Path(arg.name), None))
            continue
        name = Path(arg.name or arg.resolve().name)
        skipped = []
        try:
            found = list_images(arg, skipped)
        except VaekitError:
            entries.append((arg, None, "a folder without images"))
            continue
        entries.extend((path, name / path.relative_to(arg), None) for path in found)
        entries.extend((Path(item["path"]), None, item["reason"]) for item in skipped)
    return entries


def output_path(out, image, relative, used):
    """`out/relative` as a .png; when another input has it, the image's folder name is added, then a number."""
    path = Path(out) / relative.with_suffix(".png")
    stem = relative.stem
    if path in used:
        path = path.with_name(f"{Path(image).parent.name}_{stem}.png")
    index = 1
    while path in used:
        path = path.with_name(f"{stem}_{index}.png")
        index += 1
    used.add(path)
    return path


def reconstruct_files(vae, images, out, tile="auto", overlap=None, memory_budget=None, sample=False, seed=0,
                      tile_mode="exact", group=None):
    """Reconstruct each image file (and each image inside a folder) into `out`; yields one result dict per
    image, in order (see `expand_inputs` for folders and output names).

    A result has "image", and either "error" (it could not be read or decoded; it is skipped) or
    "path" (the PNG), "size" (W, H), "seconds", "psnr" (dB against the input) and "warnings" (e.g. an
    fp32 retry). With a process group, every process must call this with the same images; the group's
    rank 0 writes the PNGs, the other processes yield {"image": ...} only.
    """
    device = next(vae.parameters()).device
    processes = Processes(group)
    used = set()
    for image, relative, reason in expand_inputs(images):
        if reason is not None:
            yield {"image": image, "error": f"{image}: {reason}"}
            continue
        try:
            x, error = to_tensor(decode_image(image))[None].to(device), None  # (1, 3, H, W)
        except ImageError as e:
            x, error = None, str(e)
        # An image one process cannot read is skipped by all, so none waits for the others' tiles.
        if not processes.agree(error is None):
            yield {"image": image, "error": error or "not readable on every process"}
            continue
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = encode_decode(vae, x, sample, [seed], tile, overlap, memory_budget, tile_mode, group)
        seconds = time.perf_counter() - start
        if y is None:  # another process assembles the image
            yield {"image": image}
            continue
        path = output_path(out, image, relative, used)
        save_png(to_pil(y[0]), path)
        value = float(psnr(x.cpu(), y.cpu().clamp(-1, 1))[0])
        yield {"image": image, "path": path, "size": (x.shape[-1], x.shape[-2]), "seconds": seconds,
               "psnr": value if math.isfinite(value) else math.inf, "warnings": [str(w.message) for w in caught]}
