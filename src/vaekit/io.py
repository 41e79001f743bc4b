"""Atomic file and folder writes: a killed process never leaves a half-written output that looks whole."""

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from pathlib import Path

from vaekit.errors import VaekitError

# Write failures a user fixes outside vaekit (space, quota, permissions), and how to say them.
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
    errno.EROFS: "the file system is read-only",
}

# Names that interrupted writes leave behind: ours (`.NAME.OWNER.XXXXXXXX.tmp`, files and folders), the
# `.tmpXXXXXX` files of libraries written in Rust (safetensors' tempfile crate), and the folders of
# vaekit releases before `.tmp` was appended (`.checkpoint-000100.XXXXXXXX`, `.vae.XXXXXXXX`).
TEMPORARY_NAME = re.compile(r"^\.(.+\.tmp|tmp[A-Za-z0-9]{6,}|(checkpoint-\d+|vae)\.[a-z0-9_]{8})$")

HOST = socket.gethostname()

# The owner tag in a temporary's name: `h` + crc32 of the host name, `p` + the pid. Host names may hold
# dots and other characters that do not belong in a file name; a 32-bit digest is enough to tell hosts
# sharing a folder apart.
OWNER_TAG = re.compile(r"\.h([0-9a-f]{8})p(\d+)\.")


def host_tag(host=HOST):
    """The 8 hex digits that stand for `host` in owner tags."""
    return f"{zlib.crc32(host.encode('utf-8', 'surrogateescape')):08x}"


def owner_tag():
    """`hHHHHHHHHpPID`: which process on which host writes a temporary (every temporary name carries it)."""
    return f"h{host_tag()}p{os.getpid()}"


def process_alive(pid):
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def abandoned(path, name=None, stale_after=None):
    """Whether the temporary at `path` was left by a writer that is gone, so it may be removed.

    A name with an owner tag of this host belongs to a live writer exactly while that pid runs; one of
    another host (which cannot be asked) once untouched for `stale_after` seconds. An untagged name
    (libraries' temporaries, older releases) counts as another host's. With `stale_after` None the
    caller owns the folder alone (a training run folder), so only live processes' names are kept.
    """
    match = OWNER_TAG.search(name or Path(path).name)
    if match and match.group(1) == host_tag():
        return not process_alive(int(match.group(2)))
    if stale_after is None:
        return True
    try:
        return time.time() - os.lstat(path).st_mtime > stale_after
    except FileNotFoundError:
        return False


def storage_error(error):
    """The reason text of a write failure caused by the storage (space, quota, permissions), or None."""
    if isinstance(error, OSError) and error.errno in STORAGE_ERRORS:
        return STORAGE_ERRORS[error.errno]
    # safetensors reports OS errors in its own exception type, with the errno only in the text.
    match = re.search(r"os error (\d+)", str(error)) if type(error).__name__ == "SafetensorError" else None
    if match and int(match.group(1)) in STORAGE_ERRORS:
        return STORAGE_ERRORS[int(match.group(1))]
    return None


def full_disk(path):
    """Whether the file system holding `path` has (almost) no space left: torch.save's write errors carry no errno."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


@contextlib.contextmanager
def storage_errors(path):
    """Turn a write that fails for lack of space or permissions into one VaekitError saying what to do."""
    try:
        yield
    except Exception as e:
        reason = storage_error(e)
        if reason is None and isinstance(e, RuntimeError) and "write" in str(e) and full_disk(path):
            reason = STORAGE_ERRORS[errno.ENOSPC]
        if reason is None:
            raise
        raise VaekitError(
            f"Cannot write {path}: {reason}. Nothing already written was changed; free space or fix the "
            f"permissions of {Path(path).parent}, then run the same command again to continue where it stopped."
        ) from None


def ensure_folder(path):
    """mkdir -p, with a clear error when the folder cannot be created."""
    with storage_errors(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def remove_temporaries(folder, stale_after=None):
    """Delete what interrupted atomic writes left in `folder` (not recursive); returns how many were removed.

    Only temporaries whose writer is gone (see `abandoned`): a folder several processes write to, such
    as a latent cache, passes `stale_after` so a live writer's temporary is never pulled from under it.
    """
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if TEMPORARY_NAME.match(entry.name) and abandoned(entry, stale_after=stale_after):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
    return removed


def umask_mode(mode=0o666):
    """`mode` with the process umask applied: the permissions an ordinary open() or mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def apply_umask(folder):
    """Give a folder and everything in it the permissions an ordinary mkdir / open would (the umask's).

    Temporary folders are created 0700, and safetensors writes its files through 0600 temporaries;
    renamed into place as they are, colleagues on a shared cluster could not read an export.
    """
    file_mode, folder_mode = umask_mode(0o666), umask_mode(0o777)
    os.chmod(folder, folder_mode)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    ensure_folder(path.parent)
    with storage_errors(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with storage_errors(path):
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, umask_mode(0o666))  # mkstemp makes the file private (0600)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a temporary folder beside `path`; it replaces `path` (file or folder) only if the block succeeds.

    An existing `path` is moved aside, the new folder renamed in, and the old one removed, so at every
    moment `path` is either the old complete folder or the new complete one.
    """
    path = Path(path)
    ensure_folder(path.parent)
    with storage_errors(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent))
    try:
        with storage_errors(path):
            yield tmp
        apply_umask(tmp)  # mkdtemp makes the folder private (0700), and libraries write some files 0600
        if path.exists():
            old = path.with_name(f".{path.name}.old.{owner_tag()}.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path, text):
    """Write a text file atomically, as UTF-8; characters that cannot be encoded are written as escapes.

    File names that are not valid UTF-8 reach Python as lone surrogates; a report or list naming one
    must still be written rather than fail after the work is done.
    """
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8", errors="backslashreplace")


def append_lines(path, lines):
    """Append text lines in one write and fsync: a kill leaves at most one torn last line."""
    if not lines:
        return
    with storage_errors(path), open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    """Write a JSON file atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors(tensors, path, metadata=None):
    """Save a dict of tensors as safetensors atomically; metadata values must be strings."""
    from safetensors.torch import save_file  # safetensors imports torch: keep this module light for the CLI

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
