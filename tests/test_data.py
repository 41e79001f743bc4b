"""Tests for vaekit.data: decoding of bad and odd files, sources, crops, buckets, tensors and the training dataset."""

import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import imagegen
from vaekit.data import crops
from vaekit.config import from_dict
from vaekit.data.config import DataConfig
from vaekit.data.crops import (Crop, make_buckets, nearest_bucket, prepare_image, random_crop, resize_center_crop,
                               resize_crop_to_bucket, to_pil, to_tensor)
from vaekit.data.decode import ImageError, decode_image
from vaekit.data.sources import list_images, open_source, split_holdout
from vaekit.data.training import TrainImageDataset, build_train_val, collate_images
from vaekit.errors import VaekitError

torch.set_num_threads(1)


def pixels(img):
    """An image as an int array (H, W, 3) for exact comparisons."""
    return np.asarray(img, dtype=np.int16)


def assert_probes(img, odd, name):
    """Check size, mode and probe colours of a decoded odd image."""
    assert img.mode == "RGB", name
    assert img.size == odd.size, name
    for xy, colour in odd.probes.items():
        got = img.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, colour)) <= odd.tol, f"{name} at {xy}: {got} != {colour}"


# ---------------------------------------------------------------------------------------------- listing


def test_list_images_recursive_sorted_case_insensitive_skipping_hidden(tmp_path):
    for rel in ["b.png", "a/z.JPG", "a/y.webp", "c.TIFF", "d.gif", ".hidden.png", ".cache/x.png", "notes.txt", "e.bmp"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/y.webp", "a/z.JPG", "b.png", "c.TIFF", "d.gif", "e.bmp"]


def test_list_images_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VaekitError, match="not found.*nope"):
        list_images(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(VaekitError, match=f"No images found in {tmp_path}"):
        list_images(tmp_path)


# ---------------------------------------------------------------------------------------------- decoding


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    imagegen.write_bad_images(folder)
    return folder


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("odd")
    return folder, imagegen.write_odd_images(folder)


@pytest.mark.parametrize("name", sorted(imagegen.BAD_REASONS))
def test_bad_files_raise_image_error_with_reason(bad_dir, name):
    expected = imagegen.BAD_REASONS[name]
    for source in (bad_dir / name, (bad_dir / name).read_bytes()):
        with pytest.raises(ImageError) as info:
            decode_image(source)
        assert info.value.reason.startswith(expected), (name, info.value.reason)
        assert isinstance(info.value, VaekitError)
    assert str(bad_dir / name) in str(pytest.raises(ImageError, decode_image, bad_dir / name).value)


def test_odd_files_decode_to_rgb_with_correct_colours(odd_dir):
    folder, odd = odd_dir
    for name, expected in odd.items():
        img = decode_image(folder / name)
        assert_probes(img, expected, name)
        assert_probes(decode_image((folder / name).read_bytes()), expected, name)
        assert_probes(decode_image(Image.open(folder / name)), expected, name)


def test_alpha_is_composited_on_the_given_background(tmp_path):
    background = (0, 128, 255)
    odd = imagegen.write_odd_images(tmp_path, background=background)
    for name in ("rgba.png", "grey_alpha.png", "palette_transparent.png"):
        img = decode_image(tmp_path / name, background=background)
        assert_probes(img, odd[name], name)
        assert background in [c for _, c in img.getcolors()]


def test_sixteen_bit_and_float_greyscale_are_scaled_not_clipped():
    values = np.array([[0, 32768, 65535, 1000]], np.uint16)
    expected = [0, 128, 255, 4]  # Pillow's convert('L') would give [0, 255, 255, 255]
    for img in (Image.fromarray(values), Image.fromarray(values).convert("I"),
                Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())):
        out = decode_image(img)
        assert out.mode == "RGB"
        assert [out.getpixel((x, 0))[0] for x in range(4)] == expected, img.mode
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert [decode_image(floats).getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_premultiplied_and_lab_modes_convert_by_meaning():
    # 'La' (premultiplied grey 100 at alpha 128) is grey 199 straight; half over white gives 227.
    assert decode_image(Image.new("La", (2, 2), (100, 128))).getpixel((0, 0)) == (227, 227, 227)
    lab_red = decode_image(Image.new("LAB", (2, 2), (136, 208, 195))).getpixel((0, 0))  # L*=53 a*=80 b*=67
    assert lab_red[0] > 230 and max(lab_red[1:]) < 40


def test_exif_rotation_moves_the_red_corner(odd_dir):
    folder, _ = odd_dir
    stored = Image.open(folder / "exif_rotated.jpg")
    assert stored.size == (40, 24) and stored.convert("RGB").getpixel((3, 3))[0] > 200  # red top-left as stored
    shown = decode_image(folder / "exif_rotated.jpg")
    assert shown.size == (24, 40)
    assert shown.getpixel((21, 3))[0] > 200 and shown.getpixel((3, 3))[0] < 40  # red now top-right


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # 12000^2 = 144 MP is above our default but below Pillow's hard limit: our check must catch it.
    # The file holds only a few bytes of pixel data, so decoding would have failed as truncated.
    with pytest.raises(ImageError, match=r"too many pixels \(144000000 > 134217728\)"):
        decode_image(imagegen.bomb_png_bytes(12000, 12000))
    small = imagegen.encode(imagegen.make_photo(40, 24), "PNG")
    with pytest.raises(ImageError) as info:
        decode_image(small, max_pixels=500)
    assert info.value.reason == "too many pixels (960 > 500)"
    assert decode_image(small, max_pixels=None).size == (40, 24)
    assert decode_image(small, max_pixels=960).size == (40, 24)


def test_truncation_is_detected_and_pillow_flag_untouched(bad_dir):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageError, match="truncated image"):
        decode_image(bad_dir / "truncated.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_missing_file_is_an_image_error_that_pickles(tmp_path):
    with pytest.raises(ImageError) as info:
        decode_image(tmp_path / "gone.png")
    assert info.value.reason == "file not found"
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reason, copy.where, str(copy)) == (info.value.reason, info.value.where, str(info.value))


