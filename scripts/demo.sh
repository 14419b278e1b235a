#!/usr/bin/env bash
# One command on a fresh machine: install florql, record the example run, answer a hindsight query.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m florql.cli demo --dir "${1:-florql-demo}"
