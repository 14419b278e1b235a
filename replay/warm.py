"""A warm start for local replay jobs: a fork server that has imported torch, NumPy and the worker.

A fresh interpreter spends seconds importing torch before a job's script starts. The fork server
(`python -m florql.replay.warm SOCKET`) imports them once and then forks one child per job, so
each job still runs in a process of its own (the script's modules, globals and RNGs start fresh
there) and a crash or `os._exit` takes only that job down. Fork safety: the server never starts a
thread (it loads OpenBLAS with one thread and checks that it has one before serving), never
initialises CUDA and runs no torch op, so no lock, OpenMP pool or device context is copied
half-held into a child. The child sets the job's thread counts (torch, OpenBLAS) as a fresh
worker would from `OMP_NUM_THREADS`.

Protocol, over a Unix socket in a private folder: the executor connects and sends one JSON line
`{"spec": PATH, "env": {...}}`; the server forks and closes its end; the child runs the job like
`python -m florql.replay.worker PATH` (output into PATH.out), sends its exit status and exits. The
executor's read ends when the child is gone, however it ended.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import importlib.util
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

from florql.replay.jobs import JobResult, JobSpec
from florql.replay.launcher import OUTPUT_TAIL, SPEC_FILE, result_path

READY = "ready"
START_TIMEOUT_S = 120.0


class ForkServer:
    """The executor's handle on one fork server; `launch` runs a job in a fresh fork of it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.folder = tempfile.mkdtemp(prefix="florql-warm-")
        self.socket_path = os.path.join(self.folder, "server.sock")
        server_env = dict(env, OPENBLAS_NUM_THREADS="1")  # no BLAS pool threads before fork
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "florql.replay.warm", self.socket_path],
            env=server_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._ready = threading.Event()
        self._failure: str | None = None
        threading.Thread(target=self._await_ready, name="florql-warm-start", daemon=True).start()

    def _await_ready(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline().strip()
        if line != READY:
            self._failure = line or self.proc.stderr.read()[-OUTPUT_TAIL:] or f"exited with {self.proc.wait()}"
        self._ready.set()

    def ready(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Wait until the server serves (False if it could not start in time: run jobs cold then)."""
        return self._ready.wait(timeout) and self._failure is None

    def launch(self, spec: JobSpec, env: dict[str, str]) -> JobResult:
        with tempfile.TemporaryDirectory(prefix="florql-job-", dir=self.folder) as tmp:
            spec_path = os.path.join(tmp, SPEC_FILE)
            with open(spec_path, "w") as f:
                f.write(spec.to_json())
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(self.socket_path)
                conn.sendall((json.dumps({"spec": spec_path, "env": env}) + "\n").encode())
                status = _read_all(conn).strip()
            try:
                with open(result_path(spec_path)) as f:
                    return JobResult(**json.load(f))
            except FileNotFoundError:
                with open(spec_path + ".out", errors="replace") as f:
                    tail = f.read()[-OUTPUT_TAIL:]
                ended = f"exited with {status}" if status else "died (killed by a signal?)"
                return JobResult(spec.job_id, ok=False, error=f"worker {ended}: {tail}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the server exits at EOF; running jobs finish on their own
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


_SHARED: ForkServer | None = None
_SHARED_LOCK = threading.Lock()


def shared_fork_server(env: dict[str, str]) -> ForkServer:
    """This process's one fork server, started on first use and again if it died.

    Every local executor (a connection each) uses it: a server holds torch in memory, so one per
    executor would cost hundreds of MB per connection. It exits with this process (EOF on its stdin).
    """
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED.proc.poll() is not None:
            _SHARED = ForkServer(env)
            atexit.register(_SHARED.close)
        return _SHARED


def stop_shared_fork_server() -> None:
    """Stop this process's fork server; the next local job starts a new one (a cold start)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None:
            _SHARED.close()
            _SHARED = None


def _read_all(conn: socket.socket) -> str:
    chunks = []
    while chunk := conn.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


# ---- the server process -------------------------------------------------------------------------
# What training scripts import (an optimizer's constructor imports torch._dynamo: seconds), when installed.
PRELOAD = ("numpy", "torch", "torch._dynamo", "torch.utils.data", "torchvision", "florql.replay.worker")


def serve(socket_path: str) -> None:
    for module in PRELOAD:
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)

    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        print(f"the fork server has {threads} threads after its imports; replay jobs start cold", flush=True)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    listener.listen(64)
    print(READY, flush=True)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
        _reap()
        if sys.stdin in readable and not sys.stdin.readline():
            return  # the executor closed us (or died)
        if listener in readable:
            conn, _ = listener.accept()
            request = json.loads(conn.makefile().readline())
            if os.fork() == 0:
                listener.close()
                _child(conn, request)
            conn.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _child(conn: socket.socket, request: dict) -> None:
    code = 1
    try:
        spec_path = request["spec"]
        os.environ.clear()
        os.environ.update(request["env"])
        out = os.open(spec_path + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        _set_blas_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
        from florql.replay import worker

        code = worker.run_and_report(spec_path)
        conn.sendall(f"{code}\n".encode())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _set_blas_threads(threads: int) -> None:
    """OpenBLAS's thread count, as a fresh worker gets it from OMP_NUM_THREADS."""
    if threads <= 1:
        return
    with open("/proc/self/maps") as f:
        libraries = {line.split()[-1] for line in f if "openblas" in line.lower() and line.rstrip().endswith(".so")}
    for path in libraries:
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, symbol):
                getattr(lib, symbol)(threads)
                break


if __name__ == "__main__":
    serve(sys.argv[1])
