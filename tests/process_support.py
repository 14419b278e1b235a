"""Child processes that the tests stop with Ctrl-C (SIGINT), as a user at a terminal would."""

from __future__ import annotations

import signal


def ctrl_c_stops_it() -> None:
    """A `preexec_fn`: SIGINT at its default in the child. A job started in the background of a
    non-interactive shell (`pytest … &`) inherits SIGINT ignored, and Python keeps an ignored
    SIGINT ignored: the child's Ctrl-C handling would never run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
