"""WebDataset shards as streams: shard lists (local, brace patterns, `pipe:`, URLs) and their samples.

Shards are opened by the `webdataset` library's own `gopen`, so everything it opens works here:
plain and compressed tars (`.tar`, `.tar.gz` / `.tgz`, `.tar.bz2`, `.tar.xz`), `pipe:` commands (`pipe:aws s3 cp
s3://bucket/x.tar -`, `pipe:cat x.tar`), http(s) URLs; keys and extensions are split by its
`base_plus_ext`. A shard is read once, front to back; nothing indexes all shards, so a process holds
one shard list and one sample.

Every member of a shard is accounted for: a sample gives its image bytes or the ImageError that
says why it has none, and a member that belongs to no sample (hidden, without extension, not a
regular file, a repeat) is yielded as an ImageError under its own name. A read that waits
`timeout` seconds for a byte gives the shard up (`unreadable shard (stalled)`) and stops its command.
"""

import bz2
import collections
import gzip
import io
import lzma
import os
import re
import select
import signal
import tarfile
from pathlib import Path

from vaekit.data.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_READ_TIMEOUT, IMAGE_EXTENSIONS
from vaekit.data.decode import ImageError, check_size
from vaekit.errors import VaekitError, describe_exception

# Compressed tars cannot be indexed (an offset needs everything before it inflated): they are streamed.
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
SHARD_SUFFIXES = (".tar", *COMPRESSED_SUFFIXES)

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


def shard_name(url, width=40):
    """A short name of a shard for progress lines: its file name, or the end of a command or URL."""
    name = Path(local_path(url)).name if is_local(url) else url
    return name if len(name) <= width else "..." + name[-(width - 3):]


# A shard's file name inside a path, URL or command ("pipe:aws s3 cp s3://b/train-0001.tar -").
_SHARD_FILE = re.compile(r"[^/\s:'\"]+\.(?:tar|tar\.gz|tgz)(?![\w.])", re.IGNORECASE)


def shard_labels(urls):
    """A short name per shard, unique in the list: its file name (found in a command or URL too),
    followed by #N (its position in the list) where names repeat."""
    names = [(_SHARD_FILE.findall(url) or [url])[-1] for url in urls]
    counts = collections.Counter(names)
    return [name if counts[name] == 1 else f"{name}#{i}" for i, name in enumerate(names)]


RENAMED_KEY = "duplicate key (renamed)"  # the reason a renamed sample is listed under


def renamed_key(key, label):
    """The key of a sample whose key an earlier shard already has: KEY@SHARD (SHARD from `shard_labels`).

    It cannot be the key of another WebDataset sample: those never hold a dot after their last
    slash (the first dot of a member's file name starts its extension), and a shard's name has one.
    """
    return f"{key}@{label}"


def image_fields(field=None):
    """The member extensions that hold the image, in order of preference."""
    return (field.lower().lstrip("."),) if field else tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def shard_samples(url, field=None, max_bytes=DEFAULT_MAX_IMAGE_BYTES, timeout=DEFAULT_READ_TIMEOUT, on_read=None):
    """Yield (key, image bytes or an ImageError) for each sample of one shard, in the shard's order.

    A sample without a usable image member yields the ImageError that says why (no image member,
    an image member over `max_bytes` bytes, which is skipped unread, a link instead of a file, a
    key repeated in the shard). A member that belongs to no sample yields (member name, ImageError).
    A shard that cannot be opened or read to its end (missing, truncated, a failing `pipe:` command,
    `timeout` seconds without a byte) raises ImageError with reason "unreadable shard" or
    "unreadable shard (stalled)"; samples yielded before it stay valid. `on_read(total bytes)` is
    called as bytes arrive.
    """
    try:
        stream = ShardStream(url, timeout, on_read)
    except Exception as e:  # gopen and the command's start raise many types; all mean the shard cannot be opened
        raise ImageError("unreadable shard", url, describe_exception(e)) from None
    try:
        # Big reads from the shard, small ones by tarfile from this buffer (which closes the stream when
        # it is collected, so it lives as long as the stream).
        buffered = io.BufferedReader(stream, READ_SIZE)
        yield from read_tar(buffered, image_fields(field), max_bytes)
        stream.finish()
    except Stalled as e:
        raise ImageError("unreadable shard (stalled)", url, f"{e}; raise read_timeout if the source is only slow") \
            from None
    except Exception as e:  # tarfile, zlib and pipe failures come in many types; all mean the shard is unusable
        # A command that failed (a missing object, a refused download) explains an empty or cut-off tar.
        raise ImageError("unreadable shard", url, stream.exit_problem() or describe_exception(e)) from None
    finally:
        stream.close()  # stops a command still running (an early stop, a failure, a stall) and reaps it


