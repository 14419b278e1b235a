"""Run files on an S3-compatible endpoint (moto's standalone server on loopback) through s3fs."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="run files on S3 need the 's3' extra: pip install 'florql[s3]'")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server]")

import torch  # noqa: E402

import florql  # noqa: E402
from florql.storage.checkpoints import CorruptCheckpoint, read_checkpoint, write_checkpoint  # noqa: E402
from florql.storage.remote import OPTIONS_ENV, FsspecRunFiles  # noqa: E402
from florql.storage.runfiles import open_run_files  # noqa: E402
from store_support import GRAD_NORM_QUERY, record_then_add_grad_norm  # noqa: E402

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials and endpoint in the environment, where trainers and replay workers find them."""
    env = dict(CREDENTIALS)
    env[OPTIONS_ENV] = json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def bucket_url(s3_env: dict[str, str], s3_endpoint: str) -> str:
    import boto3

    name = f"florql-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/prefix"


@pytest.fixture
def files(bucket_url: str) -> FsspecRunFiles:
    opened = open_run_files(bucket_url)
    assert isinstance(opened, FsspecRunFiles)
    return opened


def test_put_get_list(files: FsspecRunFiles) -> None:
    files.put("runs/1/run.json", b"{}")
    files.put("runs/1/segments/main/00000000.arrow", b"a")
    files.put("runs/2/run.json", b"{}")
    files.put("runs/1/run.json", b'{"v": 2}')  # replaces
    assert files.get("runs/1/run.json") == b'{"v": 2}'
    assert files.list("runs/1") == ["runs/1/run.json", "runs/1/segments/main/00000000.arrow"]
    assert files.list_dirs("runs") == ["1", "2"]
    assert files.list("runs/9") == [] and files.list_dirs("nothing") == []
    assert files.exists("runs/2/run.json") and not files.exists("runs/2/claim")
    files.delete("runs/2/run.json")
    files.delete("runs/2/run.json")  # absent: no error
    with pytest.raises(FileNotFoundError):
        files.get("runs/2/run.json")
    assert files.local_path("runs/1/run.json") is None


def test_listing_sees_other_writers(files: FsspecRunFiles, bucket_url: str) -> None:
    assert files.list_dirs("runs") == []
    open_run_files(bucket_url).put("runs/7/run.json", b"{}")  # another process, in effect
    assert files.list_dirs("runs") == ["7"] and files.exists("runs/7/run.json")


def test_create_is_exclusive(files: FsspecRunFiles) -> None:
    assert files.create("runs/1/claim", b"first")
    assert not files.create("runs/1/claim", b"second")
    assert files.get("runs/1/claim") == b"first"
    assert files._conditional is True  # moto honours If-None-Match, so no claim objects were needed


def test_concurrent_creates_have_one_winner(files: FsspecRunFiles, bucket_url: str) -> None:
    wins: list[bool] = []
    barrier = threading.Barrier(6)

    def contend(i: int) -> None:
        mine = open_run_files(bucket_url)
        barrier.wait()
        wins.append(mine.create("runs/3/claim", str(i).encode()))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_claim_fallback_without_conditional_puts(files: FsspecRunFiles) -> None:
    # A store that ignores If-None-Match: creates go through claim objects, which stay invisible.
    files._conditional = False
    assert files.create("runs/4/claim", b"a")
    assert not files.create("runs/4/claim", b"b")
    assert files.get("runs/4/claim") == b"a"
    assert files.list("runs/4") == ["runs/4/claim"]
    assert files.list_dirs("runs/4") == []


def test_claim_fallback_contenders_never_both_win(files: FsspecRunFiles) -> None:
    files._conditional = False
    # A rival's claim already stands (it listed first and won, or is about to): we must lose.
    files.put("runs/5/.tmp-claims-claim/0000", b"")
    assert not files.create("runs/5/claim", b"late")
    assert not files.exists("runs/5/claim")
    assert files.list("runs/5") == []


def test_aborted_writer_leaves_nothing(files: FsspecRunFiles) -> None:
    with pytest.raises(RuntimeError):
        with files.writer("runs/1/checkpoints/x.ckpt") as f:
            f.write(b"partial" * 1000)
            raise RuntimeError("killed mid-write")
    assert not files.exists("runs/1/checkpoints/x.ckpt")
    assert files.list("runs") == []
    with files.writer("runs/1/checkpoints/x.ckpt") as f:
        f.write(b"whole")
    assert files.get("runs/1/checkpoints/x.ckpt") == b"whole"


def test_checkpoint_round_trip_and_corruption(files: FsspecRunFiles) -> None:
    payload = {"objects": {"w": torch.arange(1000, dtype=torch.float32)}, "step": 3}
    record = write_checkpoint(files, 1, 0, "iter_end", {"epoch": 0}, payload, stall_s=0.0)
    back = read_checkpoint(files, record)
    assert torch.equal(back["objects"]["w"], payload["objects"]["w"]) and back["step"] == 3
    path = f"runs/1/checkpoints/{record.name}.ckpt"
    data = bytearray(files.get(path))
    data[len(data) // 2] ^= 0xFF
    files.put(path, bytes(data))
    with pytest.raises(CorruptCheckpoint):
        read_checkpoint(files, record)


def test_bad_storage_options_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPTIONS_ENV, "{not json")
    with pytest.raises(florql.UsageError, match=OPTIONS_ENV):
        open_run_files("s3://bucket/prefix")


# ---- end to end: record to S3, answer a hindsight query from it, equal to the local case --------
def record_and_ask(work: Path, env: dict[str, str]) -> list[tuple]:
    """Record TRAIN, add a hindsight log statement, then ask for it (replayed from the run files)."""
    record_then_add_grad_norm(work, env)
    old = os.getcwd()
    os.chdir(work)
    try:
        with florql.connect(env["FLORQL_HOME"], workers=2, progress=False) as db:
            return db.sql(GRAD_NORM_QUERY).fetchall()
    finally:
        os.chdir(old)


def test_hindsight_query_from_s3_equals_local(
    tmp_path: Path, bucket_url: str, s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("FLORQL_RUNS", "FLORQL_ARGS")}
    local_env = dict(base, FLORQL_HOME=str(tmp_path / "local-store"))
    monkeypatch.delenv("FLORQL_RUNS", raising=False)
    local = record_and_ask(tmp_path / "local", local_env)

    remote_env = dict(base, FLORQL_HOME=str(tmp_path / "s3-store"), FLORQL_RUNS=bucket_url)
    monkeypatch.setenv("FLORQL_RUNS", bucket_url)
    remote = record_and_ask(tmp_path / "remote", remote_env)

    assert len(local) == 12 and all(row[2] is not None for row in local)
    assert remote == local
    files = open_run_files(bucket_url)
    assert files.exists("runs/1/run.json") and any(p.endswith(".ckpt") for p in files.list("runs/1/checkpoints"))
    assert not (tmp_path / "s3-store" / "runs").exists()  # only the DuckDB file stays local
