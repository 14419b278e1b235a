"""Data files a run read: who they are, what they hold, and whether they still hold it.

Small files join the run's code version by content. Large ones stay where they are and are
identified by path, size, times, inode and a SHA-256 of their content. Hashing a large file is
slow, so digests are cached in the store (`layout.input_hash_path`) keyed on the file's path and
checked against its stat: a file unchanged since any earlier run is never hashed again. The
change time (ctime) is part of the key because no program can set it back: a rewrite that
restores size and mtime still misses the cache and is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from florql.storage import layout
from florql.storage.runfiles import RunFiles

_CHUNK = 1 << 20
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def opens_for_writing(mode: object, flags: object) -> bool:
    """Whether an `open` audit event with this mode and these flags may write to the file."""
    if isinstance(flags, int):
        return bool(flags & _WRITE_FLAGS)
    return isinstance(mode, str) and any(m in mode for m in "wax+")


@dataclass
class InputFile:
    rel: str  # relative to the run's project root ('../data/x.pt' beside it)
    path: str  # absolute path when the run read it
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str | None = None  # None until hashed (a run killed first)
    stored: bool = False  # its content is in the code version
    absolute: bool = False  # the script opened it by an absolute path

    @classmethod
    def from_dict(cls, data: dict) -> InputFile:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_dict(self) -> dict:
        return asdict(self)

    def same_stat(self, st: os.stat_result) -> bool:
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (
            self.size,
            self.mtime_ns,
            self.ctime_ns,
            self.inode,
        )


def stat_input(path: str, rel: str, absolute: bool) -> InputFile | None:
    """The identity of a regular file now; None for anything else (a device, a folder, gone)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return InputFile(rel, path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, absolute=absolute)


def hash_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of(files: RunFiles, record: InputFile) -> str:
    """The SHA-256 of the file `record` describes: from the store's cache when its stat still
    matches, else hashed now (and cached)."""
    cache = layout.input_hash_path(record.path)
    try:
        cached = InputFile.from_dict(json.loads(files.get(cache)))
        if cached.sha256 and (cached.size, cached.mtime_ns, cached.ctime_ns, cached.inode) == (
            record.size,
            record.mtime_ns,
            record.ctime_ns,
            record.inode,
        ):
            return cached.sha256
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hash_file(record.path)
    try:
        st = os.stat(record.path)
    except OSError:
        return digest
    if record.same_stat(st):  # unchanged while we read it: worth caching
        files.put(cache, json.dumps(dict(record.to_dict(), sha256=digest)).encode())
    return digest


def problem_with(files: RunFiles, record: InputFile) -> str | None:
    """Why the file at `record.path` may no longer hold what the run read; None when it does."""
    try:
        st = os.stat(record.path)
    except OSError as exc:
        return f"{record.rel} ({record.path}) is gone: {exc.strerror or exc}"
    if record.same_stat(st):
        return None
    if record.sha256 is None:
        return f"{record.rel} ({record.path}) changed since the run read it and was never hashed (the run ended first)"
    now = stat_input(record.path, record.rel, record.absolute)
    if now is not None and digest_of(files, now) == record.sha256:
        return None
    return (
        f"{record.rel} ({record.path}) changed since the run read it: {record.size} bytes then, {st.st_size} now; "
        f"its content no longer has SHA-256 {record.sha256[:16]}…"
    )
