"""Images in, tensors out.

- `config`: DataConfig and the option values (no torch, for the command line);
- `decode`: robust decoding to RGB, `ImageError` with a stable reason;
- `sources`: folders, Hugging Face data sets, WebDataset shards, builtin:photos as indexed Sources;
- `crops`: resizing, crops, aspect-ratio buckets, tensor conversion;
- `batching`: batches of decoded images for evaluation and inspection;
- `streaming`: WebDataset shards streamed for training, split by process and worker, resumable;
- `training`: the trainer's dataset of seeded random crops and the held-out split.
"""

from vaekit.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "DataConfig": "config",
    "ImageError": "decode",
    "decode_image": "decode",
    "Record": "sources",
    "Source": "sources",
    "open_source": "sources",
    "split_holdout": "sources",
    "Crop": "crops",
    "prepare_image": "crops",
    "resize_center_crop": "crops",
    "random_crop": "crops",
    "resize_random_crop": "crops",
    "make_buckets": "crops",
    "nearest_bucket": "crops",
    "resize_crop_to_bucket": "crops",
    "to_tensor": "crops",
    "to_pil": "crops",
    "StreamingImages": "streaming",
    "is_streamed": "streaming",
    "open_stream": "streaming",
    "TrainImageDataset": "training",
    "collate_stream": "training",
    "collate_images": "training",
    "build_train_val": "training",
})
