"""Inference with a VAE: the one encode / decode entry, exact tiling, memory estimates and speed levers.

- `inference`: `encode`, `decode`, `encode_decode` for any image size (padding, tiling, fp32 retry),
  `tile_option` (the one check of tile options) and `BulkEncoder` for throughput;
- `tiling`: the exact tiled passes (stages, image-wide GroupNorm statistics, receptive-field context);
- `memory`: the untiled peak estimate, the memory budget and the choice of tile for tile="auto";
- `options`: tile and memory-budget values, parsed without torch;
- `levers`: channels-last, SDPA, fused upsampling, Triton GroupNorm+SiLU, torch.compile.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "encode": "inference",
    "decode": "inference",
    "encode_decode": "inference",
    "tile_option": "inference",
    "BulkEncoder": "inference",
    "optimize_vae": "levers",
})
