#!/usr/bin/env bash
# Lint and type-check: ruff (lint and format) on the repository, mypy on the installed package's layout.
#
# florql installs storage/ and replay/ as florql.storage and florql.replay (package-dir mapping in pyproject.toml),
# which mypy cannot follow from the source tree: it would see `storage` and `replay` as top-level packages.
# So mypy runs on a staged copy laid out the way the package installs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=${PYTHON:-python3}

"$PY" -m ruff check .
"$PY" -m ruff format --check .

tmp=$(mktemp -d "${TMPDIR:-/tmp}/florql-lint.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# stage SOURCE DEST: copy a source folder into the staged package, without bytecode caches.
stage() {
    mkdir -p "$tmp/$2"
    tar -C "$1" --exclude=__pycache__ -cf - . | tar -C "$tmp/$2" -xf -
}
stage florql florql
stage storage florql/storage
stage replay florql/replay

# The cache lives outside the repository and the staging folder, so that later runs are incremental.
cache=${MYPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/florql/mypy}

# Report paths as they are in the repository, not as they are staged.
(cd "$tmp" && "$PY" -m mypy --config-file "$repo/pyproject.toml" --cache-dir "$cache" -p florql) |
    sed -e 's#^florql/storage/#storage/#' -e 's#^florql/replay/#replay/#'
