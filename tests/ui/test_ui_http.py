"""`florql ui` over real HTTP: pages, JSON, a hindsight query answered bit for bit, access rules, bad input."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from process_support import ctrl_c_stops_it

import florql
from florql.ui import charts
from florql.ui.server import BackgroundUI, UIConfigError
from ui_support import logged_grad_norm


def request(
    url: str, path: str, body: Any = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, Any]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    payload = None if body is None else json.dumps(body).encode()
    sent = {"Content-Type": "application/json"} if body is not None else {}
    sent.update(headers or {})
    conn.request(method or ("POST" if body is not None else "GET"), path, payload, sent)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    kind = response.getheader("Content-Type") or ""
    return response.status, json.loads(data) if kind.startswith("application/json") else data.decode()


def answer(url: str, sql: str) -> dict[str, Any]:
    status, task = request(url, "/api/query", {"sql": sql})
    assert status == 202, task
    deadline = time.monotonic() + 300  # a safety net for a hung replay, not a timing assertion
    while task["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        status, task = request(url, f"/api/tasks/{task['id']}")
        assert status == 200
    return task


def test_runs_api_lists_runs_with_args_and_names(ui: BackgroundUI) -> None:
    status, body = request(ui.url, "/api/runs")
    assert status == 200
    runs = {r["run_id"]: r for r in body["runs"]}
    assert sorted(runs) == [1, 2]
    assert runs[1]["args"] == {"lr": "0.1"} and runs[1]["status"] == "finished"
    assert runs[1]["names"] == ["loss"] and runs[2]["names"] == ["grad_norm", "loss"]
    assert runs[1]["checkpoints_taken"] == 3


def test_run_api_charts_every_logged_point_and_lists_loggable_names(ui: BackgroundUI, recorded) -> None:
    status, body = request(ui.url, "/api/runs/1")
    assert status == 200
    (loss,) = body["charts"]  # grad_norm is loggable, not stored yet: no chart
    assert loss["title"] == "loss" and loss["x_label"] == "epoch (step within)"
    assert loss["x"] == [e + s / 4 for e in range(3) for s in range(4)]
    expected = florql.connect(recorded.home).sql("SELECT loss FROM run_1 ORDER BY epoch, step").fetchall()
    assert loss["series"][0]["values"] == [v for (v,) in expected]
    assert loss["series"][0]["replayed"] is False
    kinds = {n["name"]: (n["kind"], n["loop_path"]) for n in body["names"]}
    assert kinds == {"loss": ("logged", ["epoch", "step"]), "grad_norm": ("loggable", ["epoch", "step"])}
    assert [c["outer_index"] for c in body["checkpoints"]] == [0, 1, 2]
    assert body["args"] == {"lr": "0.1"}
    assert "+" in body["code"]["diff"] and "grad_norm" in body["code"]["diff"]  # the line added since
    assert "grad_norm" not in body["code"]["recorded"]


def test_a_line_longer_than_the_chart_holds_is_thinned_by_the_engine(
    ui: BackgroundUI, recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 8 points, run 1's 12 losses come back as 2 stretches' first, last, lowest and
    highest: the line's ends and its extremes stay, and the chart says how many points it left out."""
    monkeypatch.setattr(charts, "MAX_POINTS", 8)
    status, body = request(ui.url, "/api/runs/1")
    assert status == 200
    (loss,) = body["charts"]
    logged = florql.connect(recorded.home).sql("SELECT loss FROM run_1 ORDER BY epoch, step").fetchall()
    values = [v for (v,) in logged]
    xs = [e + s / 4 for e in range(3) for s in range(4)]
    keep = charts.kept_points(values, 8)
    assert loss["x"] == [xs[i] for i in keep] and loss["series"][0]["values"] == [values[i] for i in keep]
    assert len(keep) <= 8 and {0, 11} <= set(keep)
    assert min(values) in loss["series"][0]["values"] and max(values) in loss["series"][0]["values"]
    assert loss["notes"] == [f"loss: {len(keep)} of 12 points shown (each stretch's first, last, lowest and highest)"]


def test_pages_are_served_with_their_script_and_vendored_chart_library(ui: BackgroundUI) -> None:
    status, page = request(ui.url, "/")
    assert status == 200 and 'data-page="runs"' in page
    status, page = request(ui.url, "/runs/1")
    assert status == 200 and 'data-run="1"' in page
    for asset in ("/static/app.js", "/static/app.css", "/static/vendor/uPlot.iife.min.js"):
        status, text = request(ui.url, asset)
        assert status == 200 and len(text) > 100, asset
    status, _ = request(ui.url, "/static/../server.py")
    assert status in (400, 404)


def test_unknown_run_is_a_readable_404(ui: BackgroundUI) -> None:
    status, page = request(ui.url, "/runs/99")
    assert status == 404 and "there is no run 99 in this store" in page
    status, body = request(ui.url, "/api/runs/99")
    assert status == 404 and "there is no run 99" in body["error"]


