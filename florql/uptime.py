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


def launch_cost_s() -> float | None:
    """What reaching this point cost the process: its age, or its CPU time where that is less.

    A run records this as the start a cold replay pays (interpreter, imports, the script's set-up).
    A recording made while the machine was busy waited for the cores, and its age says so (a run
    recorded beside other work once made every cold estimate ~1.7× the replay's actual time); its
    CPU time does not wait. Where set-up ran on several threads, the CPU time exceeds the age, and
    the age is the cost."""
    age = process_age_s()
    if age is None:
        return None
    return round(min(age, time.process_time()), 3)
