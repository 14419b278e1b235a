"""The training-side API: coordinates, value types, args, misuse errors, concurrency and kill -9."""

from __future__ import annotations

import enum
import json
import signal
import time

import numpy as np
import pytest
import torch

import florql
from florql import args as florql_args
from florql.errors import UsageError
from florql.storage import layout, segments

TYPES_SCRIPT = """
import enum
import numpy as np
import torch
import florql

class Level(enum.IntEnum):
    HIGH = 3

florql.log("top", "before any loop")
for epoch in florql.loop("epoch", range(2)):
    for step in florql.loop("step", range(3)):
        florql.log("f", 0.5 + step)
        florql.log("i", 10 * epoch + step)
        florql.log("b", step % 2 == 1)
        florql.log("s", f"e{epoch}s{step}")
        florql.log("np_f32", np.float32(0.1) * step)
        florql.log("np_i64", np.int64(7) + step)
        florql.log("np_bool", np.bool_(step == 2))
        florql.log("t", torch.tensor(1.25) * step)
        florql.log("t_int", torch.tensor(3) + step)
        florql.log("enum", Level.HIGH)
    florql.log("acc", 0.9 + epoch)
"""


def test_values_keep_their_types_and_loop_coordinates(store):
    run = store.run(TYPES_SCRIPT).run_id
    rows = store.sql(
        "SELECT name, loop_path, epoch, step, value_type, value_float, value_int, value_bool, value_str"
        " FROM logs WHERE run_id = ? AND epoch = 1 AND (step = 2 OR step IS NULL) ORDER BY seq",
        [run],
    )
    got = {r[0]: r[1:] for r in rows}
    assert got == {
        "f": ("epoch/step", 1, 2, "float", 2.5, None, None, None),
        "i": ("epoch/step", 1, 2, "int", None, 12, None, None),
        "b": ("epoch/step", 1, 2, "bool", None, None, False, None),
        "s": ("epoch/step", 1, 2, "str", None, None, None, "e1s2"),
        "np_f32": ("epoch/step", 1, 2, "float", float(np.float32(0.1) * 2), None, None, None),
        "np_i64": ("epoch/step", 1, 2, "int", None, 9, None, None),
        "np_bool": ("epoch/step", 1, 2, "bool", None, None, True, None),
        "t": ("epoch/step", 1, 2, "float", 2.5, None, None, None),
        "t_int": ("epoch/step", 1, 2, "int", None, 5, None, None),
        "enum": ("epoch/step", 1, 2, "int", None, 3, None, None),
        "acc": ("epoch", 1, None, "float", 1.9, None, None, None),
    }
    top = store.sql("SELECT loop_path, epoch, step, value_str FROM logs WHERE run_id = ? AND name = 'top'", [run])
    assert top == [("", None, None, "before any loop")]
    assert store.sql("SELECT count(*) FROM logs WHERE run_id = ?", [run]) == [(1 + 2 * 3 * 10 + 2,)]


