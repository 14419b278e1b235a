"""The PostgreSQL JDBC driver's DatabaseMetaData path (Metabase, Tableau, DBeaver)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

JAR = Path("/usr/share/java/postgresql.jar")
SOURCE = Path(__file__).parent / "java" / "JdbcCheck.java"

pytestmark = pytest.mark.skipif(
    shutil.which("java") is None or shutil.which("javac") is None or not JAR.exists(),
    reason="needs java, javac and Debian's libpostgresql-jdbc-java (/usr/share/java/postgresql.jar)",
)


@pytest.fixture(scope="module")
def classes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("jdbc")
    subprocess.run(["javac", "-d", str(out), "-cp", str(JAR), str(SOURCE)], check=True, timeout=180)
    return out


def test_database_metadata_and_queries(classes, password_server, store):
    url = f"jdbc:postgresql://127.0.0.1:{password_server.port}/florql"
    out = subprocess.run(
        ["java", "-cp", f"{JAR}:{classes}", "JdbcCheck", url, "florql", password_server.password, store.run_table],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "SCHEMA public" in lines
    assert any(line.startswith(f"TABLE public {store.run_table} ") for line in lines)
    assert f"COLUMN {store.run_table} loss float8 3" in lines or any(
        line.startswith(f"COLUMN {store.run_table} loss float8") for line in lines
    )
    assert f"ROWS {store.rows}" in lines
    assert lines.count(f"COUNT {store.rows}") == 6
    assert f"FETCHED {store.rows}" in lines and lines[-1] == "OK"