def test_bad_sql_is_a_readable_400(ui: BackgroundUI) -> None:
    status, body = request(ui.url, "/api/explain", {"sql": "SELEC epoch FROM run_1"})
    assert status == 400 and body["sqlstate"] == "42601" and "syntax error" in body["error"]
    task = answer(ui.url, "SELECT nosuchcolumn FROM run_1")
    assert task["state"] == "error" and "nosuchcolumn" in task["error"]["error"]
    status, body = request(ui.url, "/api/explain", {"sql": ""})
    assert status == 400 and "type a query" in body["error"]


def test_writes_are_refused_and_change_nothing(ui: BackgroundUI, recorded) -> None:
    for sql in ("DROP TABLE runs", "DELETE FROM logs", "COPY runs TO '/tmp/x.csv'", "ATTACH 'x.db'"):
        status, body = request(ui.url, "/api/explain", {"sql": sql})
        assert status == 400 and ("read-only" in body["error"] or "not allowed" in body["error"]), body
        task = answer(ui.url, sql)
        assert task["state"] == "error"
    assert florql.connect(recorded.home).sql("SELECT count(*) FROM logs WHERE run_id = 1").fetchall() == [(12,)]


def test_posts_need_json(ui: BackgroundUI) -> None:
    """A cross-site HTML form cannot send application/json, so it cannot start a replay."""
    status, body = request(ui.url, "/api/query", method="POST", headers={"Content-Type": "text/plain"})
    assert status == 400 and "JSON" in body["error"]


def test_foreign_host_header_is_refused_without_a_password(ui: BackgroundUI) -> None:
    """DNS rebinding: a page from elsewhere reaching 127.0.0.1 under its own name gets nothing."""
    status, body = request(ui.url, "/api/runs", headers={"Host": "evil.example:8765"})
    assert status == 403 and "loopback" in body["error"]
    status, _ = request(ui.url, "/api/runs", headers={"Host": "localhost:8765"})
    assert status == 200


def test_explain_then_hindsight_query_replays_bit_for_bit(ui: BackgroundUI, recorded) -> None:
    sql = "SELECT epoch, step, grad_norm FROM run_1 ORDER BY epoch, step"
    status, plan = request(ui.url, "/api/explain", {"sql": sql})
    assert status == 200 and plan["jobs"] >= 1 and plan["est_s"] > 0 and "grad_norm" in plan["plan"]
    task = answer(ui.url, sql)
    assert task["state"] == "done", task["error"]
    assert task["jobs_total"] == task["jobs_done"] == plan["jobs"]
    rows = task["answer"]["rows"]
    assert [r[2] for r in rows] == logged_grad_norm(recorded.home, run_id=2)
    (series,) = task["answer"]["chart"]["series"]
    assert series["label"] == "grad_norm" and series["replayed"] is True
    assert series["values"] == [r[2] for r in rows]
    # the run page now charts the replayed name, told apart from the logged one
    _, body = request(ui.url, "/api/runs/1")
    replayed = {c["title"]: c["series"][0]["replayed"] for c in body["charts"]}
    assert replayed == {"loss": False, "grad_norm": True}
    # and asking again replays nothing
    _, plan = request(ui.url, "/api/explain", {"sql": sql})
    assert plan["jobs"] == 0


def test_compare_puts_one_line_per_run_labelled_with_args(ui: BackgroundUI) -> None:
    status, body = request(ui.url, "/api/compare?runs=1,2&name=loss")
    assert status == 200
    chart = body["chart"]
    assert [s["label"] for s in chart["series"]] == ["run 1 (lr=0.1)", "run 2 (lr=0.1)"]
    assert chart["series"][0]["values"] == chart["series"][1]["values"]  # same seed, same code
    status, body = request(ui.url, "/api/compare?runs=1,2&name=nosuch")
    assert status == 400 and "nosuch" in body["error"]


def test_password_required_off_loopback(recorded, tmp_path: Path) -> None:
    with pytest.raises(UIConfigError, match="without a password"):
        BackgroundUI(str(recorded.home), host="0.0.0.0")
    with BackgroundUI(str(recorded.home), host="0.0.0.0", password="pw-123") as server:
        url = f"http://127.0.0.1:{server.server.server_address[1]}"
        status, body = request(url, "/api/runs")
        assert status == 401 and "password" in body["error"]
        wrong = base64.b64encode(b"me:nope").decode()
        assert request(url, "/api/runs", headers={"Authorization": f"Basic {wrong}"})[0] == 401
        right = base64.b64encode(b"me:pw-123").decode()
        status, body = request(url, "/api/runs", headers={"Authorization": f"Basic {right}"})
        assert status == 200 and len(body["runs"]) == 2


def test_florql_ui_command_serves_the_store_and_refuses_an_open_address_without_password(recorded) -> None:
    command = [sys.executable, "-m", "florql.cli", "--store", str(recorded.home), "ui"]
    refused = subprocess.run([*command, "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--password-file" in refused.stderr
    server = subprocess.Popen(
        [*command, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_stops_it,
    )
    try:
        assert server.stdout is not None
        banner = server.stdout.readline()  # florql ui: http://127.0.0.1:PORT/  (Ctrl-C stops it)
        url = banner.split()[2].rstrip("/")
        status, body = request(url, "/api/runs")
        assert status == 200 and [r["run_id"] for r in body["runs"]] == [1, 2]
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