def test_rgb_image_is_returned_unchanged_as_a_copy():
    img = imagegen.make_photo(20, 10)
    out = decode_image(img)
    assert out is not img and np.array_equal(pixels(out), pixels(img))


# ---------------------------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    """Four images in a folder (two in a sub-folder), as (folder, [(relative path, PIL image)])."""
    folder = tmp_path_factory.mktemp("photos")
    items = []
    for i, rel in enumerate(["a/img_000.png", "a/img_001.jpg", "img_002.png", "img_003.webp"]):
        img = imagegen.make_photo(36 + 4 * i, 30, seed=i)
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {".jpg": {"quality": 90}, ".webp": {"lossless": True}}.get(path.suffix, {})
        img.save(path, **params)
        items.append((rel, img))
    return folder, items


def write_tar(path, members):
    """An uncompressed tar of {name: bytes}, in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def decoded(source):
    """{key: pixel array} of every record of a source."""
    return {record.key: pixels(record.decode()) for record in source}


def test_folder_hf_and_webdataset_sources_agree(photo_set, tmp_path):
    import datasets

    folder, items = photo_set
    raw = {rel: (folder / rel).read_bytes() for rel, _ in items}

    folder_source = open_source(folder)
    assert folder_source.keys() == sorted(raw)
    assert folder_source[0].path == str((folder / "a/img_000.png").resolve())
    by_folder = decoded(folder_source)

    table = {"image": [{"bytes": b, "path": None} for b in raw.values()], "name": list(raw), "caption": ["c"] * 4}
    features = datasets.Features({"image": datasets.Image(), "name": datasets.Value("string"),
                                  "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    hf_source = open_source(tmp_path / "hf", key_column="name")
    assert hf_source.description.startswith("Hugging Face") and hf_source[0].path is None
    assert {k: v.tolist() for k, v in decoded(hf_source).items()} == {k: v.tolist() for k, v in by_folder.items()}
    assert open_source(tmp_path / "hf").keys() == ["train/0", "train/1", "train/2", "train/3"]

    # WebDataset: key = member name up to the first dot of its basename; one image field per sample.
    members = {}
    for rel, payload in raw.items():
        stem = rel.rsplit(".", 1)[0]
        members[rel] = payload
        members[f"{stem}.txt"] = b"a caption"
    write_tar(tmp_path / "shard.tar", members)
    wds_source = open_source(tmp_path / "shard.tar")
    assert wds_source.keys() == [rel.rsplit(".", 1)[0] for rel in raw]
    assert {k: v.tolist() for k, v in decoded(wds_source).items()} == {
        k.rsplit(".", 1)[0]: v.tolist() for k, v in by_folder.items()}


def test_hf_splits_columns_and_local_load_dataset(photo_set, tmp_path, monkeypatch):
    import datasets

    folder, items = photo_set
    raw = [(folder / rel).read_bytes() for rel, _ in items]
    ds = datasets.Dataset.from_dict({"jpg": raw[:2], "label": [0, 1]})  # plain binary column, found by name
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert open_source(tmp_path / "dd").keys() == ["train/0", "train/1"]
    test_split = open_source(tmp_path / "dd", split="test")
    assert test_split.keys() == ["test/0"]
    assert np.array_equal(pixels(test_split[0].decode()), pixels(decode_image(raw[1])))
    with pytest.raises(VaekitError, match="no split 'validation'"):
        open_source(tmp_path / "dd", split="validation")
    with pytest.raises(VaekitError, match="no column 'pixels'"):
        open_source(tmp_path / "dd", image_column="pixels")
    datasets.Dataset.from_dict({"label": [1, 2]}).save_to_disk(str(tmp_path / "noimg"))
    with pytest.raises(VaekitError, match="No image column"):
        open_source(tmp_path / "noimg")

    # A local folder that datasets.load_dataset reads (its imagefolder builder), asked for explicitly.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "imagefolder" / "train").mkdir(parents=True)
    for i, (rel, img) in enumerate(items[:3]):
        img.save(tmp_path / "imagefolder" / "train" / f"{i}.png")
    loaded = open_source(tmp_path / "imagefolder", source="hf")
    assert len(loaded) == 3 and loaded.keys()[0] == "train/0"
    assert loaded[0].decode().size in {img.size for _, img in items[:3]}
    # A single parquet file with an Image column is detected as a data set and read locally.
    features = datasets.Features({"picture": datasets.Image()})
    datasets.Dataset.from_dict({"picture": [{"bytes": raw[2], "path": None}]}, features=features).to_parquet(
        str(tmp_path / "one.parquet"))
    parquet = open_source(tmp_path / "one.parquet")
    assert parquet.keys() == ["train/0"]
    assert np.array_equal(pixels(parquet[0].decode()), pixels(decode_image(raw[2])))


def test_hf_hub_name_offline_fails_with_a_clear_message(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(VaekitError, match="save_to_disk"):
        open_source("someone/some-images")


def test_webdataset_shard_folders_patterns_and_errors(photo_set, tmp_path):
    folder, items = photo_set
    raw = [(folder / rel).read_bytes() for rel, _ in items]
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "part-000.tar", {"s0.jpg": raw[1], "s0.json": b"{}", "s1.png": raw[0]})
    write_tar(shards / "part-001.tar", {"s2.png": raw[2], "s2.seg.png": raw[3], "s0.png": raw[3]})
    by_dir = open_source(shards)
    by_pattern = open_source(str(shards / "part-{000..001}.tar"))
    # s0 repeats in the second shard: it keeps its image under a key that names its shard (listed as renamed).
    assert by_dir.keys() == by_pattern.keys() == ["s0", "s1", "s2", "s0@part-001.tar"]
    assert [(r["key"], r["detail"]) for r in by_dir.renamed] == [
        ("s0", "stored as s0@part-001.tar: the earlier shard part-000.tar has the key s0")]
    assert by_dir[2].read_bytes() == raw[2]  # the plain .png field, not the .seg.png one
    assert open_source(shards, image_column="seg.png").keys() == ["s2"]
    with pytest.raises(VaekitError, match="Shard not found"):
        open_source(str(shards / "part-{000..002}.tar"))
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as tar:
        tar.add(shards / "part-000.tar", "x.png")
    with pytest.raises(VaekitError, match="uncompressed"):
        open_source(tmp_path / "packed.tar.gz", source="webdataset")


def test_builtin_photos_are_offline_colour_photos():
    source = open_source("builtin:photos")
    keys = source.keys()
    assert len(keys) >= 8 and "skimage/astronaut" in keys and "skimage/coffee" in keys
    assert all(k.startswith("skimage/") for k in keys) and len(set(keys)) == len(keys)
    astronaut = source[keys.index("skimage/astronaut")].decode()
    assert astronaut.size == (512, 512)
    spread = np.asarray(astronaut, np.float32).std(axis=2).mean()
    assert spread > 5  # colour, not greyscale copied into three channels
    with pytest.raises(VaekitError, match="builtin:photos"):
        open_source("builtin:cats")


def test_missing_spec_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(VaekitError, match="Data not found"):
        open_source(tmp_path / "nothing" / "here")
    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VaekitError, match="Data not found"):  # a local folder's typo, not a hub name
        open_source("photos/trian")


def test_sources_split_deterministically_and_pickle(photo_set):
    folder, _ = photo_set
    source = open_source(folder)
    world = 3
    shards = [source.subset(range(rank, len(source), world)) for rank in range(world)]
    assert sorted(k for shard in shards for k in shard.keys()) == sorted(source.keys())
    assert shards[1].keys() == [source.keys()[1]]
    copy = pickle.loads(pickle.dumps(shards[0]))
    assert copy.keys() == shards[0].keys() and copy[1].read_bytes() == shards[0][1].read_bytes()
    train, held = split_holdout(source, 0.25, seed=3)
    again_train, again_held = split_holdout(open_source(folder), 0.25, seed=3)
    assert len(held) == 1 and held.keys() == again_held.keys() and train.keys() == again_train.keys()
    assert set(train.keys()).isdisjoint(held.keys())
    assert len(split_holdout(source, 2)[1]) == 2 and len(split_holdout(source, 0)[1]) == 0
    with pytest.raises(VaekitError, match="none to train"):
        split_holdout(source, 4)


# ---------------------------------------------------------------------------------------------- geometry


def test_resize_center_crop_box_is_in_resized_coordinates():
    img = imagegen.make_photo(96, 64)
    out, crop = resize_center_crop(img, 32)
    assert out.size == (32, 32)
    assert crop == Crop((96, 64), (48, 32), (8, 0, 40, 32))
    assert crop.scale == 0.5 and crop.box_in_original() == (16.0, 0.0, 80.0, 64.0)
    reference = img.resize((48, 32), crops.RESAMPLE).crop(crop.box)
    assert np.abs(pixels(out) - pixels(reference)).max() <= 1
    wide, crop = resize_center_crop(img, (48, 16))  # non-square target: width fits, height cropped
    assert wide.size == (48, 16) and crop.resized_size == (48, 32) and crop.box == (0, 8, 48, 24)


def test_random_crop_is_native_resolution_and_seeded():
    img = imagegen.make_photo(80, 60)
    out, crop = random_crop(img, 32, np.random.default_rng(5))
    assert crop.resized_size == (80, 60) and crop.box[2] - crop.box[0] == 32
    assert np.array_equal(pixels(out), pixels(img.crop(crop.box)))
    again, crop_again = random_crop(img, 32, np.random.default_rng(5))
    assert crop_again == crop and np.array_equal(pixels(again), pixels(out))
    boxes = {random_crop(img, 32, np.random.default_rng(s))[1].box for s in range(20)}
    assert len(boxes) > 5
    _, resized = prepare_image(img, 32, "resize_random", np.random.default_rng(0))
    assert resized.resized_size == (43, 32) and 0 <= resized.box[0] <= 11 and resized.box[1] == 0


def test_random_crops_at_random_scales_scale_down_only_and_stay_seeded():
    img = imagegen.make_photo(400, 300)
    _, crop = prepare_image(img, 64, "random", np.random.default_rng(0), short_side=(150, 150))
    assert crop.resized_size == (200, 150) and crop.box[2] - crop.box[0] == 64
    _, crop = prepare_image(img, 64, "random", np.random.default_rng(0), short_side=(600, 900))
    assert crop.resized_size == (400, 300)  # never scaled up
    _, crop = prepare_image(img, 64, "random", np.random.default_rng(0), short_side=(10, 20))
    assert crop.resized_size == (85, 64)  # never below the crop
    sides = [prepare_image(img, 64, "random", np.random.default_rng(s), short_side=(120, 240))[1].resized_size[1]
             for s in range(30)]
    assert min(sides) >= 120 and max(sides) <= 240 and len(set(sides)) > 10
    a, crop_a = prepare_image(img, 64, "random", np.random.default_rng(3), short_side=(120, 240))
    b, crop_b = prepare_image(img, 64, "random", np.random.default_rng(3), short_side=(120, 240))
    assert crop_a == crop_b and np.array_equal(pixels(a), pixels(b))
    # The crop shows the scaled photo: the same pixels as scaling the whole photo, then cutting the box.
    whole = img.resize(crop_a.resized_size, crops.RESAMPLE).crop(crop_a.box)
    assert np.abs(pixels(a).astype(int) - pixels(whole).astype(int)).max() <= 2


def test_random_scales_reach_both_training_datasets_and_are_validated(mixed_dir, tmp_path):
    train, held = build_train_val(DataConfig(path=str(mixed_dir), holdout=1, crop="random", size=32,
                                             short_side=[40, 48]))
    assert train.recipe.short_side == (40, 48) and held.recipe.short_side is None  # held-out images are not rescaled
    plain, _ = build_train_val(DataConfig(path=str(mixed_dir), holdout=1, crop="random", size=32))
    good = [i for i, k in enumerate(train.source.keys()) if k.startswith("photo")]
    assert any(not torch.equal(train[i]["pixels"], plain[i]["pixels"]) for i in good)
    shard = tmp_path / "s.tar"
    write_tar(shard, {f"{i:03d}.png": imagegen.encode(imagegen.make_photo(160, 120, seed=i), "PNG") for i in range(4)})
    streamed = lambda side: next(iter(build_train_val(DataConfig(  # noqa: E731
        path=str(shard), streaming="on", holdout=0, size=32, crop="random", short_side=side))[0]))
    assert not torch.equal(streamed(None)["pixels"], streamed([40, 40])["pixels"])
    for bad, match in (({"short_side": [300, 200], "crop": "random"}, "low <= high"),
                       ({"short_side": [0, 10], "crop": "random"}, "low <= high"),
                       ({"short_side": [64], "crop": "random"}, "low <= high"),
                       ({"short_side": [64, 128], "crop": "center"}, "crop: random")):
        with pytest.raises(ValueError, match=match):
            DataConfig(**bad)


def test_small_image_policies_and_min_size():
    img = Image.new("RGB", (20, 30), (10, 20, 30))
    up, crop = prepare_image(img, 32, small_images="upscale")
    assert up.size == (32, 32) and crop.resized_size == (32, 48) and crop.box == (0, 8, 32, 40)
    padded, crop = prepare_image(img, 32, small_images="pad", background=(200, 0, 0))
    assert crop.resized_size == (20, 30) and crop.box == (-6, -1, 26, 31)
    assert padded.getpixel((0, 0)) == (200, 0, 0) and padded.getpixel((16, 16)) == (10, 20, 30)
    assert padded.getpixel((25, 16)) == (10, 20, 30) and padded.getpixel((26, 16)) == (200, 0, 0)
    # A side that is long enough is cropped, not padded: 100 x 20 keeps a centred 32-wide strip.
    strip, crop = prepare_image(Image.new("RGB", (100, 20)), 32, small_images="pad")
    assert crop.box == (34, -6, 66, 26) and strip.size == (32, 32)
    with pytest.raises(ImageError, match="smaller than crop size"):
        prepare_image(img, 32, small_images="skip")
    assert prepare_image(img, 16, small_images="skip")[0].size == (16, 16)
    with pytest.raises(ImageError) as info:
        prepare_image(img, 32, min_size=24)
    assert info.value.reason == "smaller than min_size"
    with pytest.raises(VaekitError, match="small_images"):
        prepare_image(img, 32, small_images="stretch")


def test_buckets_have_the_stated_properties():
    target, step = 512 * 512, 64
    buckets = make_buckets(target, 0.5, 2.0, step)
    assert (512, 512) in buckets and len(buckets) == len(set(buckets)) >= 5
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert 0.5 <= w / h <= 2.0
        # Height is the nearest multiple of step for the short side, so the area is off by at most half a step.
        assert abs(w * h - target) <= min(w, h) * step / 2
        assert (h, w) in buckets  # symmetric
    aspects = [w / h for w, h in buckets]
    assert aspects == sorted(aspects)
    assert max(aspects) >= 1.8 and min(aspects) <= 1 / 1.8
    small = make_buckets(256 * 256, 0.25, 4.0, 32)
    assert all(w % 32 == 0 and h % 32 == 0 and 0.25 <= w / h <= 4 for w, h in small)
    assert max(w / h for w, h in small) > 3
    with pytest.raises(VaekitError):
        make_buckets(512 * 512, 1.5, 2.0)


def test_nearest_bucket_and_crop_to_bucket():
    buckets = make_buckets()
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)
    wide = nearest_bucket(1200, 600, buckets)
    assert wide[0] / wide[1] == max(w / h for w, h in buckets)
    tall = nearest_bucket(300, 450, buckets)
    distance = lambda b: abs(math.log(b[0] / b[1]) - math.log(300 / 450))  # noqa: E731
    assert all(distance(tall) <= distance(b) for b in buckets)
    small = make_buckets(64 * 64, 0.5, 2.0, 16)
    img = imagegen.make_photo(90, 60)
    bucket = nearest_bucket(*img.size, small)
    out, crop = resize_crop_to_bucket(img, bucket)
    assert out.size == bucket and crop.original_size == (90, 60)
    assert crop.resized_size[0] >= bucket[0] and crop.resized_size[1] >= bucket[1]


# ---------------------------------------------------------------------------------------------- tensors


def test_to_tensor_and_to_pil_round_trip():
    img = imagegen.make_photo(20, 12)
    tensor = to_tensor(img)
    assert tensor.shape == (3, 12, 20) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert to_tensor(Image.new("RGB", (2, 2), (255, 0, 0)))[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert np.array_equal(pixels(to_pil(tensor)), pixels(img))
    assert np.array_equal(pixels(to_pil(tensor[None])), pixels(img))
    loud = torch.tensor([[[2.0, -3.0]], [[0.0, 0.004]], [[-0.004, 1.0]]])  # (3, 1, 2)
    assert [to_pil(loud).getpixel((x, 0)) for x in range(2)] == [(255, 128, 127), (0, 128, 255)]
    with pytest.raises(VaekitError, match=r"\(3, H, W\)"):
        to_pil(torch.zeros(4, 8, 8))


# ---------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory, bad_dir):
    """Six good photos and three bad files in one folder."""
    folder = tmp_path_factory.mktemp("mixed")
    imagegen.write_photos(folder, 6, size=(48, 40))
    for name in ("empty.jpg", "truncated.png", "text.png"):
        (folder / name).write_bytes((bad_dir / name).read_bytes())
    return folder


def test_train_dataset_is_deterministic_per_seed_epoch_index(mixed_dir):
    source = open_source(mixed_dir)
    make = lambda seed: TrainImageDataset(source, size=32, crop="random", flip=True, seed=seed)  # noqa: E731
    first, second = make(7), make(7)
    good = [i for i, k in enumerate(source.keys()) if k.startswith("photo")]
    for i in good:
        a, b = first[i], second[i]
        assert a["key"] == b["key"] and a["pixels"].shape == (3, 32, 32) and torch.equal(a["pixels"], b["pixels"])
    second.set_epoch(1)
    assert all(torch.equal(second[i]["pixels"], first[(i, 1)]["pixels"]) for i in good)
    assert any(not torch.equal(second[i]["pixels"], first[i]["pixels"]) for i in good)
    assert any(not torch.equal(make(8)[i]["pixels"], first[i]["pixels"]) for i in good)


def test_train_dataset_flips_and_crops_from_the_seeded_generator(mixed_dir):
    source = open_source(mixed_dir)
    i = source.keys().index("photo_002.png")
    dataset = TrainImageDataset(source, size=32, crop="random", flip=True, seed=3)
    img = decode_image(source[i].path)
    flipped = 0
    for epoch in range(8):
        rng = np.random.default_rng([3, epoch, i])  # the documented derivation
        expected, _ = prepare_image(img, 32, "random", rng)
        expected = to_tensor(expected)
        if rng.random() < 0.5:
            expected = expected.flip(-1)
            flipped += 1
        assert torch.equal(dataset[(i, epoch)]["pixels"], expected)
    assert 0 < flipped < 8


def test_kept_decoded_images_give_the_same_crops_and_are_decoded_once(mixed_dir, monkeypatch):
    source = open_source(mixed_dir)
    good = [i for i, k in enumerate(source.keys()) if k.startswith("photo")]
    fresh = TrainImageDataset(source, size=32, crop="random", flip=True, seed=5)
    kept = TrainImageDataset(source, size=32, crop="random", flip=True, seed=5, keep_decoded=4)
    decodes = []
    original = type(source[good[0]]).decode
    monkeypatch.setattr(type(source[good[0]]), "decode", lambda self, **kw: decodes.append(self.key) or original(self, **kw))
    for epoch in range(3):
        for i in good:
            assert torch.equal(kept[(i, epoch)]["pixels"], fresh[(i, epoch)]["pixels"])
    kept_keys = [source.keys()[i] for i in good[:4]]
    kept_decodes = [k for k in decodes if k in kept_keys]
    assert len(kept_decodes) == 4 + 3 * 4  # the kept four: once by `kept`, three times by `fresh`
    assert all(decodes.count(source.keys()[i]) == 6 for i in good[4:])  # the rest: every read, both datasets
    assert len(kept.decoded) == 4
    bad = [i for i in range(len(source)) if i not in good]
    assert all("error" in kept[i] for i in bad) and len(kept.decoded) == 4  # errors are not kept


def test_keep_decoded_reaches_the_training_dataset_and_refuses_negatives(mixed_dir):
    train, _ = build_train_val(DataConfig(path=str(mixed_dir), holdout=0, keep_decoded=3))
    assert train.keep_decoded == 3
    with pytest.raises(ValueError, match="keep_decoded"):
        DataConfig(keep_decoded=-1)


def test_colour_jitter_is_seeded_turns_hues_and_leaves_other_crops_alone(mixed_dir):
    source = open_source(mixed_dir)
    good = [i for i, k in enumerate(source.keys()) if k.startswith("photo")]
    plain = TrainImageDataset(source, size=32, crop="random", flip=True, seed=5)
    make = lambda: TrainImageDataset(source, size=32, crop="random", flip=True, seed=5, colour=(0.5, 0.5))  # noqa: E731
    jittered, again = make(), make()
    for i in good:
        a, b, c = plain[i]["pixels"], jittered[i]["pixels"], again[i]["pixels"]
        assert torch.equal(b, c) and not torch.equal(a, b)  # seeded like the crop, and different colours
        assert b.min() >= -1 and b.max() <= 1
        # The same crop, flip and structure: hue and saturation change, brightness order mostly stays.
        grey_a, grey_b = a.mean(0).flatten(), b.mean(0).flatten()
        assert torch.corrcoef(torch.stack([grey_a, grey_b]))[0, 1] > 0.5
    # Off (the default) draws nothing more from the generator: crops are the ones before jitter existed.
    rng = np.random.default_rng([5, 0, good[0]])
    expected, _ = prepare_image(decode_image(source[good[0]].path), 32, "random", rng)
    expected = to_tensor(expected)
    assert torch.equal(plain[good[0]]["pixels"], expected.flip(-1) if rng.random() < 0.5 else expected)
    # Hue only: a crop's mean saturation-free brightness (the channel mean of a grey image) is kept.
    grey = TrainImageDataset(source, size=32, crop="random", flip=True, seed=5, colour=(0.5, 0.0))
    flat = plain[good[0]]["pixels"].mean(0, keepdim=True).expand(3, -1, -1)
    turned = crops.jitter_colour(flat.clone(), np.random.default_rng(0), 0.5, 0.0)
    assert torch.allclose(turned, flat, atol=1e-5) and not torch.equal(grey[good[0]]["pixels"], plain[good[0]]["pixels"])


def test_colour_jitter_keeps_luma_and_greys_and_scales_saturation_as_torchvision():
    from torchvision.transforms.v2 import functional as F

    pixels = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.6  # well inside [-1, 1]
    luma = torch.tensor([0.299, 0.587, 0.114])
    turned = crops.jitter_colour(pixels.clone(), np.random.default_rng(1), 0.5, 0.0)
    assert torch.allclose(torch.einsum("c,chw->hw", luma, turned), torch.einsum("c,chw->hw", luma, pixels), atol=1e-5)
    assert (turned - pixels).abs().max() > 0.05  # the hue did turn
    grey = torch.linspace(-1, 1, 48).reshape(1, 4, 12).expand(3, -1, -1)
    assert torch.allclose(crops.jitter_colour(grey.clone(), np.random.default_rng(2), 0.5, 0.9), grey, atol=1e-5)
    rng = np.random.default_rng(3)
    saturated = crops.jitter_colour(pixels.clone(), rng, 0.0, 0.5)
    factor = np.random.default_rng(3)
    factor.uniform(0, 0)
    expected = F.adjust_saturation(pixels.add(1).div(2), factor.uniform(0.5, 1.5)).mul(2).sub(1)
    assert torch.allclose(saturated, expected, atol=1e-3)


def test_colour_jitter_reaches_both_training_datasets_and_is_bounded(mixed_dir, tmp_path):
    config = DataConfig(path=str(mixed_dir), holdout=1, hue_jitter=0.1, saturation_jitter=0.3)
    train, held = build_train_val(config)
    assert train.recipe.colour == (0.1, 0.3) and held.recipe.colour == (0.0, 0.0)  # held-out images keep their colours
    shard = tmp_path / "s.tar"
    write_tar(shard, {f"{i:03d}.png": imagegen.encode(imagegen.make_photo(48, 40, seed=i), "PNG") for i in range(4)})
    streamed = lambda colour: next(iter(build_train_val(DataConfig(  # noqa: E731
        path=str(shard), streaming="on", holdout=0, size=32, hue_jitter=colour, saturation_jitter=colour))[0]))
    assert streamed(0.0)["key"] == streamed(0.5)["key"]
    assert not torch.equal(streamed(0.0)["pixels"], streamed(0.5)["pixels"])
    assert torch.equal(streamed(0.5)["pixels"], streamed(0.5)["pixels"])
    for bad in ({"hue_jitter": 0.6}, {"hue_jitter": -0.1}, {"saturation_jitter": 1.5}):
        with pytest.raises(ValueError, match="jitter"):
            DataConfig(**bad)


def test_bad_images_become_error_items_and_collate_lists_them(mixed_dir):
    dataset = TrainImageDataset(open_source(mixed_dir), size=32, crop="center", flip=False)
    items = [dataset[i] for i in range(len(dataset))]
    errors = {item["key"]: item["error"] for item in items if "error" in item}
    assert errors == {"empty.jpg": "zero-byte file", "truncated.png": "truncated image", "text.png": "not an image"}
    batch = collate_images(items)
    assert batch["pixels"].shape == (6, 3, 32, 32) and len(batch["keys"]) == 6
    assert sorted(e["key"] for e in batch["errors"]) == sorted(errors)
    assert collate_images([items[0]] if "error" in items[0] else [])["pixels"].shape[0] == 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_images)
    batches = list(loader)
    assert sum(b["pixels"].shape[0] for b in batches) == 6 and sum(len(b["errors"]) for b in batches) == 3


def test_dataloader_workers_give_the_same_batches(mixed_dir):
    dataset = TrainImageDataset(open_source(mixed_dir), size=32, crop="resize_random", seed=1)
    dataset.set_epoch(2)

    def run(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers, collate_fn=collate_images)
        return [(b["keys"], b["pixels"]) for b in loader]

    for (keys0, pix0), (keys2, pix2) in zip(run(0), run(2), strict=True):
        assert keys0 == keys2 and torch.equal(pix0, pix2)


def test_data_config_and_build_train_val(mixed_dir):
    config = from_dict(DataConfig, {"path": str(mixed_dir), "size": 32, "holdout": 2, "crop": "random", "seed": 4})
    train, val = build_train_val(config)
    assert len(train) == 7 and len(val) == 2
    assert set(train.source.keys()).isdisjoint(val.source.keys())
    assert build_train_val(config)[1].source.keys() == val.source.keys()
    assert val.recipe.crop == "center" and val.recipe.flip is False
    good = [i for i in range(len(val)) if "pixels" in val[i]]
    val.set_epoch(5)
    assert all(torch.equal(val[i]["pixels"], val[(i, 0)]["pixels"]) for i in good)
    assert build_train_val(from_dict(DataConfig, {"path": str(mixed_dir), "holdout": 0}))[1] is None
    assert len(build_train_val(from_dict(DataConfig, {"path": str(mixed_dir), "holdout": 0.2}))[1]) == 2
    with pytest.raises(VaekitError, match="crop"):
        from_dict(DataConfig, {"crop": "zoom"})
    with pytest.raises(VaekitError, match="background"):
        from_dict(DataConfig, {"background": [1, 2]})
    with pytest.raises(VaekitError, match="Unknown config key 'resolution'"):
        from_dict(DataConfig, {"resolution": 256})


def test_build_train_val_on_builtin_photos():
    train, val = build_train_val(DataConfig(size=64, holdout=2))
    assert len(val) == 2 and len(train) + 2 == len(open_source("builtin:photos"))
    item = train[0]
    assert item["pixels"].shape == (3, 64, 64) and item["key"].startswith("skimage/")
