"""How long this process has lived: what a command or a replay pays before florql's own work."""

from __future__ import annotations

import os
import time


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where that cannot be read.

    /proc gives the start in clock ticks since boot, on the boot-time clock: read against that
    clock it is exact to a tick (10 ms). (Against the wall clock and /proc/stat's `btime`, whole
    seconds, it was off by up to a second.)"""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME
        return None
    return round(max(now - started_ticks / os.sysconf("SC_CLK_TCK"), 0.0), 3)