# Bytes asked of a shard per read (a pipe gives at most 64 KiB at a time): few system calls, and
# buffers below the size glibc maps and unmaps afresh (1 MiB reads spent a third more system time).
# tarfile reads from the buffer in its own small records (it copies what it has not used on every read).
READ_SIZE = 1 << 18

# WebDataset's own convention: members named __x__ hold metadata of the shard, not samples.
_METADATA = re.compile(r"^__[^/]*__($|/)")


def read_tar(stream, wanted, max_bytes):
    """(key, bytes or ImageError) of a tar stream's samples and of its members that belong to none.

    Only image members (`wanted` extensions) are read, each after its declared size is checked
    against `max_bytes`; other members are skipped over unread, in bounded memory. A compressed
    stream is read to its end, where its checksum is checked (tarfile stops at the tar's end marker).
    """
    source = decompressed(stream)
    with tarfile.open(fileobj=source, mode="r|") as tar:
        def members():
            for member in tar:
                tar.members = []  # stream mode keeps every header otherwise
                yield member

        yield from tar_samples(members(), wanted, max_bytes, lambda member: tar.extractfile(member).read())
    if source is stream:
        return
    # Read on to the compressor's end, where a bad checksum raises (the shard is then unusable), but
    # not for ever: the read timeout only fires when bytes stop coming, and a command that writes
    # zeros after a valid .tar.gz (gzip skips them as padding) or more compressed members would
    # otherwise be read without end.
    stream.raw.limit_to(stream.raw.count + TRAILING_LIMIT)
    drained = 0
    while data := source.read(READ_SIZE):
        drained += len(data)
        if drained > TRAILING_LIMIT:
            raise OSError(too_much_after_the_end())


# What may follow a compressed tar's end marker: the rest of its last record (tar pads to records of
# 10 KiB by default; this allows blocking factors up to 2048) and the compressor's trailer.
TRAILING_LIMIT = 1 << 20


def too_much_after_the_end():
    return (f"more than {TRAILING_LIMIT >> 20} MiB of data after the end of its tar archive, where only padding "
            "belongs; check the file or the command that writes it")


def decompressed(stream):
    """The uncompressed bytes of a .tar, .tar.gz, .tar.bz2 or .tar.xz stream (told apart by their magic bytes).

    The standard library's file readers inflate at most what each read asks for, so skipping a large,
    well-compressed member costs time, not memory. Chosen by hand instead of tarfile's "r|*": its
    stream mode inflates each compressed read whole (a 10 KiB read of a member of zeros is 10 MB)
    and copies what is left on every read, which took minutes and gigabytes on such a member.
    """
    head = stream.peek(6)[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")  # checks each member's CRC; members may follow and zeros pad
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream)
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream)
    return stream


