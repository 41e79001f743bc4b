"""Named points where a test stops or kills this process: deterministic replays of pauses and crashes.

Races between processes (a writer paused between two renames, a finaliser that computed its catalog
before another run published a unit) cannot be tested reliably with sleeps. The code that publishes
marks each step with `fault_point(name, unit)`; a test starts a process with

    VAEKIT_STOP_AT="index-fenced:3"     the process SIGSTOPs itself there (the test sees it stopped,
                                        runs the other process, then sends SIGCONT)
    VAEKIT_KILL_AT="repair-moved:1"     the process SIGKILLs itself there (a crash at that step)

Several points are separated by commas; `name` alone matches every unit. Unset (the normal case), a
point costs one environment lookup. The points are listed in DEVELOPERS.md.
"""

import os
import signal


def _matches(spec, name, unit):
    for item in spec.split(","):
        point, _, which = item.strip().partition(":")
        if point == name and (not which or (unit is not None and int(which) == unit)):
            return True
    return False


def fault_point(name, unit=None):
    """Stop or kill this process here when VAEKIT_STOP_AT / VAEKIT_KILL_AT names this point."""
    stop, kill = os.environ.get("VAEKIT_STOP_AT"), os.environ.get("VAEKIT_KILL_AT")
    if kill and _matches(kill, name, unit):
        os.kill(os.getpid(), signal.SIGKILL)
    if stop and _matches(stop, name, unit):
        os.kill(os.getpid(), signal.SIGSTOP)
