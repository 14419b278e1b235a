"""The package's layers point one way: storage ← replay ← the user's face (florql)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Which florql modules each layer may import. `florql` alone is the namespace (light: no torch).
ALLOWED = {
    "storage": ("florql.storage",),
    "replay": ("florql.storage", "florql.replay"),
}


def _florql_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{a.name}" if node.module == "florql" else node.module for a in node.names)
    return {n for n in names if n == "florql" or n.startswith("florql.")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_never_import_upper_ones(layer: str):
    wrong = {
        f"{path.name}: {name}"
        for path in sorted((ROOT / layer).glob("*.py"))
        for name in _florql_imports(path)
        if name != "florql" and not name.startswith(ALLOWED[layer])
    }
    assert not wrong, f"{layer}/ imports from a layer above it: {sorted(wrong)}"


def test_the_query_side_imports_no_torch():
    code = (
        "import sys, florql, florql.api, florql.cli, florql.server\n"
        "florql.connect\n"
        "print(sorted(m for m in ('torch', 'florql.session', 'florql.recording') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layers_install_inside_the_florql_namespace():
    code = "import florql.storage, florql.replay, sys; print('storage' in sys.modules, 'replay' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.split() == ["False", "False"]  # no generic top-level names
