"""Lock files that work on every file system: exclusive-create files naming their owner, with a heartbeat.

`fcntl.flock` raises ENOSYS on parallel file systems mounted without flock support (Lustre's
default, some NFS setups) and means nothing across nodes. Creating a file with O_CREAT | O_EXCL is
atomic on all of them. The file holds the owner's host, pid and start time; the owner refreshes
its mtime (the heartbeat) while it works. A lock is stale when its owner is a dead process on this
host, or when its heartbeat is older than `stale_after` seconds (an owner on another host cannot be
asked), and a stale lock is taken over.
"""

import json
import os
import socket
import threading
import time
from pathlib import Path

from vaekit.io import storage_errors


HOST = socket.gethostname()


def process_alive(pid):
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(path):
    """The owner record of a lock file ({"host", "pid", "started"}), or None if it is gone or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def stale_reason(path, stale_after):
    """Why the lock at `path` may be taken over, or None while its owner may still be working."""
    owner = read_owner(path)
    try:
        age = time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return "released"
    if owner is None:
        # Created but not yet written (the owner is between open and write), or torn by a crash.
        return "unreadable owner record" if age > 60 else None
    if owner.get("host") == HOST and not process_alive(int(owner.get("pid", -1))):
        return f"process {owner.get('pid')} on this host has ended"
    if age > stale_after:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe_owner(path):
    """'host H, pid P, heartbeat N s ago' for messages."""
    owner = read_owner(path) or {}
    try:
        age = f"{time.time() - os.stat(path).st_mtime:.0f} s ago"
    except OSError:
        age = "unknown"
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, heartbeat {age}"


def try_lock(path, stale_after):
    """Create the lock file at `path` for this process; True on success, False while another owner holds it."""
    path = Path(path)
    record = json.dumps({"host": HOST, "pid": os.getpid(), "started": time.time()})
    for _ in range(3):  # a stale lock is removed and creation retried; a racing taker may win instead
        try:
            with storage_errors(path):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if stale_reason(path, stale_after) is None:
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return True
    return False


def release(path):
    """Remove a lock file this process holds (only if it still names this process)."""
    owner = read_owner(path)
    if owner is not None and owner.get("host") == HOST and owner.get("pid") == os.getpid():
        Path(path).unlink(missing_ok=True)


class Heartbeat:
    """Touches a set of held lock files every `every` seconds from a daemon thread."""

    def __init__(self, every):
        self.every = every
        self.paths = set()
        self.guard = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="vaekit-lock-heartbeat", daemon=True)

    def add(self, path):
        """Keep `path` alive from now on."""
        with self.guard:
            self.paths.add(Path(path))
        if not self.thread.is_alive() and not self.stop.is_set():
            self.thread.start()

    def discard(self, path):
        """Stop touching `path`."""
        with self.guard:
            self.paths.discard(Path(path))

    def close(self):
        """Stop the thread."""
        self.stop.set()

    def _loop(self):
        while not self.stop.wait(self.every):
            with self.guard:
                paths = list(self.paths)
            for path in paths:
                try:
                    os.utime(path)
                except OSError:  # released meanwhile, or the file system hiccuped: the next beat retries
                    pass
