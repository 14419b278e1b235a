"""Large buffers written past the page cache (`RunFiles.put_uncached`): whole, atomic, and written
buffered where the file system refuses O_DIRECT."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from florql.storage import runfiles
from florql.storage.runfiles import TMP_PREFIX, UNCACHED_MIN_BYTES, LocalRunFiles

# Sizes around the bounce buffer and O_DIRECT's block: an odd tail, an exact multiple, more than one buffer.
SIZES = [UNCACHED_MIN_BYTES + 1, 2 * runfiles._BOUNCE_BYTES, 2 * runfiles._BOUNCE_BYTES + 4095, 1000]


def payload(size: int) -> memoryview:
    return memoryview(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))


def leftovers(root) -> list[str]:
    return [name for _, _, names in os.walk(root) for name in names if name.startswith(TMP_PREFIX)]


@pytest.mark.parametrize("size", SIZES)
def test_a_large_buffer_is_written_whole(tmp_path, size: int) -> None:
    files = LocalRunFiles(tmp_path)
    data = payload(size)
    files.put_uncached("runs/1/chunks/ab/big", data)
    assert files.get("runs/1/chunks/ab/big") == data.tobytes()
    assert leftovers(tmp_path) == []


def test_a_float_tensor_buffer_is_written_as_its_bytes(tmp_path) -> None:
    values = np.random.default_rng(0).standard_normal(UNCACHED_MIN_BYTES // 8 + 3)
    LocalRunFiles(tmp_path).put_uncached("big", memoryview(values))  # format "d", not bytes
    assert (tmp_path / "big").read_bytes() == values.tobytes()


def test_a_file_system_without_o_direct_gets_a_buffered_write(tmp_path, monkeypatch) -> None:
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    data = payload(SIZES[2])
    LocalRunFiles(tmp_path).put_uncached("big", data)
    assert (tmp_path / "big").read_bytes() == data.tobytes()
    assert leftovers(tmp_path) == []


def test_an_alignment_refused_mid_write_falls_back_to_a_buffered_write(tmp_path, monkeypatch) -> None:
    def refused(fd: int, data: memoryview) -> None:
        os.write(fd, b"partial")
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(runfiles, "_write_direct", refused)
    data = payload(SIZES[0])
    LocalRunFiles(tmp_path).put_uncached("big", data)
    assert (tmp_path / "big").read_bytes() == data.tobytes()
    assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary_one(tmp_path, monkeypatch) -> None:
    def full(fd: int, data: memoryview) -> None:
        os.ftruncate(fd, 4096)  # some of it landed
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles, "_write_direct", full)
    files = LocalRunFiles(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        files.put_uncached("big", payload(SIZES[0]))
    assert not files.exists("big")
    assert leftovers(tmp_path) == []


def test_an_existing_file_is_replaced_whole(tmp_path) -> None:
    files = LocalRunFiles(tmp_path)
    files.put("big", b"old" * 10)
    data = payload(SIZES[0])
    files.put_uncached("big", data)
    assert files.get("big") == data.tobytes()
