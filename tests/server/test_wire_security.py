"""Authentication, TLS, the loopback rule, and read-only enforcement."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from florql.server import BackgroundServer, Server, ServerConfigError, build_server
from florql.server.server import check_listen_policy


def test_scram_password(password_server):
    with psycopg.connect(password_server.dsn()) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_wrong_password(password_server):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(password_server.dsn(password="wrong"))
    with psycopg.connect(password_server.dsn()) as c:  # the server is still fine
        assert c.execute("SELECT 2").fetchone() == (2,)


def test_password_required_for_password_server(password_server):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"host=127.0.0.1 port={password_server.port} user=florql dbname=florql password=")


def test_no_password_on_non_loopback_bind_is_refused(store):
    with pytest.raises(ServerConfigError, match="without a password"):
        Server(store.factory, host="0.0.0.0", port=0)
    check_listen_policy("127.0.0.1", False)
    check_listen_policy("localhost", False)
    check_listen_policy("0.0.0.0", True)


def test_cli_refuses_non_loopback_without_password(tmp_path):
    from florql.server import main_args

    assert main_args(["--host", "0.0.0.0", "--port", "0", "--store", str(tmp_path)]) == 2


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "pw").write_text("tls-pw\n")
    return folder


def test_tls_sslmode_require(certificate):
    server = build_server(
        str(certificate),
        port=0,
        password_file=str(certificate / "pw"),
        tls_cert=str(certificate / "cert.pem"),
        tls_key=str(certificate / "key.pem"),
    )
    with BackgroundServer(server) as running:
        dsn = f"host=127.0.0.1 port={running.port} user=florql dbname=florql password=tls-pw"
        with psycopg.connect(dsn + " sslmode=require") as c:
            assert c.pgconn.ssl_in_use
            assert c.execute("SELECT 40 + 2").fetchone() == (42,)
            with pytest.raises(psycopg.Error) as err:  # the password file's user is an analyst, under the ceiling
                c.execute("SET replay_budget = '2 min'")
            assert err.value.sqlstate == "42501" and "limit of 60 s" in str(err.value)
        with psycopg.connect(dsn + " sslmode=disable") as c:  # plain connections stay possible
            assert not c.pgconn.ssl_in_use


def test_password_file_and_users_file_do_not_go_together(tmp_path):
    (tmp_path / "pw").write_text("pw\n")
    (tmp_path / "users").write_text("")
    with pytest.raises(ServerConfigError, match="do not go together"):
        build_server(str(tmp_path), port=0, password_file=str(tmp_path / "pw"), users_file=str(tmp_path / "users"))


def test_no_tls_answers_n(server):
    with psycopg.connect(server.dsn(sslmode="prefer")) as c:
        assert not c.pgconn.ssl_in_use
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(server.dsn(sslmode="require"))


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO runs VALUES (2, 'x')",
        "UPDATE runs SET script = 'x'",
        "DELETE FROM runs",
        "CREATE TABLE t (a int)",
        "DROP TABLE runs",
        "COPY runs TO '/tmp/out.csv'",
        "ATTACH '/tmp/x.db' AS x",
        "INSTALL httpfs",
        "WITH x AS (SELECT 1) DELETE FROM runs",
        "SELECT * INTO new_table FROM runs",
    ],
)
def test_write_statements_are_refused(server, statement):
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute(statement)
        assert err.value.sqlstate == "25006"
        assert c.execute("SELECT count(*) FROM runs").fetchone() == (1,)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT * FROM '/etc/passwd'",
        "SELECT * FROM read_blob('/etc/passwd')",
        "SELECT * FROM parquet_metadata('/tmp/x.parquet')",
        "SELECT * FROM runs, read_parquet('/tmp/x.parquet')",
    ],
)
def test_file_access_is_refused(server, statement):
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute(statement)
        assert err.value.sqlstate == "42501"


def test_file_access_is_refused_in_catalog_queries(server):
    with psycopg.connect(server.dsn(), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as err:
            c.execute("SELECT relname FROM pg_class, read_csv('/etc/passwd')")
        assert err.value.sqlstate == "42501"


def _dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} dbname=florql user=florql connect_timeout=10"


def test_replay_budget_over_the_wire(tmp_path):
    """A hindsight query within budget answers; one over budget is refused with SQLSTATE 53400."""
    import os
    import subprocess
    import sys

    import florql

    script = tmp_path / "train.py"
    body = (
        "import florql\n"
        "for epoch in florql.loop('epoch', range(3)):\n"
        "    for step in florql.loop('step', range(2)):\n"
        "        florql.log('loss', float(epoch + step))\n"
        "{hindsight}"
    )
    script.write_text(body.format(hindsight=""))
    env = {**os.environ, "FLORQL_HOME": str(tmp_path / "store")}
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, check=True, timeout=120)
    script.write_text(body.format(hindsight="        florql.log('double', 2.0 * (epoch + step))\n"))
    home = str(tmp_path / "store")
    query = "SELECT epoch, step, double FROM run_1 ORDER BY epoch, step"
    with BackgroundServer(Server(lambda: florql.connect(home, replay_budget=0.001), port=0)) as tight:
        with psycopg.connect(_dsn(tight.port), autocommit=True) as c:
            with pytest.raises(psycopg.Error) as err:
                c.execute(query)
            assert err.value.sqlstate == "53400"
            assert "budget" in str(err.value) and "florql query" in str(err.value)
            assert c.execute("SELECT count(*) FROM run_1").fetchone() == (6,)  # the session stays usable
    with BackgroundServer(Server(lambda: florql.connect(home, replay_budget=120), port=0)) as roomy:
        with psycopg.connect(_dsn(roomy.port), autocommit=True) as c:
            rows = c.execute(query).fetchall()
    assert rows == [(e, s, 2.0 * (e + s)) for e in range(3) for s in range(2)]
