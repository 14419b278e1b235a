"""What the audit hook records as the script's inputs: its own reads, not florql's."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from florql import reads


@pytest.fixture
def recording_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh record, on even where an earlier test's query side stopped it in this process."""
    monkeypatch.setattr(reads, "_recording", True)
    monkeypatch.setattr(reads, "READ_FILES", {})
    monkeypatch.setattr(reads, "WRITTEN_FILES", set())


def test_files_that_florql_threads_open_are_not_the_scripts_inputs(recording_reads, tmp_path: Path) -> None:
    data, checkpoints = tmp_path / "data.csv", tmp_path / "checkpoints"
    data.write_text("1,2\n")
    checkpoints.mkdir()
    (checkpoints / "record.json").write_text("{}")
    reads.WRITTEN_FILES.clear()  # written before the run: inputs, not its outputs

    def persist() -> None:  # a florql thread opening a file of its own (a persist opens its folder to fsync it)
        (checkpoints / "record.json").read_text()

    thread = threading.Thread(target=persist, name="florql-checkpoint-persist")
    thread.start()
    thread.join()
    data.read_text()
    assert set(reads.READ_FILES) == {str(data)}