def tar_samples(members, wanted, max_bytes, load):
    """Group tar members (in archive order) into samples: (key, load(image member) or ImageError), and
    (member name, ImageError) for each member that belongs to no sample or cannot be used.

    Written by hand: webdataset's tar_file_iterator and group_by_keys drop non-regular, hidden and
    extension-less members without a word, read every member whole, and give up on the whole shard
    when a sample repeats a member. `load` is called on an image member while it is current (a
    stream cannot go back); members of other extensions are never loaded. The rule for keys: a
    sample is the run of consecutive members sharing a key (WebDataset's), and a key that comes
    back later in the same shard is a duplicate, listed and left out.
    """
    from webdataset.tariterators import base_plus_ext  # WebDataset's own key/extension split

    sample, seen = None, set()
    for member in members:
        name = member.name
        if _METADATA.match(name):
            continue
        base, ext = base_plus_ext(name)
        hidden = any(part.startswith(".") and part not in (".", "..") for part in name.split("/"))
        if hidden or base is None:
            if not hidden and member.isdir():
                continue  # a folder entry, which `tar` writes for the folders of the files it stores
            yield name, ImageError("hidden member" if hidden else "member without extension", None,
                                   "WebDataset samples are KEY.EXTENSION files; this one is left out")
            continue
        if sample is not None and base != sample["key"]:
            yield from finish_sample(sample, wanted, seen)
            sample = None
        if sample is None:
            sample = {"key": base, "fields": {}, "names": {}}
        ext = ext.lower()
        if ext in sample["fields"]:
            yield name, ImageError("repeated member", None, f"sample {base} already has a .{ext} member")
            continue
        problem = member_problem(member, max_bytes if ext in wanted else None)
        if problem is not None:
            value = problem
        elif ext in wanted:
            value = load(member)  # its declared size was checked above
        else:
            value = None  # present, but not needed: skipped over unread
        sample["fields"][ext], sample["names"][ext] = value, name
    if sample is not None:
        yield from finish_sample(sample, wanted, seen)


def member_problem(member, max_bytes):
    """Why a tar member cannot be used (an ImageError), or None."""
    if not member.isreg():
        kind = ("symlink" if member.issym() else "hardlink" if member.islnk() else "directory" if member.isdir()
                else "fifo" if member.isfifo() else "device" if member.isdev() else "special member")
        return ImageError(f"not a regular file ({kind})", None, "tar members must be regular files")
    try:
        check_size(member.size, max_bytes)
    except ImageError as e:
        return e
    return None


def finish_sample(sample, wanted, seen):
    """(key, image bytes or ImageError) of a complete sample, then (member name, ImageError) of its unusable members."""
    key, fields = sample["key"], sample["fields"]
    if key in seen:  # keys are unique in a shard: the first sample keeps it
        yield key, ImageError("duplicate key", None, "an earlier sample of this shard has the same key and is kept")
        return
    seen.add(key)
    images = [ext for ext in wanted if ext in fields]
    chosen = next((ext for ext in images if not isinstance(fields[ext], ImageError)), images[0] if images else None)
    if chosen is None:
        names = ", ".join(sorted(fields)) or "none"
        yield key, ImageError("no image member", None, f"fields: {names}; name the image field with image_column=EXT")
    else:
        yield key, fields[chosen]
    for ext, value in fields.items():
        if isinstance(value, ImageError) and ext != chosen:
            yield sample["names"][ext], value


class Stalled(Exception):
    """A shard read that waited its timeout for a byte."""


