"""`vaekit cache migrate`: convert a format-1 cache (per-image JSON manifests) to format 2 in place.

No image is read and no latent recomputed: each format-1 shard becomes one unit whose part holds
the shard's current latents (an image and its mirror side by side). The new card is put in place
last, so a kill at any point leaves either the complete format-1 cache (migrate again) or the
complete format-2 one (whose leftover format-1 files the next migrate removes).
"""

import shutil
from pathlib import Path

import torch

from vaekit.cache import v1
from vaekit.cache.format import (FORMAT_MINOR, FORMAT_VERSION, INDEX_COLUMNS, bucket_name, card_hash, catalog_row,
                                 index_path, index_table, list_units, new_token, part_digest, part_name, publish,
                                 read_card, read_unit_meta, unit_files, unit_schema, write_catalog, write_index)
from vaekit.errors import VaekitError
from vaekit.io import ensure_folder, save_safetensors, write_json


def remove_v1_files(cache_dir):
    """Delete what format 1 kept (manifests, per-rank error lists, shards/, its lock file)."""
    cache_dir = Path(cache_dir)
    for pattern in ("manifest-*.jsonl", "errors-*.jsonl", ".lock"):
        for path in cache_dir.glob(pattern):
            path.unlink(missing_ok=True)
    shutil.rmtree(cache_dir / "shards", ignore_errors=True)


def migrate_cache(cache_dir):
    """Convert the format-1 cache at `cache_dir`; returns {"units", "images", "samples"}."""
    cache_dir = Path(cache_dir)
    card = read_card(cache_dir)
    if card.get("version") == FORMAT_VERSION:
        remove_v1_files(cache_dir)  # a migration killed after its card was in place
        units = list_units(cache_dir)
        return {"units": len(units), "images": sum(int(read_unit_meta(p)["rows"]) for p in units.values()),
                "samples": None, "already": True}
    if card.get("version") != v1.VERSION:
        raise VaekitError(f"{cache_dir} is a cache of format {card.get('version')}; migrate converts format 1 only.")
    shutil.rmtree(cache_dir / "units", ignore_errors=True)  # what a killed migration left
    ensure_folder(cache_dir / "units")
    entries = v1.current_entries(v1.read_manifests(cache_dir))
    images = {}
    for entry in entries:  # the plain and the mirrored entry of an image become one index row
        images.setdefault(entry["key"], {})[bool(entry["flip"])] = entry
    by_shard = {}  # an image goes to the unit of its plain entry's shard
    for key, variants in images.items():
        by_shard.setdefault((variants.get(False) or variants[True])["shard"], {})[key] = variants
    reader, token, catalog, images = v1.ShardReader(cache_dir), new_token(), [], 0
    store = card["key"]["store"]
    new_card = {**card, "version": FORMAT_VERSION, "minor": FORMAT_MINOR,
                "units": {"kind": "migrated", "unit_size": None, "source": f"format-1 cache ({len(by_shard)} shards)"}}
    identity = card_hash(new_card)
    for unit, shard in enumerate(sorted(by_shard)):
        rows = write_unit(cache_dir, unit, by_shard[shard], reader, token, store, identity)
        catalog.append(catalog_row(unit, *unit_schema(index_path(cache_dir, unit))))
        images += rows
    write_catalog(cache_dir, catalog, {"generation": 1, "writer": "migrate", "card_hash": identity, "card": new_card})
    write_json(cache_dir / "card.json", new_card)  # the switch: from here on the cache is format 2
    remove_v1_files(cache_dir)
    return {"units": len(catalog), "images": images, "samples": len(entries), "already": False}


def write_unit(cache_dir, unit, images, reader, token, store, identity):
    """One unit from the images ({key: {flip: entry}}) of one format-1 shard; returns its image count."""
    groups, rows = {}, []
    for key in sorted(images):
        variants = images[key]
        plain = variants.get(False) or variants[True]
        group = groups.setdefault(bucket_name(*plain["bucket"]), {"mean": [], "logvar": []})
        offsets = []
        for flip in (False, True):
            if flip in variants:
                offsets.append(len(group["mean"]))
                group["mean"].append(reader.row(variants[flip], "mean"))
                if store == "mean_logvar":
                    group["logvar"].append(reader.row(variants[flip], "logvar"))
            else:
                offsets.append(-1)
        (ow, oh), (rw, rh), box = plain["original_size"], plain["resized_size"], plain["crop_box"]
        values = [key, plain.get("path"), bytes.fromhex(plain["sha256"]), 0, plain["bucket"][0], plain["bucket"][1],
                  offsets[0] if offsets[0] >= 0 else offsets[1], offsets[1] if offsets[0] >= 0 else -1,
                  ow, oh, rw, rh, *box]
        rows.append(dict(zip(INDEX_COLUMNS, values)))
    name = part_name(unit, 0, token)
    tensors = {f"{kind}/{group}": torch.stack(data[kind]) for group, data in groups.items()
               for kind in ("mean", "logvar") if data[kind]}  # (N, C, h, w)
    first = next(iter(images.values()))
    label = f"format-1 {(first.get(False) or first[True])['shard']}"
    with unit_files(cache_dir, unit) as staging:
        save_safetensors(tensors, staging / name, metadata={"count": str(sum(len(d["mean"]) for d in groups.values()))})
        meta = {"format": FORMAT_VERSION, "unit": unit, "label": label, "signature": "migrated", "token": token,
                "parts": [name], "part_files": [{"name": name, **part_digest(staging / name)}], "rows": len(rows),
                "card": identity, "errors": []}
        publish(staging / name, cache_dir / "units" / name)
        write_index(staging / "index.arrow", index_table(rows, meta))
        publish(staging / "index.arrow", index_path(cache_dir, unit))
    return len(rows)
