"""The replay sandbox: a temporary folder laid out like the file system the recorded run saw.

The project root sits at its original absolute path below the sandbox (`<sandbox>/home/u/proj`),
so every relative path the script uses — `results/`, `traindata.pt`, `../data`, `../out/` —
resolves to the same place relative to the sandbox as it did in the run, and what the replay
writes there stays inside it. The sandbox holds:
- the run's code version: its sources and the small data files it read, by content;
- the folders that existed below the project root when the run started (empty);
- the large data files it read, as read-only links to where they are, once each is verified
  unchanged (a changed file fails the job: a wrong answer is never acceptable);
and a write through one of those links replaces the link first, so the user's file is never touched.
A small data file the replay opens outside the sandbox (by an absolute path) is checked when it
is opened, since only then do we know the replay reads it from there rather than from its copy.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

from florql.replay.jobs import JobSpec
from florql.storage.code_versions import load_code_version, materialize
from florql.storage.errors import InputChanged
from florql.storage.inputs import InputFile, opens_for_writing, problem_with
from florql.storage.manifest import Manifest
from florql.storage.runfiles import RunFiles


def lay_out(files: RunFiles, spec: JobSpec, manifest: Manifest, sandbox: str) -> tuple[str, str]:
    """Lay the run's files out in `sandbox`; returns (the script's path, the working folder)."""
    root = mirrored(sandbox, manifest.project_root)
    inputs = [InputFile.from_dict(d) for d in manifest.inputs]
    check_inputs(files, spec.run_id, [r for r in inputs if not r.stored])
    sources = load_code_version(files, spec.code_version)
    sources.update({rel: text.encode() for rel, text in spec.patched.items()})
    materialize(sources, root, boundary=sandbox)
    for folder in manifest.folders:
        os.makedirs(inside(sandbox, os.path.join(root, folder)), exist_ok=True)
    for record in inputs:
        if not record.stored:
            link = inside(sandbox, os.path.join(root, record.rel))
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(record.path, link)
    sys.addaudithook(_guard(files, spec.run_id, sandbox, [r for r in inputs if r.stored]))
    workdir = os.path.normpath(os.path.join(root, spec.cwd_rel))
    os.makedirs(workdir, exist_ok=True)
    return os.path.join(root, spec.script_rel), workdir


def mirrored(sandbox: str, project_root: str | None) -> str:
    """Where the project root goes in the sandbox: at its own absolute path below it."""
    if not project_root:
        return sandbox
    _drive, rest = os.path.splitdrive(os.path.abspath(project_root))
    return os.path.join(sandbox, rest.lstrip("\\/"))


def inside(sandbox: str, path: str) -> str:
    target = os.path.abspath(path)
    if not target.startswith(os.path.abspath(sandbox) + os.sep):
        raise ValueError(f"{path!r} escapes the replay sandbox")
    return target


def check_inputs(files: RunFiles, run_id: int, inputs: list[InputFile]) -> None:
    """These data files still hold what the run read, or InputChanged names those that do not."""
    problems = [p for r in inputs if (p := problem_with(files, r))]
    if problems:
        raise InputChanged(
            f"run {run_id} cannot be replayed exactly: data it read changed since:\n  "
            + "\n  ".join(problems)
            + "\nPut the original files back to ask this run in hindsight, or record a new run."
        )


def _guard(files: RunFiles, run_id: int, sandbox: str, stored: list[InputFile]) -> Callable[[str, tuple], None]:
    """An audit hook for the replay: a stored data file read from its original place must be
    unchanged (else InputChanged); before a write through a link to a user's file, the link
    becomes a private copy (or nothing, when the file is truncated anyway)."""
    fence = os.path.abspath(sandbox) + os.sep
    outside = {r.path: r for r in stored}

    def hook(event: str, payload: tuple) -> None:
        if event != "open" or not payload or not isinstance(payload[0], str):
            return
        mode, flags = (payload[1], payload[2]) if len(payload) > 2 else (None, None)
        try:
            path = os.path.abspath(payload[0])
        except OSError:  # the working folder is gone: the sandbox is being removed
            return
        if not opens_for_writing(mode, flags):
            record = outside.pop(path, None)  # checked once
            if record is not None:
                check_inputs(files, run_id, [record])
        elif path.startswith(fence) and os.path.islink(path):
            target = os.path.realpath(path)
            os.unlink(path)
            truncates = (isinstance(flags, int) and flags & os.O_TRUNC) or (isinstance(mode, str) and "w" in mode)
            if not truncates and os.path.isfile(target):
                shutil.copyfile(target, path)

    return hook