def test_wide_view_has_coordinates_and_one_typed_column_per_name(store):
    run = store.run(TYPES_SCRIPT).run_id
    rows = store.sql(f"SELECT epoch, step, f, i, b, s, acc FROM run_{run} ORDER BY epoch, step")
    assert rows == [(e, s, 0.5 + s, 10 * e + s, s % 2 == 1, f"e{e}s{s}", 0.9 + e) for e in range(2) for s in range(3)]
    types = dict(
        store.sql("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [f"run_{run}"])
    )
    assert (types["epoch"], types["step"]) == ("BIGINT", "BIGINT")
    assert (types["f"], types["i"], types["b"], types["s"]) == ("DOUBLE", "BIGINT", "BOOLEAN", "VARCHAR")


ARGS_SCRIPT = """
import json, sys
import florql
values = {
    "lr": florql.arg("lr", 0.01), "epochs": florql.arg("epochs", 10), "amp": florql.arg("amp", True),
    "opt": florql.arg("opt", "sgd"), "tag": florql.arg("tag", None),
}
print(json.dumps({"argv": sys.argv[1:], "values": values, "types": {k: type(v).__name__ for k, v in values.items()}}))
for e in florql.loop("epoch", range(1)):
    florql.log("x", 1.0)
"""


def test_overrides_are_removed_before_the_scripts_own_parser_runs(store):
    """The common shape: argparse parses the command line before the first florql call."""
    script = """
import argparse
import florql
parser = argparse.ArgumentParser()
parser.add_argument("--data")
cli = parser.parse_args()
lr = florql.arg("lr", 0.01)
print(cli.data, lr)
for e in florql.loop("epoch", range(1)):
    florql.log("x", lr)
"""
    run = store.run(script, "--data", "d.csv", "--florql-args", "lr=0.5")
    assert run.proc.stdout.split() == ["d.csv", "0.5"]


def test_command_line_overrides_are_coerced_recorded_and_removed_from_argv(store):
    run = store.run(ARGS_SCRIPT, "--data", "d.csv", "--florql-args", "lr=0.5", "epochs=3", "amp=false", "opt=adam")
    out = json.loads(run.proc.stdout)
    assert out["argv"] == ["--data", "d.csv"]
    assert out["values"] == {"lr": 0.5, "epochs": 3, "amp": False, "opt": "adam", "tag": None}
    assert out["types"] == {"lr": "float", "epochs": "int", "amp": "bool", "opt": "str", "tag": "NoneType"}
    manifest = json.loads(store.files.get(layout.manifest_path(run.run_id)))
    assert manifest["args"] == out["values"]
    assert manifest["argv"] == ["--data", "d.csv"]
    assert store.sql("SELECT lr, epochs, amp, opt FROM runs WHERE run_id = ?", [run.run_id]) == [
        (0.5, 3.0, 0.0, "adam")
    ]


def test_environment_overrides_and_the_command_line_wins(store):
    env = store.env(FLORQL_ARGS="lr=0.2 tag='a b' epochs=4")
    run = store.run(ARGS_SCRIPT, "--florql-args", "epochs=5", env=env)
    out = json.loads(run.proc.stdout)
    assert out["values"] == {"lr": 0.2, "epochs": 5, "amp": True, "opt": "sgd", "tag": "a b"}
    assert out["argv"] == []


def test_overrides_stop_at_double_dash():
    argv = ["train.py", "--florql-args", "lr=0.1", "epochs=2", "--", "--verbose"]
    assert florql_args.take_overrides(argv) == {"lr": "0.1", "epochs": "2"}
    assert argv == ["train.py", "--verbose"]


def test_bad_override_fails_the_run_with_a_message_naming_it(store):
    run = store.run(ARGS_SCRIPT, "--florql-args", "epochs=three", check=False)
    assert run.proc.returncode != 0
    assert "florql.arg('epochs'): the override 'three' is not a valid int" in run.proc.stderr
    status, error = store.sql("SELECT status, error FROM runs WHERE run_id = ?", [run.run_id])[0]
    assert status == "failed" and "not a valid int" in error


@pytest.mark.parametrize(
    "text, default, expected",
    [
        ("3", 1, 3),
        ("2.5", 1.0, 2.5),
        ("1e-3", 0.1, 0.001),
        ("yes", False, True),
        ("OFF", True, False),
        ("x", "a", "x"),
        ("x", None, "x"),
    ],
)
def test_coerce_follows_the_default_type(text, default, expected):
    value = florql_args.coerce("a", text, default)
    assert value == expected and type(value) is type(expected)


def test_malformed_override_pair_is_rejected():
    with pytest.raises(UsageError, match="cannot read the override 'lr'; write it as name=value"):
        florql_args.take_overrides(["t.py", "--florql-args", "lr"])


# ---- misuse, in-process ---------------------------------------------------------------------
def test_reserved_and_invalid_names_are_refused(session):
    with pytest.raises(UsageError, match=r"florql.log\('run_id'\): 'run_id' is reserved"):
        florql.log("run_id", 1)
    with pytest.raises(UsageError, match=r"names must start with a letter"):
        florql.log("bad name", 1)
    with pytest.raises(UsageError, match=r"florql.loop\('seq'\): 'seq' is reserved"):
        list(florql.loop("seq", range(1)))
    with pytest.raises(UsageError, match=r"'__seq__loss' is reserved"):
        florql.log("__seq__loss", 1.0)
    with pytest.raises(UsageError, match="the name must be a string"):
        florql.log(3, 1.0)


def test_values_that_cannot_be_stored_are_refused_and_the_other_records_land(session, store):
    """One such value used to fail its whole segment: every record flushed with it was lost."""
    import numpy as np

    for epoch in florql.loop("epoch", range(2)):
        florql.log("loss", 0.5 + epoch)
        with pytest.raises(
            UsageError, match=r"florql.log\('big', 1180591620717411303424\): the integer does not fit in 64 bits"
        ):
            florql.log("big", 2**70)
        with pytest.raises(UsageError, match="does not fit in 64 bits"):
            florql.log("big", np.uint64(2**64 - 1))
        with pytest.raises(UsageError, match="cannot be stored as UTF-8"):
            florql.log("text", "lone \ud800 surrogate")
        florql.log("edge", 2**63 - 1)
        florql.log("low", -(2**63))
    session.finish()
    rows = store.sql("SELECT name, value_float, value_int FROM logs ORDER BY seq")
    assert rows == [
        ("loss", 0.5, None),
        ("edge", None, 2**63 - 1),
        ("low", None, -(2**63)),
        ("loss", 1.5, None),
        ("edge", None, 2**63 - 1),
        ("low", None, -(2**63)),
    ]


def test_coordinates_follow_three_nested_loops_and_their_ends(session, store):
    """A step sets only its own index (the enclosing loops' are fixed while it runs): after a
    nested loop ends, records carry the enclosing loop's coordinates again."""
    expected = []
    for epoch in florql.loop("epoch", range(2)):
        for step in florql.loop("step", range(2)):
            for micro in florql.loop("micro", range(3)):
                florql.log("m", 100 * epoch + 10 * step + micro)
                expected.append(("m", "epoch/step/micro", epoch, step, micro))
            florql.log("after_micro", step)
            expected.append(("after_micro", "epoch/step", epoch, step, None))
        for step in florql.loop("step", range(1)):  # a second inner loop in the same iteration
            florql.log("again", step)
            expected.append(("again", "epoch/step", epoch, step, None))
        florql.log("after_step", epoch)
        expected.append(("after_step", "epoch", epoch, None, None))
    florql.log("after_epoch", 0)
    expected.append(("after_epoch", "", None, None, None))
    session.finish()
    assert store.sql("SELECT name, loop_path, epoch, step, micro FROM logs ORDER BY seq") == expected
    assert store.sql("SELECT value_int FROM logs WHERE name = 'm' ORDER BY seq") == [
        (100 * e + 10 * s + m,) for e in range(2) for s in range(2) for m in range(3)
    ]


def test_nested_loops_with_one_name_are_refused(session):
    with pytest.raises(UsageError, match="a loop named 'epoch' is already running around this one"):
        for _ in florql.loop("epoch", range(2)):
            for _ in florql.loop("epoch", range(2)):
                pass


def test_log_name_clashing_with_an_enclosing_loop_is_refused(session):
    with pytest.raises(UsageError, match="'epoch' is the name of an enclosing florql.loop"):
        for _ in florql.loop("epoch", range(1)):
            florql.log("epoch", 1)


def test_checkpointing_an_object_without_state_dict_is_refused(session):
    with pytest.raises(UsageError, match=r"checkpointing\(data=…\): a list has no state_dict\(\)/load_state_dict\(\)"):
        with florql.checkpointing(model=torch.nn.Linear(2, 2), data=[1, 2]):
            pass
    with pytest.raises(UsageError, match="budget=1.5"):
        with florql.checkpointing(budget=1.5, model=torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize(
    "value, kind",
    [
        ([1.0], "list"),
        ({"a": 1}, "dict"),
        (None, "NoneType"),
        (np.zeros(3), "ndarray"),
        (b"x", "bytes"),
    ],
)
def test_unsupported_values_are_refused_naming_the_type(session, value, kind):
    with pytest.raises(UsageError, match=rf"florql.log\('x', …\): cannot log a value of type {kind}"):
        florql.log("x", value)


def test_tensor_with_more_than_one_element_is_refused(session):
    with pytest.raises(UsageError, match=r"got a tensor of shape \(3,\); log a 0-d tensor"):
        florql.log("loss", torch.ones(3))
    with pytest.raises(UsageError, match=r"shape \(2, 2\)"):
        florql.log("loss", torch.ones(2, 2))


def test_records_flushed_by_session_carry_values_logged_in_process(session, store):
    class Mode(enum.IntEnum):
        A = 2

    for epoch in florql.loop("epoch", range(2)):
        florql.log("m", Mode.A)
        florql.log("g", torch.tensor(0.5, requires_grad=True) * 2)
    session.finish()
    assert store.sql("SELECT epoch, value_int FROM logs WHERE name = 'm' ORDER BY epoch") == [(0, 2), (1, 2)]
    assert store.sql("SELECT epoch, value_float FROM logs WHERE name = 'g' ORDER BY epoch") == [(0, 1.0), (1, 1.0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_logged_without_losing_values(session, store):
    x = torch.arange(100, device="cuda", dtype=torch.float32)
    for step in florql.loop("step", range(50)):
        florql.log("cuda_sum", (x * step).sum())
        florql.log("cuda_int", (x > step).sum())
    session.finish()
    rows = store.sql("SELECT step, value_float FROM logs WHERE name = 'cuda_sum' ORDER BY step")
    assert rows == [(s, float(4950 * s)) for s in range(50)]
    rows = store.sql("SELECT step, value_int FROM logs WHERE name = 'cuda_int' ORDER BY step")
    assert rows == [(s, 99 - s) for s in range(50)]


# ---- processes ------------------------------------------------------------------------------
CONCURRENT_SCRIPT = """
import florql
for epoch in florql.loop("epoch", range(4)):
    for step in florql.loop("step", range(500)):
        florql.log("loss", epoch + step / 1000)
    florql.log("pid_tail", epoch)
print(florql.run_id())
"""


def test_concurrent_trainers_get_distinct_ids_and_lose_no_rows(store):
    script = store.write_script(CONCURRENT_SCRIPT)
    procs = [store.popen(script) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ids = sorted(int(out.strip()) for out, _ in outputs)
    assert ids == [1, 2, 3, 4]
    counts = store.sql(
        "SELECT run_id, count(*), count(DISTINCT seq), max(seq) FROM logs GROUP BY run_id ORDER BY run_id"
    )
    assert counts == [(i, 2004, 2004, 2003) for i in ids]
    assert store.sql("SELECT DISTINCT status FROM runs") == [("finished",)]


KILL_SCRIPT = """
import sys, time
import florql
for epoch in florql.loop("epoch", range(100000)):
    for step in florql.loop("step", range(50)):
        florql.log("loss", float(epoch * 50 + step))
    print(epoch, flush=True)
    time.sleep(0.02)
"""


def _rows_on_disk(store, run_id: int) -> int:
    """Records in the run's complete segment files (the writer renames each into place whole)."""
    paths = [p for p in store.files.list(layout.segments_dir(run_id)) if layout.is_segment(p)]
    return sum(segments.read_segment(store.files, p).num_rows for p in paths)


def test_kill_9_keeps_every_record_flushed_before_it_and_marks_the_run_killed(store):
    proc = store.popen(store.write_script(KILL_SCRIPT))
    try:
        for line in proc.stdout:
            if int(line) >= 5:
                break
        logged_before = (int(line) + 1) * 50
        # Kill once those records are observably on disk (the writer flushes every second; on a
        # busy machine later): what was flushed before the kill must all be there afterwards.
        deadline = time.monotonic() + 60
        while _rows_on_disk(store, 1) < logged_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _rows_on_disk(store, 1) >= logged_before, "the writer flushed nothing in 60 s"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    rows = store.sql("SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM logs WHERE run_id = 1")[0]
    count = rows[0]
    assert count >= logged_before
    assert rows[1:] == (0, count - 1, count)  # a gap-free prefix: no segment lost or torn
    assert store.sql("SELECT count(*) FROM logs WHERE value_float != epoch * 50 + step") == [(0,)]
    assert store.sql("SELECT status, ended_at FROM runs WHERE run_id = 1") == [("killed", None)]


def test_failed_run_records_the_exception(store):
    run = store.run(
        """
        import florql
        for epoch in florql.loop("epoch", range(3)):
            florql.log("x", 1.0)
            if epoch == 1:
                raise RuntimeError("diverged at epoch 1")
    """,
        check=False,
    )
    assert run.proc.returncode == 1
    assert store.sql("SELECT status, error FROM runs") == [("failed", "RuntimeError: diverged at epoch 1")]
    assert store.sql("SELECT count(*) FROM logs") == [(2,)]


def test_the_manifest_a_flush_writes_never_runs_ahead_of_its_segment(tmp_path):
    """The writer thread takes the manifest (`on_swap`) before the buffered records, so what the
    manifest reports (an iteration completed) was logged before and is in the segment it writes
    first: a reader never takes an iteration for complete while its records are still buffered."""
    from florql.storage import segments
    from florql.storage.runfiles import open_run_files
    from florql.storage.segment_writer import SegmentWriter

    files = open_run_files(tmp_path)
    flushed: list[tuple[object, list[str]]] = []
    writer: SegmentWriter

    def on_swap() -> str | None:
        if flushed or not writer.buffer:
            return None
        writer.buffer.append(("logged_after_the_snapshot", 1.0, ("",)))  # the training thread, just after
        return "manifest"

    def on_flush(state: object) -> None:
        if state is not None:
            names = [n for p in files.list("seg") for n in segments.read_segment(files, p).column("name").to_pylist()]
            flushed.append((state, names))

    writer = SegmentWriter(
        files, lambda seq: f"seg/{seq:08d}.seg", {}, interval=0.05, on_flush=on_flush, on_swap=on_swap
    )
    writer.buffer.append(("logged_before", 0.0, ("",)))
    deadline = time.monotonic() + 30
    while not flushed and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.close()
    assert flushed[0] == ("manifest", ["logged_before", "logged_after_the_snapshot"])


def test_the_set_up_clock_times_only_imports_a_warm_replay_has_done(tmp_path, monkeypatch):
    """Of a script's set-up, the imports of packages the replay fork server preloads (an
    optimizer's constructor importing torch._dynamo) are not paid by a warm replay: they are timed
    apart, nested imports once, other packages and other threads not at all."""
    import sys
    import threading

    from florql.recording import ImportClock

    now = [0.0]
    for name, seconds, body in [
        ("warm_pkg", 5.0, "import warm_pkg.sub\n"),
        ("warm_pkg.sub", 2.0, ""),
        ("cold_pkg", 100.0, ""),
    ]:
        path = tmp_path.joinpath(*name.split("."))
        path.mkdir()
        (path / "__init__.py").write_text(f"import tests_clock\ntests_clock.now[0] += {seconds}\n{body}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "tests_clock", type(sys)("tests_clock"))
    sys.modules["tests_clock"].now = now
    monkeypatch.setattr(ImportClock, "PACKAGES", frozenset({"warm_pkg"}))
    clock = ImportClock(clock=lambda: now[0])
    try:
        import cold_pkg  # noqa: F401
        import warm_pkg  # noqa: F401

        other = threading.Thread(target=lambda: __import__("json"))
        other.start()
        other.join()
    finally:
        assert clock.stop() == 7.0  # warm_pkg and the warm_pkg.sub it imports, once
    assert __import__ is not clock._import and clock.stop() == 7.0
    for name in ("warm_pkg", "warm_pkg.sub", "cold_pkg"):
        sys.modules.pop(name, None)
