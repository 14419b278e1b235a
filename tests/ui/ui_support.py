"""Helpers shared by the UI tests."""

from __future__ import annotations

from pathlib import Path

import florql

ARTIFACTS = Path(__file__).resolve().parents[2] / "tmp" / "artifacts"  # screenshots kept after the run


def logged_grad_norm(home: Path, run_id: int) -> list[float]:
    """grad_norm as run `run_id` logged it, in (epoch, step) order: the truth a replay must match."""
    rows = (
        florql.connect(home, replay="never")
        .sql(
            "SELECT value_float FROM logs WHERE run_id = ? AND name = 'grad_norm' AND source = 'logged'"
            " ORDER BY epoch, step",
            [run_id],
        )
        .fetchall()
    )
    return [v for (v,) in rows]
