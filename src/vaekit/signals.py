"""Stopping long runs cleanly: SIGTERM and SIGINT become a request to checkpoint and stop."""

import contextlib
import logging
import signal
import threading

log = logging.getLogger("vaekit")


def ignore_stop_signals(worker_id=None):
    """DataLoader workers ignore SIGTERM and SIGINT, which schedulers and Ctrl-C send to the whole process group.

    Otherwise the workers die first and the main process fails with a DataLoader error instead of
    finishing its step and saving a checkpoint; the loader still shuts its workers down on exit.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def stop_on_signals(logger=log):
    """Catch SIGTERM and SIGINT as a request to stop; yields {"signal": name or None}. A second signal stops at once."""
    requested = {"signal": None}

    def handler(signum, frame):
        if requested["signal"] is not None:
            raise KeyboardInterrupt
        requested["signal"] = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after this step, then stopping.", requested["signal"])

    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
