"""WebDataset shards as streams: shard lists (local, brace patterns, `pipe:`, URLs) and their samples.

Reading goes through the `webdataset` library's own pipeline (`gopen`, `tarfile_samples`), so
everything it opens works here: plain and compressed tars (`.tar`, `.tar.gz`, `.tgz`), `pipe:`
commands (`pipe:aws s3 cp s3://bucket/x.tar -`, `pipe:cat x.tar`), http(s) URLs. A shard is read
once, front to back; nothing indexes all shards, so a process holds one shard list and one sample.
"""

import os
import re
from pathlib import Path

from vaekit.data.config import IMAGE_EXTENSIONS
from vaekit.data.decode import ImageError
from vaekit.errors import VaekitError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# A spec with a scheme ("pipe:", "http://", "s3://", "file:") is opened by webdataset's gopen;
# Windows drive letters ("C:\") are not schemes.
URL_SCHEME = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]+://)")


def is_shard_file(path):
    """Whether a file name looks like a WebDataset shard."""
    return str(path).lower().endswith(SHARD_SUFFIXES)


def looks_like_shards(spec):
    """Whether a spec that is no local file or folder names WebDataset shards (a URL, pipe: or brace pattern)."""
    spec = str(spec)
    return bool(URL_SCHEME.match(spec)) or (("{" in spec or "::" in spec) and ".t" in spec)


def is_local(url):
    """Whether a shard URL is a local file path (no scheme, or file://)."""
    return not URL_SCHEME.match(url) or url.startswith("file://")


def local_path(url):
    """The file path of a local shard URL."""
    return url.removeprefix("file://")


def expand_shards(spec):
    """The shard URLs of a spec: a shard file, a folder of shards, a brace pattern or `::`-list, URLs.

    Local shards must exist (checked here, with one message); remote ones are opened when read.
    """
    spec = str(spec)
    path = Path(spec)
    if not URL_SCHEME.match(spec) and path.is_dir():
        urls = sorted(str(p) for p in path.rglob("*") if is_shard_file(p) and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not urls:
            raise VaekitError(f"No WebDataset shards ({', '.join(SHARD_SUFFIXES)}) in {spec}.")
        return urls
    from webdataset.shardlists import expand_urls  # brace expansion and '::' lists as WebDataset itself does them

    urls = list(expand_urls(spec))
    missing = [u for u in urls if is_local(u) and not os.path.isfile(local_path(u))]
    if missing:
        raise VaekitError(f"Shard not found: {missing[0]} ({len(missing)} of {len(urls)} missing from {spec}). "
                          "Check the path or brace pattern.")
    if not urls:
        raise VaekitError(f"The shard spec {spec} names no shards.")
    return urls


def shard_identity(url):
    """A cheap identity of a shard's content: size and mtime for a local file, the URL itself otherwise."""
    if is_local(url):
        stat = os.stat(local_path(url))
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    return url


def image_fields(field=None):
    """The member extensions that hold the image, in order of preference."""
    return (field.lower().lstrip("."),) if field else tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def shard_samples(url, field=None):
    """Yield (key, image bytes or an ImageError) for each sample of one shard, in the shard's order.

    A sample without an image member yields an ImageError (listed by the caller, never silently
    dropped). A shard that cannot be opened or read (missing, truncated, a failing pipe command)
    raises ImageError with reason "unreadable shard"; samples yielded before it stay valid.
    """
    from webdataset.tariterators import tarfile_samples  # the library's open -> untar -> group-by-key pipeline

    wanted = image_fields(field)
    try:
        for sample in tarfile_samples([{"url": url}]):
            key = sample["__key__"]
            found = next((ext for ext in wanted if ext in sample), None)
            if found is None:
                fields = ", ".join(sorted(k for k in sample if not k.startswith("__"))) or "none"
                yield key, ImageError("no image member", None, f"fields: {fields}; name the image field with "
                                                                "image_column=EXT")
            else:
                yield key, sample[found]
    except Exception as e:  # gopen, tarfile and pipe failures come in many types; all mean the shard is unusable
        raise ImageError("unreadable shard", url, f"{type(e).__name__}: {e}") from None
