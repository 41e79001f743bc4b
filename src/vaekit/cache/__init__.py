"""Latent caches: bulk encoding of image data sets, the cache format, and reading it back for diffusion training.

- `config`: EncodeConfig (no torch, for the command line);
- `format`: the folder layout (format 2.1: units with Arrow indices, checksums), card, catalog, crash recovery;
- `reader`: the checked reader every read goes through (one VaekitError naming the unit for any damage);
- `units`: how a source is cut into units, and the DataLoader stream that prepares them;
- `writer`: the background thread that writes a unit's parts and, last, its index, fenced by its lease;
- `encode`: `encode_dataset`, the resumable multi-process pipeline;
- `dataset`: `LatentDataset`, `LatentStream`, `BucketBatchSampler`, `collate_latents`, spot-check decodes;
- `verify`: `vaekit cache verify [--repair]`: every part hashed, damage moved aside and encoded again;
- `v1`, `migrate`: reading format-1 caches and converting them (`vaekit cache migrate`);
- `stats`: latent statistics and the scaling / shift factors they imply.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EncodeConfig": "config",
    "read_card": "format",
    "cache_entries": "reader",
    "verify_cache": "verify",
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
