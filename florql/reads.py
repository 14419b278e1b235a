"""What the training script reads and writes, seen through Python's audit hooks.

The hook is installed when florql is imported, so a file read before the first florql call is
seen too. Paths are made absolute when the file is opened (the script may chdir later). A file
the process wrote before it first read it is the run's own output, not an input: a replay writes
it again. A process that turns out to be the query side (`florql.connect`, the CLI, the server)
calls `stop()`: it records nothing, and a long-running server's sets never grow.
"""

from __future__ import annotations

import os
import sys
import threading

from florql.storage.inputs import opens_for_writing

READ_FILES: dict[str, bool] = {}  # absolute path → read by an absolute path (at least once)
WRITTEN_FILES: set[str] = set()
CONNECTIONS: list[str] = []  # network addresses the script connected to (downloads are not recorded)
_MAX_CONNECTIONS = 20

_recording = True


def stop() -> None:
    """This process does not record a run: stop collecting the paths it opens."""
    global _recording
    _recording = False
    READ_FILES.clear()
    WRITTEN_FILES.clear()
    CONNECTIONS.clear()


def _audit(event: str, payload: tuple) -> None:
    if not _recording:
        return
    if event == "socket.connect":
        # florql's own threads (run files on an object store) are not the script's downloads
        if len(CONNECTIONS) < _MAX_CONNECTIONS and not threading.current_thread().name.startswith("florql"):
            CONNECTIONS.append(_address(payload))
        return
    if event != "open" or not payload or not isinstance(payload[0], str):
        return
    if threading.current_thread().name.startswith("florql"):  # florql's own files (a persist's folder fsync)
        return
    path = payload[0]
    if path.endswith((".py", ".pyc")):
        return
    try:
        absolute = os.path.abspath(path)
    except OSError:  # the working folder is gone (e.g. being removed): no file of the script's
        return
    if opens_for_writing(payload[1] if len(payload) > 1 else None, payload[2] if len(payload) > 2 else None):
        WRITTEN_FILES.add(absolute)
    elif absolute not in WRITTEN_FILES:
        READ_FILES[absolute] = READ_FILES.get(absolute, False) or os.path.isabs(path)


def _address(payload: tuple) -> str:
    address = payload[1] if len(payload) > 1 else None
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


sys.addaudithook(_audit)