class ShardStream(io.RawIOBase):
    """The bytes of one shard as webdataset's gopen opens it, counted, with a timeout on every read.

    Written by hand around gopen: a read from webdataset's Pipe blocks until the command writes or
    exits, so a stalled command would hang its reader forever, and closing a Pipe waits up to two
    hours for the command. Here a `pipe:` command runs in a process group of its own, every read
    from a command waits at most `timeout` seconds for data (poll), and `close` kills the group and
    reaps it. Local files are read as they are (a regular file is always ready to read).
    """

    def __init__(self, url, timeout=None, on_read=None):
        import webdataset.utils as wds_utils  # the library's opener, URL rewriting and security switch
        from webdataset.gopen import Pipe, gopen, rewrite_url

        self.timeout, self.on_read = timeout, on_read
        self.count, self.group, self.limit = 0, False, None
        url = rewrite_url(url)
        if url.startswith("pipe:"):
            if wds_utils.enforce_security:
                raise VaekitError("pipe: shards are disabled by WDS_SECURE=1")
            # gopen's own Pipe, started as gopen_pipe starts it, but as the leader of its own process group
            self.pipe = Pipe(url[5:], mode="rb", shell=True, bufsize=0, ignore_status=[141], start_new_session=True)
            self.group = True
        else:
            handle = gopen(url, "rb")
            self.pipe = handle if isinstance(handle, Pipe) else None
            self.file = None if self.pipe is not None else handle
        if self.pipe is not None:
            self.fd = self.pipe.stream.fileno()
            self.poller = select.poll()  # poll, not select: no limit on descriptor numbers
            self.poller.register(self.fd, select.POLLIN | select.POLLPRI)

    def readable(self):
        return True

    def read(self, size=-1):
        """Up to `size` bytes: what a command has written so far (at least a tar block's worth, unless it ends),
        or the next `size` bytes of a file. Raises Stalled after `timeout` seconds without a byte."""
        if size is None or size < 0:
            return self.readall()
        if self.pipe is None:
            data = self.file.read(size)
        else:
            data = self.wait_and_read(size)
            # tarfile detects compression from the first block: give it a whole one when there is one
            while 0 < len(data) < min(size, tarfile.BLOCKSIZE) and (more := self.wait_and_read(size - len(data))):
                data += more
        if data:
            self.count += len(data)
            if self.limit is not None and self.count > self.limit:
                raise OSError(too_much_after_the_end())
            if self.on_read is not None:
                self.on_read(self.count)
        return data

    def limit_to(self, count):
        """Fail a read that would bring the bytes read past `count`."""
        self.limit = count

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def wait_and_read(self, size):
        """Whatever the command has written, up to `size` bytes, once it has written something (b"" at its end)."""
        if not self.poller.poll(None if self.timeout is None else self.timeout * 1000):
            self.stop()
            raise Stalled(f"no data for {self.timeout:g} s after {self.count} bytes; its command was stopped")
        return os.read(self.fd, size)

    def exit_problem(self, wait=1.0):
        """'its command exited with status N' when a command has ended (or ends within `wait` s) with a failure."""
        if self.pipe is None:
            return None
        try:
            status = self.pipe.proc.wait(wait)
        except Exception:  # subprocess.TimeoutExpired: still running, so not the explanation
            return None
        if status in (*self.pipe.ignore_status, -signal.SIGPIPE):
            return None
        return f"its {'command' if self.group else 'download command'} exited with status {status}"

    def finish(self):
        """After the tar's end: let the command exit (a stall if it does not); raise if it failed."""
        if self.pipe is None:
            return
        self.pipe.stream.close()  # a command still writing (padding after the tar's end) gets SIGPIPE
        try:
            self.pipe.proc.wait(self.timeout)
        except Exception:  # subprocess.TimeoutExpired
            self.stop()
            raise Stalled(f"its command did not exit within {self.timeout:g} s of the end of its data") from None
        if problem := self.exit_problem():  # 0 and SIGPIPE (as gopen counts them) are fine
            raise OSError(problem)

    def stop(self):
        """Kill the command (its whole process group, for a pipe: command) and reap it."""
        if self.pipe is None:
            return
        try:
            if self.group:
                os.killpg(self.pipe.proc.pid, signal.SIGKILL)  # the shell and everything it started
            elif self.pipe.proc.poll() is None:
                self.pipe.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass  # already gone
        self.pipe.proc.wait()

    def close(self):
        if not self.closed:
            if self.pipe is not None:
                self.pipe.stream.close()  # also tells Pipe.__del__ that nothing is left to wait for
                self.stop()
            else:
                self.file.close()
        super().close()
