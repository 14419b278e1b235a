"""A replay job: one worker re-executes a range of a run's outer loop from a checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class JobSpec:
    job_id: str
    run_id: int
    runs_url: str  # where the run files live (RunFiles location)
    code_version: str
    script_rel: str
    cwd_rel: str
    argv: list[str]
    args: dict[str, Any]
    names: list[str]  # hindsight names to log (source 'replayed')
    audit_names: list[str]  # names the run logged: re-logged values are compared with the originals
    start: int  # first outer iteration visited (earlier ones are passed over)
    stop: int  # outer iterations [start, stop) are visited; the job ends after stop - 1
    log_from: int  # records before this outer iteration are suppressed
    restore_inner: dict[int, str] = field(
        default_factory=dict
    )  # iteration → 'inner_end' checkpoint replacing its first inner loop
    restore_before: tuple[int, str] | None = None  # (iteration, 'iter_end' checkpoint of the one before)
    patched: dict[str, str] = field(default_factory=dict)  # files of the code version with hindsight statements
    threads: int = 1
    expected_path: str | None = None  # run-files path of the original values to audit against
    mode: str = "re-execute"  # or 'skip' (every first inner loop restored from its checkpoint)
    versions: dict[str, str] = field(default_factory=dict)  # name → version of its statement
    est_s: float = 0.0
    est_work_s: float = 0.0  # the iterations' part of est_s
    recorded_exec_s: float = 0.0  # recorded time of the iterations it executes (PlannedJob)
    recorded_skip_s: float = 0.0  # recorded time of the tails of those it restores
    launched_at: float = 0.0  # UNIX time the executor launched the job (for measured start-up costs)
    warm: bool = False  # forked from a fork server already up (else it paid a cold start)
    checkpoint_at: list[int] = field(default_factory=list)  # executed iterations the run has no checkpoint of
    checkpoint_version: str | None = None  # the code version the state of this job's code belongs to

    def to_json(self) -> str:
        body = asdict(self)
        body["restore_inner"] = {str(k): v for k, v in self.restore_inner.items()}
        return json.dumps(body)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        body = json.loads(text)
        body["restore_inner"] = {int(k): v for k, v in body["restore_inner"].items()}
        if body.get("restore_before"):
            body["restore_before"] = tuple(body["restore_before"])
        return cls(**body)


@dataclass
class JobResult:
    job_id: str
    ok: bool
    summary: dict[str, Any] | None = None  # the COMMITTED record
    error: str | None = None
    divergence: dict[str, Any] | None = None


class ReplayFinished(BaseException):
    """Raised out of the outer loop once the job's last iteration ran (BaseException: scripts'
    `except Exception` blocks must not swallow it)."""


class ReplayDiverged(BaseException):
    """A re-logged value differs from the one the original run logged."""

    def __init__(self, detail: dict[str, Any]) -> None:
        super().__init__(detail)
        self.detail = detail
