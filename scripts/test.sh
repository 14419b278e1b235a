#!/usr/bin/env bash
# One command on a fresh machine: install florql with its test dependencies, lint and type-check, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real clients for the PostgreSQL-wire tests: psql and the JDBC driver (Java from Debian);
# a real browser for the web UI's tests (Debian's chromium, driven by Playwright), and cairo for PNG charts.
need=()
command -v psql >/dev/null || need+=(postgresql-client)
[ -e /usr/share/java/postgresql.jar ] || need+=(libpostgresql-jdbc-java)
command -v javac >/dev/null || need+=(default-jdk-headless)
command -v chromium >/dev/null || need+=(chromium)
ldconfig -p 2>/dev/null | grep -q 'libcairo.so.2 ' || need+=(libcairo2)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

bash scripts/install.sh "test,ray,s3"
bash scripts/lint.sh  # ruff and mypy come with the test extra
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
