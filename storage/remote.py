"""Run files on a shared filesystem or an object store, through fsspec (`s3://bucket/prefix`, …).

Storage options (endpoint, credentials profile, …) come from `$FLORQL_STORAGE_OPTIONS`, a JSON
object passed to fsspec, or from fsspec's and the backend's own configuration
(`FSSPEC_S3_*`, `AWS_ENDPOINT_URL`, `~/.aws/…`). They are read from the environment so that every
process that opens the same URL — trainer, replay worker, query side — reaches the same place.

Atomic visibility:
- Object stores (S3, GCS, Azure) show an object only once its single PUT (or the completion of a
  multipart upload) succeeded, so data goes straight to its final key in one upload.
- Any other fsspec filesystem (SFTP, HDFS, …) is written to a `.tmp-` sibling and renamed; we rely
  on that filesystem's rename being atomic, as POSIX-like filesystems guarantee.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

from florql.storage.errors import UsageError
from florql.storage.runfiles import TMP_PREFIX, RunFiles

OPTIONS_ENV = "FLORQL_STORAGE_OPTIONS"
# Protocols where one upload is atomic: an object becomes visible whole or not at all.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}
# Protocols where an exclusive create may be a conditional PUT (`If-None-Match: *`).
CONDITIONAL_PUT = {"s3", "s3a"}


class FsspecRunFiles(RunFiles):
    def __init__(self, url: str, **storage_options: Any) -> None:
        try:
            import fsspec

            options = {**_env_options(), **storage_options}
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            raise UsageError(
                f"run files at {url} need fsspec and its backend: pip install 'florql[s3]' ({exc})"
            ) from None
        self.url = url
        self.root = root.rstrip("/")
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.atomic_upload = protocol in OBJECT_STORES
        self._conditional: bool | None = None if protocol in CONDITIONAL_PUT else False

    def _abs(self, path: str) -> str:
        return f"{self.root}/{path}"

    def _rel(self, full: str) -> str:
        return full[len(self.root) + 1 :]

    # ---- writes -------------------------------------------------------------------------------
    def put(self, path: str, data: bytes, *, durable_name: bool = True) -> None:
        target = self._abs(path)
        if self.atomic_upload:
            self.fs.pipe_file(target, data)
            return
        with self._renamed_into(target) as tmp:
            self.fs.pipe_file(tmp, data)

    @contextlib.contextmanager
    def writer(self, path: str, *, durable_name: bool = True) -> Iterator[BinaryIO]:
        # Streams go to a local temp file and are uploaded whole on a clean exit only, so an
        # aborted or killed writer never leaves a partial object (an interrupted multipart upload
        # is not an object; a bucket lifecycle rule reclaims its parts).
        with tempfile.NamedTemporaryFile(prefix="florql-upload-") as local:
            yield local  # type: ignore[misc]
            local.flush()
            target = self._abs(path)
            if self.atomic_upload:
                self.fs.put_file(local.name, target)
                return
            with self._renamed_into(target) as tmp:
                self.fs.put_file(local.name, tmp)

    @contextlib.contextmanager
    def _renamed_into(self, target: str) -> Iterator[str]:
        tmp = posixpath.join(posixpath.dirname(target), f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            yield tmp
            self.fs.mv(tmp, target)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def create(self, path: str, data: bytes) -> bool:
        if self.exists(path):
            return False
        if self._conditional_puts():
            try:
                self.fs.pipe_file(self._abs(path), data, mode="create")
            except FileExistsError:
                return False
            return True
        return self._create_by_claim(path, data)

    def _conditional_puts(self) -> bool:
        """Whether the store honours `If-None-Match: *` (AWS S3 does; some S3-compatible stores
        ignore it silently, which would make two creators both win): probed once by creating the
        same probe object twice."""
        if self._conditional is None:
            probe = self._abs(f"{TMP_PREFIX}probe-{uuid.uuid4().hex}")
            try:
                self.fs.pipe_file(probe, b"", mode="create")
                self.fs.pipe_file(probe, b"", mode="create")
                self._conditional = False
            except FileExistsError:
                self._conditional = True
            except (OSError, NotImplementedError, ValueError):
                self._conditional = False
            finally:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(probe)
        return self._conditional

    def _create_by_claim(self, path: str, data: bytes) -> bool:
        """Exclusive create without compare-and-swap, relying only on list-after-write consistency
        (S3 since 2020, GCS, Azure, POSIX). Each contender writes a unique claim object, then lists
        the claims, and wins only when its own claim is the only one there. Of two contenders, the
        one that lists second sees the other's claim, so at most one wins. (Letting the
        lexicographically smallest claim win instead is unsafe: a late contender with a smaller
        token would win after an earlier one already had.) Under contention both may lose; that
        is safe, and callers such as run-id allocation move on to the next name. The winner's
        claim stays, so later contenders lose even before the data lands."""
        folder, name = posixpath.split(self._abs(path))
        claims = f"{folder}/{TMP_PREFIX}claims-{name}"
        token = uuid.uuid4().hex
        mine = f"{claims}/{token}"
        self.fs.pipe_file(mine, b"")
        self.fs.invalidate_cache(claims)
        if [p for p in self.fs.ls(claims, detail=False) if posixpath.basename(p) != token]:
            self.fs.rm_file(mine)
            return False
        self.put(path, data)
        return True

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._abs(path))

    # ---- reads --------------------------------------------------------------------------------
    def get(self, path: str) -> bytes:
        return self.fs.cat_file(self._abs(path))

    def exists(self, path: str) -> bool:
        target = self._abs(path)
        self.fs.invalidate_cache(target)  # fsspec caches listings; other processes write here
        return self.fs.exists(target)

    def list(self, prefix: str) -> list[str]:
        base = self._abs(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        found = (self._rel(p) for p in self.fs.find(base))
        return sorted(p for p in found if not _in_flight(p))

    def list_unfinished(self, prefix: str) -> builtins.list[str]:  # `list` is a method here
        base = self._abs(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        found = (self._rel(p) for p in self.fs.find(base))
        return sorted(p for p in found if posixpath.basename(p).startswith(TMP_PREFIX))

    def file_info(self, path: str) -> tuple[int | None, float | None]:
        target = self._abs(path)
        size = self.fs.info(target).get("size")
        try:
            modified: float | None = self.fs.modified(target).timestamp()
        except (NotImplementedError, AttributeError, OSError):  # not every backend keeps it
            modified = None
        return size, modified

    def list_dirs(self, prefix: str) -> builtins.list[str]:  # `list` is a method here
        base = self._abs(prefix).rstrip("/")
        self.fs.invalidate_cache(base)
        try:
            entries = self.fs.ls(base, detail=True)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory")
        return sorted(n for n in names if not n.startswith(TMP_PREFIX))


def _in_flight(rel: str) -> bool:
    """Temp files, claim folders and probes: anything with a `.tmp-` path component."""
    return any(part.startswith(TMP_PREFIX) for part in rel.split("/"))


def _env_options() -> dict[str, Any]:
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"${OPTIONS_ENV} must be a JSON object of fsspec storage options: {exc}") from None
    if not isinstance(options, dict):
        raise UsageError(f"${OPTIONS_ENV} must be a JSON object of fsspec storage options")
    return options
