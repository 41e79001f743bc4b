"""Reading latent caches (LatentDataset, BucketBatchSampler, decode_samples) and latent statistics."""

import json

import numpy as np
import pytest
import torch

from imagegen import make_photo, write_photos
from vaekit import cli
from vaekit.cache.dataset import BucketBatchSampler, LatentDataset, collate_latents, decode_samples, load_latents
from vaekit.cache.stats import LatentMoments, latent_statistics, suggest_normalization

torch.set_num_threads(1)
SCALE, SHIFT = 0.5, 0.1


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny f8 VAE with a non-trivial normalisation, saved as a diffusers folder."""
    from vaekit.model import build_preset, save_diffusers

    torch.manual_seed(0)
    vae = build_preset("tiny", {"scaling_factor": SCALE, "shift_factor": SHIFT})
    return str(save_diffusers(vae, tmp_path_factory.mktemp("vae") / "tiny"))


@pytest.fixture(scope="module")
def exact_cache(tmp_path_factory, vae_dir):
    """fp32 cache of 5 photos and their mirrors, one image per batch, contiguous memory: bit-exact latents."""
    folder = tmp_path_factory.mktemp("latents")
    data, out = folder / "images", folder / "cache"
    write_photos(data, 5, size=(48, 40))
    argv = ["encode", "--vae", vae_dir, "--data", str(data), "--out", str(out), "--resolution", "32", "--dtype", "fp32",
            "--batch_size", "1", "--num_workers", "0", "--no-channels_last", "--flip", "--shard_size", "4", "--quiet",
            "--compute_dtype", "fp32"]
    assert cli.main(argv) == 0
    return data, out


@pytest.fixture(scope="module")
def vae(vae_dir):
    from vaekit.model import load_vae

    return load_vae(vae_dir)


def preprocessed(path):
    """The image as the encoder sees it -> ((1, 3, 32, 32) in [-1, 1], its Crop): decoded, resized, centre-cropped."""
    from vaekit.data import decode_image, resize_center_crop, to_tensor

    img, crop = resize_center_crop(decode_image(path), 32)
    return to_tensor(img)[None], crop


# ----------------------------------------------------------------------------------------------
# Read back = the VAE's encode; decoded = its reconstruction


def test_read_back_latents_equal_vae_encode_and_decode_to_reconstruction(exact_cache, vae):
    from vaekit.data import to_pil

    data, out = exact_cache
    plain = LatentDataset(out, sample=False, normalize=False, flips="none")
    normalized = LatentDataset(out, sample=False, normalize=True, flips="none")
    assert plain.keys == sorted(p.name for p in data.iterdir())
    keys = plain.keys[:3]
    images = decode_samples(out, vae, keys=keys)
    assert list(images) == keys
    for index, key in enumerate(keys):
        x, crop = preprocessed(data / key)
        with torch.no_grad():
            # With --flip each image is encoded in one batch with its mirror; the same batch here makes the
            # comparison bit-exact (CPU kernels may round differently for another batch size).
            posterior = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
            alone = vae(x).sample  # the plain reconstruction, decode(mode(encode(x)))
        mean, logvar = load_latents(out, key)
        assert torch.equal(mean, posterior.mean[0]) and torch.equal(logvar, posterior.logvar[0]), "bit-exact in fp32"
        mirrored_mean, mirrored_logvar = load_latents(out, key, flip=True)
        assert torch.equal(mirrored_mean, posterior.mean[1]) and torch.equal(mirrored_logvar, posterior.logvar[1])
        item = plain[index]
        assert item["key"] == key and torch.equal(item["latents"], posterior.mean[0])
        assert torch.equal(normalized[index]["latents"], (posterior.mean[0] - SHIFT) * SCALE)
        assert item["original_size"] == (48, 40) and item["crop_box"] == crop.box and item["flip"] is False
        with torch.no_grad():
            reconstruction = vae.decode(posterior.mean[:1].contiguous()).sample  # the stored mean, decoded
        assert np.array_equal(np.asarray(images[key]), np.asarray(to_pil(reconstruction[0])))
        assert np.abs(np.asarray(images[key], np.int16) - np.asarray(to_pil(alone[0]), np.int16)).max() <= 1


def test_sampling_draws_from_the_stored_posterior_reproducibly(exact_cache):
    _, out = exact_cache
    sampled = LatentDataset(out, seed=7)  # sample=True by default for a mean_logvar cache, normalised
    again = LatentDataset(out, seed=7)
    other = LatentDataset(out, seed=8)
    assert sampled.sample and len(sampled) == 5
    a, b, c = sampled[2], again[2], other[2]
    assert a["key"] == b["key"] and torch.equal(a["latents"], b["latents"]), "same seed, same draw"
    assert not torch.equal(a["latents"], c["latents"])
    assert not torch.equal(sampled[(2, 0)]["latents"], sampled[(2, 1)]["latents"]), "a new draw each epoch"
    # Undo the normalisation and the draw must be a standard normal around the stored mean.
    draws = []
    for epoch in range(200):
        item = sampled[(0, epoch)]
        mean, logvar = load_latents(out, item["key"], item["flip"])
        draws.append((item["latents"] / SCALE + SHIFT - mean) / (0.5 * logvar).exp())
    eps = torch.stack(draws)
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05
    flips = {sampled[(0, epoch)]["flip"] for epoch in range(20)}
    assert flips == {False, True}, "random flips pick both variants"


def test_flip_modes_and_mode_only_caches(exact_cache, tmp_path, vae_dir):
    _, out = exact_cache
    assert len(LatentDataset(out, flips="all")) == 10
    assert all(not LatentDataset(out, flips="none")[i]["flip"] for i in range(5))
    mode_cache = tmp_path / "mode"
    data = tmp_path / "images"
    write_photos(data, 2)
    argv = ["encode", "--vae", vae_dir, "--data", str(data), "--out", str(mode_cache), "--resolution", "32",
            "--store", "mode", "--num_workers", "0", "--quiet", "--compute_dtype", "fp32"]
    assert cli.main(argv) == 0
    dataset = LatentDataset(mode_cache)
    assert not dataset.sample and dataset[0]["latents"].dtype == torch.float32
    from vaekit.errors import VaekitError

    with pytest.raises(VaekitError, match="only the posterior's mode"):
        LatentDataset(mode_cache, sample=True)


def test_bucket_batches_share_a_shape_cover_every_item_and_split_across_ranks():
    buckets = [(32, 32)] * 7 + [(48, 32)] * 5 + [(32, 48)] * 3
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(15)), "each index once per epoch"
    assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    sampler.set_epoch(1)
    assert list(sampler) != batches, "reshuffled per epoch"
    sampler.set_epoch(0)
    assert list(sampler) == batches, "deterministic for (seed, epoch)"
    full = BucketBatchSampler(buckets, batch_size=2, drop_last=True)
    assert all(len(b) == 2 for b in full)
    ranks = [list(BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert not {i for b in ranks[0] for i in b} & {i for b in ranks[1] for i in b}


def test_dataloader_with_workers_and_bucket_batches(tmp_path, vae_dir):
    data = tmp_path / "images"
    data.mkdir()
    for i, size in enumerate([(96, 48), (48, 96), (64, 64), (100, 50), (50, 100), (70, 64)]):
        make_photo(*size, seed=i).save(data / f"img{i}.png")
    out = tmp_path / "cache"
    argv = ["encode", "--vae", vae_dir, "--data", str(data), "--out", str(out), "--resolution", "64", "--buckets",
            "--bucket_step", "16", "--num_workers", "0", "--quiet", "--compute_dtype", "fp32"]
    assert cli.main(argv) == 0
    dataset = LatentDataset(out)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, 2),
                                         collate_fn=collate_latents, num_workers=2)
    seen = []
    for batch in loader:
        c, h, w = batch["latents"].shape[1:]
        assert all(b == (w * 8, h * 8) for b in batch["buckets"])
        seen.extend(batch["keys"])
    assert sorted(seen) == dataset.keys


# ----------------------------------------------------------------------------------------------
# Statistics


def test_latent_statistics_match_direct_computation_across_uneven_batches():
    torch.manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1)
    offset = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(1, 4, 1, 1)
    batches = [torch.randn(n, 4, h, w) * scale + offset for n, h, w in [(3, 4, 4), (1, 6, 2), (5, 2, 8)]]
    logvars = [torch.randn_like(b) * 0.3 - 1.0 for b in batches]
    flat = torch.cat([b.transpose(0, 1).reshape(4, -1) for b in batches], 1).double()  # (C, all values)
    sigma2 = torch.cat([lv.transpose(0, 1).reshape(4, -1) for lv in logvars], 1).double().exp()

    of_mean = latent_statistics(batches)
    assert of_mean["of"] == "mean" and of_mean["count"] == flat.shape[1]
    np.testing.assert_allclose(of_mean["mean"], flat.mean(1), rtol=1e-10)
    np.testing.assert_allclose(of_mean["std"], flat.std(1, unbiased=False), rtol=1e-10)
    np.testing.assert_allclose(of_mean["global_mean"], flat.mean(), rtol=1e-10)
    np.testing.assert_allclose(of_mean["global_std"], flat.std(unbiased=False), rtol=1e-10)

    posterior = latent_statistics(list(zip(batches, logvars)))
    assert posterior["of"] == "posterior"
    np.testing.assert_allclose(posterior["std"], (flat.var(1, unbiased=False) + sigma2.mean(1)).sqrt(), rtol=1e-10)
    # The closed form agrees with actually drawing z ~ N(mean, sigma^2).
    draws = torch.cat([(b + (0.5 * lv).exp() * torch.randn_like(b)).flatten()
                       for _ in range(50) for b, lv in zip(batches, logvars)])
    np.testing.assert_allclose(posterior["global_std"], draws.std().item(), rtol=0.02)

    suggestion = suggest_normalization(posterior)
    assert suggestion["scaling_factor"] == pytest.approx(1 / posterior["global_std"])
    assert suggestion["shift_factor"] == pytest.approx(posterior["global_mean"])
    assert suggestion["latents_std"] == posterior["std"]
    with pytest.raises(Exception, match="logvar"):
        LatentMoments().update(batches[0]).result("posterior")


def test_stats_command_writes_a_vae_whose_normalisation_whitens_the_cache(exact_cache, tmp_path, capsys):
    from vaekit.model import load_vae, normalize_latents

    data, out = exact_cache
    export = tmp_path / "normalised"
    assert cli.main(["stats", str(out), "--of", "mean", "--write", str(export), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["statistics"]["of"] == "mean" and report["statistics"]["channels"] == 4

    vae = load_vae(export)
    config = dict(vae.config)
    assert config["scaling_factor"] == pytest.approx(report["suggested"]["scaling_factor"])
    assert config["shift_factor"] == pytest.approx(report["suggested"]["shift_factor"])
    assert list(config["latents_mean"]) == pytest.approx(report["statistics"]["mean"])
    assert list(config["latents_std"]) == pytest.approx(report["statistics"]["std"])
    means = torch.stack([LatentDataset(out, sample=False, normalize=False, flips="all")[i]["latents"]
                         for i in range(10)])
    z = normalize_latents(vae, means)
    assert abs(z.mean().item()) < 1e-5 and z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)

    # The same numbers straight from the VAE and the images, without a cache.
    assert cli.main(["stats", "--vae", str(export), "--data", str(data), "--resolution", "32", "--flip",
                     "--of", "mean", "--num_workers", "0", "--compute_dtype", "fp32", "--json"]) == 0
    direct = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(direct["statistics"]["mean"], report["statistics"]["mean"], atol=1e-5)
    np.testing.assert_allclose(direct["statistics"]["std"], report["statistics"]["std"], atol=1e-5)
    assert cli.main(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "suggested: scaling_factor = 1/std" in text and "global" in text
