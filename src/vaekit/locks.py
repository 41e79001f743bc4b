"""Lock files that work on every file system: exclusive-create files naming their owner, with a heartbeat.

`fcntl.flock` raises ENOSYS on parallel file systems mounted without flock support (Lustre's
default, some NFS setups) and means nothing across nodes. Creating a file with O_CREAT | O_EXCL is
atomic on all of them. The file holds the owner's host, pid, run token and start time; the owner
refreshes its mtime (the heartbeat) while it works. A lock is stale when its owner is a dead process
on this host, or when its heartbeat is older than `stale_after` seconds (an owner on another host
cannot be asked), and a stale lock is taken over.

A lock is a lease: a paused owner (SIGSTOP, a GC or NFS stall, a preempted VM) may lose it without
knowing. So an owner checks, before each step that publishes, that the file still holds its own
record (`lease_lost`); the heartbeat stops touching a lock that another process has taken over.
"""

import json
import os
import threading
import time
from pathlib import Path

from vaekit.io import HOST, process_alive, storage_errors

__all__ = ["HOST", "process_alive", "read_owner", "stale_reason", "describe_owner", "try_lock", "live_tokens",
           "lease_lost", "renew", "release", "Heartbeat"]


def read_owner(path):
    """The owner record of a lock file ({"host", "pid", "token", "started"}), or None if it is gone or unreadable."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def same_owner(a, b):
    """Whether two owner records name the same holder (host, pid, run token and start time)."""
    fields = ("host", "pid", "token", "started")
    return a is not None and b is not None and all(a.get(f) == b.get(f) for f in fields)


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
    try:
        pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
        pid = -1
    if owner.get("host") == HOST and not process_alive(pid):
        return f"process {owner.get('pid')} on this host has ended"
    if age > stale_after:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe_owner(path, owner=None):
    """'host H, pid P, heartbeat N s ago' for messages."""
    owner = owner or read_owner(path) or {}
    try:
        age = f"{time.time() - os.stat(path).st_mtime:.0f} s ago"
    except OSError:
        age = "unknown"
    return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, heartbeat {age}"


def try_lock(path, stale_after, token=""):
    """Create the lock file at `path` for this process.

    Returns the record written ({"host", "pid", "token", "started", "previous"}; "previous" is the
    owner record of a stale lock taken over, or None), or None while another owner holds the lock.
    """
    path = Path(path)
    record = {"host": HOST, "pid": os.getpid(), "token": token, "started": time.time()}
    previous = None
    for _ in range(3):  # a stale lock is removed and creation retried; a racing taker may win instead
        try:
            with storage_errors(path):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if stale_reason(path, stale_after) is None:
                return None
            previous = read_owner(path) or previous
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return {**record, "previous": previous}
    return None


def live_tokens(record):
    """{run token} of the stale owner a lock record was taken over from, while that process still runs on this
    host (paused, not dead: its files must stay); empty otherwise."""
    previous = (record or {}).get("previous") or {}
    try:
        alive = previous.get("host") == HOST and process_alive(int(previous.get("pid", -1)))
    except (TypeError, ValueError):
        alive = False
    return {previous["token"]} if alive and previous.get("token") else set()


def lease_lost(path, record):
    """None while the lock at `path` still holds `record`; else why this process no longer holds it."""
    owner = read_owner(path)
    if same_owner(owner, record):
        return None
    if owner is None:
        return ("its lock was taken over and released by another process (this process sent no heartbeat for "
                "longer than --lock_timeout: paused or stalled)")
    return (f"its lock was taken over by host {owner.get('host', '?')}, pid {owner.get('pid', '?')} "
            "(this process sent no heartbeat for longer than --lock_timeout: paused or stalled)")


def renew(path, record):
    """Refresh the heartbeat of a lock this process still holds; returns `lease_lost`'s answer."""
    lost = lease_lost(path, record)
    if lost is None:
        try:
            os.utime(path)
        except OSError:
            return lease_lost(path, record) or "its lock could not be renewed"
    return lost


def release(path, record=None):
    """Remove a lock file this process holds (only if it still names this process, and `record` when given)."""
    owner = read_owner(path)
    if owner is None or owner.get("host") != HOST or owner.get("pid") != os.getpid():
        return
    if record is not None and not same_owner(owner, record):
        return
    Path(path).unlink(missing_ok=True)


class Heartbeat:
    """Touches a set of held lock files every `every` seconds from a daemon thread.

    A lock whose file no longer holds this process's record (taken over while this process was paused)
    is no longer touched: its path goes to `lost` with the reason.
    """

    def __init__(self, every):
        self.every = every
        self.records = {}  # path -> the owner record this process wrote
        self.lost = {}  # path -> why the lease was lost
        self.guard = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="vaekit-lock-heartbeat", daemon=True)

    def add(self, path, record=None):
        """Keep `path` alive from now on (only while it holds `record`, when given)."""
        with self.guard:
            self.records[Path(path)] = record
        if not self.thread.is_alive() and not self.stop.is_set():
            self.thread.start()

    def discard(self, path):
        """Stop touching `path`."""
        with self.guard:
            self.records.pop(Path(path), None)

    def close(self):
        """Stop the thread."""
        self.stop.set()

    def _loop(self):
        while not self.stop.wait(self.every):
            with self.guard:
                held = list(self.records.items())
            for path, record in held:
                if record is None:
                    try:
                        os.utime(path)
                    except OSError:  # released meanwhile, or the file system hiccuped: the next beat retries
                        pass
                    continue
                lost = renew(path, record)
                if lost is not None and read_owner(path) is not None:  # another owner's lock: never touch it
                    with self.guard:
                        self.records.pop(path, None)
                        self.lost[path] = lost
