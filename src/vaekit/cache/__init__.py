"""Latent caches: bulk encoding of image data sets, the cache format, and reading it back for diffusion training.

- `config`: EncodeConfig (no torch, for the command line);
- `format`: the folder layout, card, manifests, shards, crash recovery: writer and reader side by side;
- `encode`: `encode_dataset`, the resumable multi-process pipeline;
- `dataset`: `LatentDataset`, `BucketBatchSampler`, `collate_latents`, spot-check decodes;
- `stats`: latent statistics and the scaling / shift factors they imply.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EncodeConfig": "config",
    "read_card": "format",
    "encode_dataset": "encode",
    "LatentDataset": "dataset",
    "BucketBatchSampler": "dataset",
    "collate_latents": "dataset",
    "load_latents": "dataset",
    "decode_samples": "dataset",
    "LatentStream": "dataset",
    "LatentMoments": "stats",
    "latent_statistics": "stats",
    "suggest_normalization": "stats",
    "cache_statistics": "stats",
    "data_statistics": "stats",
    "write_normalization": "stats",
})
