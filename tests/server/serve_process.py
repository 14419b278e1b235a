"""`florql serve` as a real process on a free loopback port, for the tests that need one."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from process_support import ctrl_c_stops_it

WAIT_S = 180  # the longest a test waits for a state before it fails (never a timing assertion)


def florql_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "florql.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def start_server(store: Path, *options: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """`florql serve --store STORE OPTIONS…`, once it listens: (process, port)."""
    port = free_port()
    proc = subprocess.Popen(
        florql_command("serve", "--store", str(store), "--port", str(port), *options),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_stops_it,
    )

    def listening() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, "florql serve to listen")
    return proc, port


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
