"""Where things live inside a store, in one place.

A store is a folder (`.florql/` in the working directory, or `$FLORQL_HOME`) holding the DuckDB
file; the run files live in `runs/`, `code/` under the same folder unless `$FLORQL_RUNS` points
them elsewhere (a shared filesystem or an object store).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from florql.storage.runfiles import RunFiles, open_run_files

DB_FILENAME = "florql.duckdb"
MAIN_WRITER = "main"


@dataclass(frozen=True)
class StoreLocation:
    home: str
    runs_url: str

    @property
    def db_path(self) -> str:
        return os.path.join(self.home, DB_FILENAME)

    def run_files(self) -> RunFiles:
        return open_run_files(self.runs_url)


def locate_store(path: str | os.PathLike | None = None) -> StoreLocation:
    """The store at `path`, else $FLORQL_HOME, else ./.florql."""
    home = os.fspath(path) if path is not None else os.environ.get("FLORQL_HOME") or ".florql"
    home = os.path.abspath(home)
    runs = os.environ.get("FLORQL_RUNS") or home
    return StoreLocation(home=home, runs_url=runs)


# Paths inside RunFiles. Run ids are small integers.
def run_dir(run_id: int) -> str:
    return f"runs/{run_id}"


def manifest_path(run_id: int) -> str:
    return f"runs/{run_id}/run.json"


def claim_path(run_id: int) -> str:
    return f"runs/{run_id}/claim"


SEGMENT_SUFFIX = ".seg"  # `segment_codec`'s format; segments of florql versions before it end ".arrow"


def is_segment(path: str) -> bool:
    return path.endswith((SEGMENT_SUFFIX, ".arrow"))


def segment_path(run_id: int, writer: str, seq: int) -> str:
    return f"runs/{run_id}/segments/{writer}/{seq:08d}{SEGMENT_SUFFIX}"


def segments_dir(run_id: int) -> str:
    return f"runs/{run_id}/segments"


def checkpoint_data_path(run_id: int, name: str) -> str:
    return f"runs/{run_id}/checkpoints/{name}.ckpt"


def checkpoint_meta_path(run_id: int, name: str) -> str:
    return f"runs/{run_id}/checkpoints/{name}.json"


def checkpoints_dir(run_id: int) -> str:
    return f"runs/{run_id}/checkpoints"


def replay_dir(run_id: int, job_id: str) -> str:
    return f"runs/{run_id}/replays/{job_id}"


def replay_segment_path(run_id: int, job_id: str, seq: int, attempt: str = "a") -> str:
    # Each attempt of a job writes its own files: a retried job never mixes with a dead attempt's.
    return f"runs/{run_id}/replays/{job_id}/segments/{attempt}-{seq:08d}{SEGMENT_SUFFIX}"


# The files of a replay job's folder.
REPLAY_COMMITTED = "COMMITTED.json"  # the job's summary, written last: the job's rows are complete
REPLAY_DIVERGED = "DIVERGED.json"  # a re-logged value differed from the recorded one
REPLAY_EXPECTED = "expected.arrow"  # the recorded values the job audits against (written with its checksum in the name)


def replay_commit_path(run_id: int, job_id: str) -> str:
    return f"{replay_dir(run_id, job_id)}/{REPLAY_COMMITTED}"


def replay_divergence_path(run_id: int, job_id: str) -> str:
    return f"{replay_dir(run_id, job_id)}/{REPLAY_DIVERGED}"


def replay_expected_path(run_id: int, job_id: str) -> str:
    return f"{replay_dir(run_id, job_id)}/{REPLAY_EXPECTED}"


def replay_checkpoints_dir(run_id: int, job_id: str) -> str:
    """Checkpoints a replay job persisted: visible once the job's commit lists them."""
    return f"{replay_dir(run_id, job_id)}/checkpoints"


def checkpoint_location(run_id: int, stored_name: str) -> tuple[str, str]:
    """(folder, file name) of a checkpoint as the `checkpoints` table names it: a replay job's
    checkpoints are named `<job_id>/<name>`, the run's own just `<name>`."""
    job_id, _, name = stored_name.rpartition("/")
    return (replay_checkpoints_dir(run_id, job_id) if job_id else checkpoints_dir(run_id)), name


def replays_dir(run_id: int) -> str:
    return f"runs/{run_id}/replays"


def code_blob_path(digest: str) -> str:
    return f"code/blobs/{digest[:2]}/{digest}"


def code_version_path(version: str) -> str:
    return f"code/versions/{version}.json"


def input_hash_path(path: str) -> str:
    """The cached digest of the data file at absolute `path` (see `storage.inputs`)."""
    return f"code/inputs/{hashlib.sha256(path.encode()).hexdigest()[:32]}.json"


def chunks_dir(run_id: int) -> str:
    return f"runs/{run_id}/chunks"


def checkpoint_chunk_path(run_id: int, digest: str) -> str:
    """A chunk of checkpoint state, named by the hash of its bytes (see `storage.checkpoints`),
    in a folder named by the hash's first two hex digits."""
    return f"runs/{run_id}/chunks/{digest.rsplit('-', 1)[-1][:2]}/{digest}"
