"""The run manifest: run files of older (and newer) recorders load, the written format stays JSON."""

from __future__ import annotations

import json

from florql.runinfo import load_run, run_facts
from florql.storage import layout
from florql.storage.database import open_store, sync
from florql.storage.manifest import Env, Manifest

# As an older recorder wrote it: no heartbeat, inner times, checkpoint report, checkpoint objects,
# uncaptured names or thread count; plus a field this florql does not know.
OLD = {
    "run_id": 1,
    "script": "/proj/train.py",
    "script_rel": "train.py",
    "cwd_rel": ".",
    "project_root": "/proj",
    "argv": ["--lr", "0.1"],
    "args": {"lr": 0.1, "epochs": 3, "name": "a", "fast": True},
    "code_version": None,
    "git_commit": None,
    "env": {
        "python": "3.11.0",
        "torch": "2.1.0",
        "cuda": None,
        "hostname": "elsewhere",
        "pid": 4242,
        "device": "cpu",
        "gpu_vendor": "none",
    },
    "started_at": 1700000000.0,
    "ended_at": 1700000012.5,
    "status": "finished",
    "error": None,
    "outer_loop": "epoch",
    "outer_planned": 3,
    "outer_completed": 3,
    "outer_broke_early": False,
    "iteration_s": [4.0, 4.0, 4.5],
    "checkpoint_budget": None,
    "from_the_future": {"anything": [1, 2]},
}


def test_from_json_fills_missing_fields_and_ignores_unknown_ones():
    for body in (json.dumps(OLD, indent=1), json.dumps(OLD).encode()):
        m = Manifest.from_json(body)
        assert m.run_id == 1 and m.script_rel == "train.py" and m.status == "finished"
        assert m.args == {"lr": 0.1, "epochs": 3, "name": "a", "fast": True}
        assert m.iteration_s == [4.0, 4.0, 4.5] and m.outer_completed == 3
        # missing newer fields take their defaults
        assert m.inner_s == [] and m.uncaptured == [] and m.checkpoint_objects == [] and m.checkpoints == {}
        assert m.heartbeat_at is None and m.last_checkpoint is None
        assert isinstance(m.env, Env) and m.env.hostname == "elsewhere" and m.env.pid == 4242
        assert m.env.torch_threads is None
        assert not hasattr(m, "from_the_future") and not hasattr(m.env, "gpu_vendor")


def test_nulls_read_as_defaults_and_bare_minimum_loads():
    m = Manifest.from_json('{"run_id": 7, "iteration_s": null, "args": null, "env": null, "outer_completed": null}')
    assert (m.run_id, m.iteration_s, m.args, m.outer_completed, m.status) == (7, [], {}, 0, "running")
    assert m.env == Env()
    assert Manifest.from_json("{}") == Manifest()


def test_to_json_round_trips_and_keeps_the_file_format():
    m = Manifest.from_json(json.dumps(OLD))
    body = m.to_json()
    data = json.loads(body)
    assert body.startswith('{\n "run_id": 1,')  # indent=1, as before
    assert {k: data[k] for k in OLD if k != "from_the_future"} == {
        **{k: v for k, v in OLD.items() if k != "from_the_future"},
        "env": {**{k: v for k, v in OLD["env"].items() if k != "gpu_vendor"}, "platform": None, "torch_threads": None},
    }
    assert "cuda_devices" not in data["env"]
    assert Manifest.from_json(body) == m
    assert Manifest.from_json(m.to_json(indent=None)) == m


def test_update_refuses_unknown_fields():
    m = Manifest()
    m.update(status="failed", error="boom")
    assert (m.status, m.error) == ("failed", "boom")
    try:
        m.update(stauts="finished")
    except AttributeError as err:
        assert "stauts" in str(err)
    else:
        raise AssertionError("a misspelt field was accepted")


def test_an_old_run_file_ingests(store):
    store.files.put(layout.manifest_path(1), json.dumps(OLD, indent=1).encode())
    with open_store(store.location.db_path) as conn:
        sync(conn, store.files)
        row = conn.execute(
            "SELECT status, duration_s, host, pid, outer_completed, checkpoints_taken, heartbeat_at FROM _runs"
        ).fetchall()
        assert row == [("finished", 12.5, "elsewhere", 4242, 3, None, None)]
        args = conn.execute("SELECT name, value_type FROM run_args ORDER BY name").fetchall()
        assert args == [("epochs", "int"), ("fast", "bool"), ("lr", "float"), ("name", "str")]
        assert conn.execute("SELECT seconds, inner_seconds FROM iterations ORDER BY outer_index").fetchall() == [
            (4.0, 0.0),
            (4.0, 0.0),
            (4.5, 0.0),
        ]
        info = load_run(conn, 1)
        assert isinstance(info.manifest, Manifest) and info.outer_loop == "epoch"
        assert info.manifest.env.torch_threads is None and info.manifest.uncaptured == []
        facts = run_facts(conn, info)
        assert (facts.completed, facts.iteration_s, facts.inner_s) == (3, [4.0, 4.0, 4.5], [])
