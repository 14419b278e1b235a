"""The run manifest (`runs/<id>/run.json`): what the recorder writes about a run, typed.

The file is plain JSON. Readers parse it with `Manifest.from_json`, which fills fields an older
recorder did not write with their defaults and ignores fields it does not know, so run files of
every florql version load.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that name a field of `cls`; a null where the field has a non-null
    default (a list, a dict, a count, a flag) reads as that default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if value is None and (f.default is not None or f.default_factory is not dataclasses.MISSING):
            continue
        out[f.name] = value
    return out


@dataclass
class Env:
    """The machine and library versions a run recorded on."""

    python: str | None = None
    torch: str | None = None
    cuda: str | None = None
    platform: str | None = None
    hostname: str | None = None
    pid: int | None = None
    device: str | None = None
    torch_threads: int | None = None  # replay uses the same count: reductions depend on it
    cuda_devices: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Env:
        return cls(**_known(cls, data if isinstance(data, dict) else {}))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["cuda_devices"] is None:
            del out["cuda_devices"]  # written only where CUDA is available, as before
        return out


@dataclass
class Manifest:
    """One run as its recorder describes it; times are UNIX seconds."""

    run_id: int | None = None
    script: str | None = None  # absolute path of the script, None when not run from a file
    script_rel: str | None = None  # relative to project_root
    cwd_rel: str | None = None
    project_root: str | None = None
    argv: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)  # florql.arg values
    code_version: str | None = None
    git_commit: str | None = None
    env: Env = field(default_factory=Env)
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    status: str = "running"  # running | finished | failed
    error: str | None = None
    outer_loop: str | None = None
    outer_planned: int | None = None
    outer_completed: int = 0
    outer_broke_early: bool = False
    iteration_s: list[float] = field(default_factory=list)  # per completed outer iteration
    setup_s: float | None = None  # from florql's start in the script to its outer loop (the script's set-up)
    launch_s: float | None = None  # interpreter start → florql's (CPU time if less): a cold replay's first cost
    setup_import_s: float | None = None  # of setup_s, importing what a replay's warm fork has imported already
    inner_s: list[float] = field(default_factory=list)
    checkpoint_budget: float | None = None
    checkpoint_objects: list[str] = field(default_factory=list)
    checkpoints: dict[str, Any] = field(default_factory=dict)  # the adaptive policy's report
    last_checkpoint: str | None = None
    uncaptured: list[str] = field(default_factory=list)  # names checkpoints could not capture
    inputs: list[dict[str, Any]] = field(default_factory=list)  # data files read (storage.inputs.InputFile)
    folders: list[str] = field(default_factory=list)  # folders below project_root at start (relative)
    unrecorded: list[str] = field(default_factory=list)  # what the run used that a replay cannot get back
    skip_blockers: list[str] = field(default_factory=list)  # why a helper's inner loop cannot be skipped

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"a run manifest is a JSON object, not {type(data).__name__}")
        known = _known(cls, data)
        if "env" in known:
            known["env"] = Env.from_dict(known["env"])
        return cls(**known)

    @classmethod
    def from_json(cls, body: bytes | str) -> Manifest:
        return cls.from_dict(json.loads(body))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["env"] = self.env.to_dict()
        return out

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), default=str, indent=indent)

    def update(self, **fields: Any) -> None:
        """Set fields by name; a name that is not a field is an error (no silent typos)."""
        for name, value in fields.items():
            if name not in _FIELDS:
                raise AttributeError(f"the run manifest has no field {name!r}")
            setattr(self, name, value)


_FIELDS = frozenset(f.name for f in dataclasses.fields(Manifest))
