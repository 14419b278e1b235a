"""The per-query fixed cost: no sync when no run folder changed, the catalog kept between queries,
and never a stale answer (a new run, a replay landing, a running trainer, an edited script)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import florql
from florql.storage import shared
from florql.storage.shared import RunFolders
from store_support import TRAIN, Store, age_folders, with_grad_norm, write_synthetic_run


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per sync that listed the run files (each returns the runs it changed)."""
    calls: list[int] = []
    real = shared.sync

    def counting(conn, files):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(conn, files)

    monkeypatch.setattr(shared, "sync", counting)
    return calls


def runs_folder(store: Store) -> Path:
    return store.home / "runs"


def test_a_query_with_no_new_run_files_skips_the_sync_and_a_new_run_is_seen(store: Store, syncs: list[int]):
    for run_id in (1, 2):
        write_synthetic_run(store.files, run_id, epochs=3, steps=4)
    age_folders(runs_folder(store))
    with florql.connect(store.home) as db:
        assert db.sql("SELECT count(*) FROM metrics").fetchall() == [(24,)]
        assert len(syncs) == 1
        for _ in range(3):
            assert db.sql("SELECT count(*) FROM metrics").fetchall() == [(24,)]
        assert len(syncs) == 1, "nothing changed: no sync lists the run files"

        logged = write_synthetic_run(store.files, 3, epochs=2, steps=5)
        rows = db.sql("SELECT run_id, count(*), sum(loss) FROM metrics GROUP BY run_id ORDER BY run_id").fetchall()
        assert len(syncs) == 2
        assert [r[:2] for r in rows] == [(1, 12), (2, 12), (3, 10)]
        assert rows[2][2] == pytest.approx(sum(logged["loss"]), rel=1e-12)
        assert db.sql("SELECT acc FROM run_3 ORDER BY epoch").fetchall() == [(v,) for v in logged["acc"]]


def test_recently_changed_folders_are_not_trusted(store: Store, syncs: list[int]):
    """A folder changed within the last tick could change again unseen: such a store syncs each time."""
    write_synthetic_run(store.files, 1, epochs=2, steps=2)
    age_folders(runs_folder(store), seconds=-60)  # dated ahead: within the last tick, whatever the load
    with florql.connect(store.home) as db:
        for _ in range(3):
            db.sql("SELECT count(*) FROM run_1").fetchall()
    assert len(syncs) == 3


def test_a_running_trainer_is_synced_on_every_query(store: Store, syncs: list[int]):
    write_synthetic_run(store.files, 1, epochs=2, steps=2, status="running")
    age_folders(runs_folder(store))
    with florql.connect(store.home) as db:
        assert db.sql("SELECT count(*) FROM run_1").fetchall() == [(4,)]
        # The trainer writes its next epoch into its own folders (a new segment, a new manifest).
        write_synthetic_run(store.files, 1, epochs=3, steps=2, status="running")
        age_folders(runs_folder(store))  # even dated back, a running run's files are looked for
        assert db.sql("SELECT count(*) FROM run_1").fetchall() == [(6,)]
    assert len(syncs) == 2


def test_the_watched_folders_see_a_new_run_a_new_replay_job_and_its_commit(store: Store):
    write_synthetic_run(store.files, 1, epochs=2, steps=2)
    job = runs_folder(store) / "1" / "replays" / "job-a"
    job.mkdir(parents=True)
    (job / "segments").mkdir()
    age_folders(runs_folder(store))
    with florql.connect(store.home) as db:
        db.sync()  # the job has no commit yet: it stays watched
        with db._open() as conn:
            watched = RunFolders.taken(store.files).trusted(conn)  # type: ignore[union-attr]
    assert watched is not None and str(job) in watched.times
    assert watched.same_now()
    (job / "COMMITTED.json").write_text("{}")
    assert not watched.same_now(), "a replay job's commit shows"
    age_folders(runs_folder(store))
    assert not watched.same_now()
    (job / "COMMITTED.json").unlink()  # not a real commit: the next sync must not ingest it
    age_folders(runs_folder(store))

    with florql.connect(store.home) as db:
        db.sync()
        with db._open() as conn:
            watched = RunFolders.taken(store.files).trusted(conn)  # type: ignore[union-attr]
    assert watched is not None
    (runs_folder(store) / "1" / "replays" / "job-b").mkdir()
    assert not watched.same_now(), "a new replay job shows"
    os.rmdir(runs_folder(store) / "1" / "replays" / "job-b")
    age_folders(runs_folder(store))
    write_synthetic_run(store.files, 2, epochs=1, steps=1)
    age_folders(runs_folder(store))
    assert not watched.same_now(), "a new run shows, even dated back"


def test_an_edited_script_shows_its_new_loggable_name_without_a_change_to_the_store(store: Store):
    script = store.write_script(TRAIN)
    store.run(script)
    age_folders(runs_folder(store))
    with florql.connect(store.home) as db:
        before = db.run_table(1)
        assert before is not None and "grad_norm" not in {c.name for c in before.columns}
        script.write_text(with_grad_norm(TRAIN))
        after = db.run_table(1)
        assert after is not None
        assert [c.comment for c in after.columns if c.name == "grad_norm"] == ["loggable: replayed on demand"]
        plan = db.replay_plan("SELECT epoch, grad_norm FROM run_1 WHERE epoch = 2")
        assert plan.jobs, "the new name is bound and planned for replay"
