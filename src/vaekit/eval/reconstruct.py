"""Image files of any size through encode and decode to PNGs (`vaekit reconstruct`).

Each image goes through vaekit.codec: padded to the downsampling factor and cropped back, tiled
with image-wide GroupNorm statistics when asked (`tile="auto"` tiles when the untiled pass would not
fit the memory budget, or after an out-of-memory error), and a half-precision batch that overflows
is redone in fp32.
"""

import math
import time
import warnings
from pathlib import Path

from vaekit.codec.inference import encode_decode
from vaekit.data.crops import to_pil, to_tensor
from vaekit.data.decode import ImageError, decode_image
from vaekit.eval.metrics import psnr
from vaekit.eval.report import save_png


def output_path(out, image, used):
    """`out/<stem>.png`, with the parent folder's name added when two inputs share a stem."""
    path = Path(out) / f"{Path(image).stem}.png"
    if path in used:
        path = Path(out) / f"{Path(image).parent.name}_{Path(image).stem}.png"
    index = 1
    while path in used:
        path = Path(out) / f"{Path(image).stem}_{index}.png"
        index += 1
    used.add(path)
    return path


def reconstruct_files(vae, images, out, tile="auto", overlap=None, memory_budget=None, sample=False, seed=0):
    """Reconstruct each image file into `out`; yields one result dict per input, in order.

    A result has "image", and either "error" (the image could not be decoded) or "path" (the PNG),
    "size" (W, H), "seconds", "psnr" (dB against the input) and "warnings" (e.g. an fp32 retry).
    """
    device = next(vae.parameters()).device
    used = set()
    for image in images:
        try:
            x = to_tensor(decode_image(image))[None].to(device)  # (1, 3, H, W)
        except ImageError as e:
            yield {"image": image, "error": str(e)}
            continue
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = encode_decode(vae, x, sample, [seed], tile, overlap, memory_budget)
        seconds = time.perf_counter() - start
        path = output_path(out, image, used)
        save_png(to_pil(y[0]), path)
        value = float(psnr(x.cpu(), y.cpu().clamp(-1, 1))[0])
        yield {"image": image, "path": path, "size": (x.shape[-1], x.shape[-2]), "seconds": seconds,
               "psnr": value if math.isfinite(value) else math.inf, "warnings": [str(w.message) for w in caught]}
