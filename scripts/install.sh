#!/usr/bin/env bash
# Install florql and what its tests need on a fresh Debian machine with Python >= 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU wheel of torch first: a loose requirement on a machine without torch pulls a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"

extras=${1:-}
if [ -n "$extras" ]; then
    "$PY" -m pip install -q -e ".[$extras]"
else
    "$PY" -m pip install -q -e .
fi

# Bytecode now, as a wheel install has it: otherwise a first run compiles florql's lazily imported
# modules inside its first checkpoint, a one-time cost its 2 % checkpoint budget is charged with.
"$PY" -m compileall -q florql storage replay >/dev/null
