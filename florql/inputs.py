"""What a recorded run takes from its surroundings: data files it reads and the folders around it.

Replays run the recorded code in a sandbox laid out like the original file system (see
`florql.replay.sandbox`), so they need the same files at the same relative places:
- small files (≤ `SMALL_FILE_BYTES`, up to `STORED_BYTES` in all) join the code version by content;
- larger ones are recorded by path, size, times and a SHA-256 computed by a background thread
  (cached in the store, so an unchanged file is hashed once across runs); a replay uses them in
  place and refuses when they changed;
- the folders below the project root that exist at start (structure only), so a script writing
  into `results/` finds it;
- what cannot be recorded (network connections) is said on stderr and kept in the manifest.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
from collections.abc import Callable

from florql import reads
from florql.storage.inputs import InputFile, digest_of, stat_input
from florql.storage.runfiles import RunFiles

SMALL_FILE_BYTES = 1 << 20
STORED_BYTES = 64 << 20
MAX_INPUTS = 5000  # a manifest lists at most this many files; more are reported as unrecorded
MAX_FOLDERS = 5000
SKIPPED_FOLDERS = frozenset({".git", ".hg", ".svn", "__pycache__", ".venv", "venv", "node_modules", ".florql"})
_SYSTEM = ("/proc/", "/sys/", "/dev/", "/etc/", "/usr/", "/lib/", "/lib64/", "/bin/", "/sbin/", "/run/")


class InputRecorder:
    def __init__(self, files: RunFiles, root: str, ignored: tuple[str, ...], on_change: Callable[[], None]) -> None:
        self.files = files
        self.root = root
        self.ignored = ignored + tuple({sys.prefix + os.sep, sys.base_prefix + os.sep, sys.exec_prefix + os.sep})
        self.on_change = on_change
        self.records: dict[str, InputFile] = {}  # absolute path → record
        self.contents: dict[str, bytes] = {}  # rel → bytes of the stored (small) files
        self.stored_bytes = 0
        self.overflow = 0
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._pending: queue.Queue[InputFile] = queue.Queue()
        self._hasher: threading.Thread | None = None

    # ---- data files ---------------------------------------------------------------------------
    def collect(self) -> None:
        """Record the files read since the last call: small ones by content now, large ones by
        stat now and by hash in the background."""
        # A copy in one step: iterating the dict itself can let another thread (the script's) run and add to it.
        for path, absolute in reads.READ_FILES.copy().items():
            record = self.records.get(path)
            if record is not None:
                record.absolute |= absolute
                continue
            if path in self._seen or path in reads.WRITTEN_FILES or self._ignored(path):
                continue
            self._seen.add(path)
            record = stat_input(path, os.path.relpath(path, self.root).replace(os.sep, "/"), absolute)
            if record is None:
                continue
            if len(self.records) >= MAX_INPUTS:
                self.overflow += 1
                continue
            self._admit(record)

    def _admit(self, record: InputFile) -> None:
        if record.size <= SMALL_FILE_BYTES and self.stored_bytes + record.size <= STORED_BYTES:
            try:
                with open(record.path, "rb") as f:
                    data = f.read()
            except OSError:
                return
            record.sha256 = hashlib.sha256(data).hexdigest()
            record.stored = True
            self.contents[record.rel] = data
            self.stored_bytes += len(data)
        else:
            self._pending.put(record)
            self._start_hasher()
        with self._lock:
            self.records[record.path] = record

    def _ignored(self, path: str) -> bool:
        parts = path.split(os.sep)
        return (
            path.startswith(self.ignored + _SYSTEM)
            or "site-packages" in parts
            or "dist-packages" in parts
            or "__pycache__" in parts
        )

    def _start_hasher(self) -> None:
        if self._hasher is None:
            self._hasher = threading.Thread(target=self._hash_pending, name="florql-input-hasher", daemon=True)
            self._hasher.start()

    def _hash_pending(self) -> None:
        while True:
            record = self._pending.get()
            try:
                digest = digest_of(self.files, record)
                with self._lock:
                    record.sha256 = digest
                self.on_change()
            except OSError:
                pass  # gone or unreadable: its stat stands; a replay refuses if it changed
            finally:
                self._pending.task_done()

    def wait(self) -> None:
        """Until every large file read so far is hashed (at the end of the run)."""
        self._pending.join()

    def entries(self) -> list[dict]:
        with self._lock:
            return [r.to_dict() for r in sorted(self.records.values(), key=lambda r: r.rel)]

    def unrecorded(self) -> list[str]:
        notes = [f"a network connection to {address}" for address in dict.fromkeys(reads.CONNECTIONS)]
        if self.overflow:
            notes.append(f"{self.overflow} more files read (a run records at most {MAX_INPUTS})")
        return notes

    # ---- folders ------------------------------------------------------------------------------
    def folders(self) -> list[str]:
        """Folders below the project root now (relative), hidden and tool folders left out."""
        out: list[str] = []
        for folder, subdirs, _ in os.walk(self.root):
            subdirs[:] = sorted(
                d
                for d in subdirs
                if d not in SKIPPED_FOLDERS
                and not d.startswith(".")
                and not self._ignored(os.path.join(folder, d) + os.sep)
            )
            for d in subdirs:
                out.append(os.path.relpath(os.path.join(folder, d), self.root).replace(os.sep, "/"))
            if len(out) >= MAX_FOLDERS:
                return out[:MAX_FOLDERS]
        return out
