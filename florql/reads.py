"""Files the training script reads (config files) join its code version.

The audit hook is installed when florql is imported, so a config read before the first florql
call is seen too. Paths are made absolute when the file is opened (the script may chdir later).
A process that turns out to be the query side (`florql.connect`, the CLI, the server) calls
`stop()`: it records nothing, and a long-running server's set never grows.
"""

from __future__ import annotations

import os
import sys

READ_FILES: set[str] = set()
_WRITE_MODES = ("w", "a", "x", "+")


_recording = True


def stop() -> None:
    """This process does not record a run: stop collecting the paths it opens."""
    global _recording
    _recording = False
    READ_FILES.clear()


def _audit(event: str, payload: tuple) -> None:
    if not _recording or event != "open" or not payload or not isinstance(payload[0], str):
        return
    mode = payload[1] if len(payload) > 1 else "r"
    if isinstance(mode, str) and any(m in mode for m in _WRITE_MODES):
        return
    if not payload[0].endswith((".py", ".pyc")):
        READ_FILES.add(os.path.abspath(payload[0]))


sys.addaudithook(_audit)
