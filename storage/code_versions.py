"""Content-addressed copies of the source a run executed: blobs by SHA-256, versions by manifest."""

from __future__ import annotations

import hashlib
import json
import os

from florql.storage import layout
from florql.storage.runfiles import RunFiles


def save_code_version(files: RunFiles, sources: dict[str, bytes]) -> str:
    """Store `sources` ({relative path: bytes}); returns the version id (a digest of the manifest)."""
    manifest: dict[str, str] = {}
    for rel, data in sorted(sources.items()):
        digest = hashlib.sha256(data).hexdigest()
        blob = layout.code_blob_path(digest)
        if not files.exists(blob):
            files.put(blob, data)
        manifest[rel] = digest
    body = json.dumps({"files": manifest}, sort_keys=True).encode()
    version = hashlib.sha256(body).hexdigest()[:20]
    path = layout.code_version_path(version)
    if not files.exists(path):
        files.put(path, body)
    return version


def code_version_manifest(files: RunFiles, version: str) -> dict[str, str]:
    return json.loads(files.get(layout.code_version_path(version)))["files"]


def load_code_version(files: RunFiles, version: str) -> dict[str, bytes]:
    return {rel: files.get(layout.code_blob_path(d)) for rel, d in code_version_manifest(files, version).items()}


def materialize(sources: dict[str, bytes], dest: str, boundary: str | None = None) -> None:
    """Write `sources` under `dest` (paths relative to it, `../` included), refusing any that would
    land outside `boundary` (by default `dest` itself)."""
    dest = os.path.abspath(dest)
    fence = os.path.abspath(boundary or dest)
    for rel, data in sources.items():
        target = os.path.abspath(os.path.join(dest, rel))
        if not target.startswith(fence + os.sep):
            raise ValueError(f"code version path {rel!r} escapes the sandbox")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(data)
