"""A warm start for local replay jobs: a fork server per store that outlives the process starting it.

A fresh interpreter spends seconds importing torch before a job's script starts. The fork server
(`python -m florql.replay.warm …`) imports torch, NumPy and the worker once and then forks one
child per job, so each job still runs in a process of its own (the script's modules, globals and
RNGs start fresh there) and a crash or `os._exit` takes only that job down. Fork safety: the server
never starts a thread (it loads OpenBLAS with one thread and checks that it has one before
serving), never initialises CUDA and runs no torch op, so no lock, OpenMP pool or device context is
copied half-held into a child. The child sets the job's thread counts (torch, OpenBLAS) as a fresh
worker would from `OMP_NUM_THREADS`.

One server per store *and* per software: its key hashes the store's real path, the interpreter,
the versions of torch, NumPy and torchvision, florql's own source files and the variables that
change what an import finds, so a changed florql, torch or interpreter gets a server of its own and
the stale one idles out. Its socket, lock, log and description (`<key>.sock/.lock/.log/.json`) live
in a private per-user folder (mode 0700), so no other user reaches it. The first process that needs
it starts it under the lock file (two processes racing start one server); later processes, a new
`florql query` included, connect to it. A store's server is forked from this user's *template*
server of the same software (a server of no store, started the same way when none is up), so a
new store's first replay does not import torch again; each store's server is a process of its
own, sharing nothing with other stores' but the imported code. It never opens the DuckDB file: jobs write run files only.
It exits when idle for `FLORQL_REPLAY_SERVER_IDLE_S` seconds (600 by default), when its store's
folder is removed, when its socket is taken over or removed, or when asked (`florql replay-server
stop`). A client that finds it dead or unresponsive starts another, else runs the job cold: it
never hangs on a dead server.

Protocol, one JSON line per connection: `{"spec": PATH, "env": {...}}` forks a child, which answers
`started PID` at once and `exit CODE` when the job ends (its output goes to PATH.out); `{"ping":
true}` answers `pong PID`; `{"stop": true}` stops the server (running jobs finish on their own);
to the template, `{"spawn": {socket, info, store, idle_s}}` forks a store's server (`ready`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from florql.replay import PRELOAD
from florql.replay.jobs import JobResult, JobSpec
from florql.replay.launcher import OUTPUT_TAIL, SPEC_FILE, result_path

READY = "ready"
START_TIMEOUT_S = 120.0
HANDSHAKE_TIMEOUT_S = 30.0  # a live server forks within milliseconds; one that does not is treated as dead
IDLE_ENV = "FLORQL_REPLAY_SERVER_IDLE_S"
TEMPLATE = ""  # the "store" of the template server, which forks new stores' servers
DEFAULT_IDLE_S = 600.0
# Variables that change what the server's imports find: a process with other values gets its own server.
IMPORT_ENV = ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD")


# ---- where a store's server lives ---------------------------------------------------------------
def runtime_folder() -> str:
    """This user's private folder for fork servers' sockets (created 0700; refused if not ours)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    folder = os.path.join(base, f"florql-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or not os.path.isdir(folder):
        raise PermissionError(f"{folder} must be a folder of this user's only (mode 0700): remove it and retry")
    return folder


_FINGERPRINT: str | None = None


def software_fingerprint() -> str:
    """What a server's imports depend on: interpreter, library versions, florql's source files."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import florql
        import florql.replay
        import florql.storage

        parts = [os.path.realpath(sys.executable), sys.version]
        for dist in ("torch", "numpy", "torchvision"):
            try:
                parts.append(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                parts.append(f"{dist} absent")
        for package in (florql, florql.storage, florql.replay):
            folder = os.path.dirname(os.path.abspath(package.__file__ or ""))
            for name in sorted(os.listdir(folder)):
                if name.endswith(".py"):
                    info = os.stat(os.path.join(folder, name))
                    parts.append(f"{folder}/{name}:{info.st_size}:{info.st_mtime_ns}")
        parts += [f"{name}={os.environ.get(name, '')}" for name in IMPORT_ENV]
        _FINGERPRINT = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return _FINGERPRINT


@dataclass(frozen=True)
class ServerPaths:
    store: str
    key: str
    folder: str

    @classmethod
    def of(cls, store: str) -> ServerPaths:
        store = os.path.realpath(store) if store and "://" not in store else store
        key = hashlib.sha256(f"{store}\n{software_fingerprint()}".encode()).hexdigest()[:24]
        return cls(store, key, runtime_folder())

    def file(self, suffix: str) -> str:
        return os.path.join(self.folder, f"{self.key}.{suffix}")

    @property
    def socket(self) -> str:
        return self.file("sock")


def _request(socket_path: str, message: dict, timeout: float = HANDSHAKE_TIMEOUT_S) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(socket_path)
        conn.sendall((json.dumps(message) + "\n").encode())
    except BaseException:
        conn.close()
        raise
    return conn


def ping(paths: ServerPaths, timeout: float = 2.0) -> int | None:
    """The pid of the store's live server, or None when none answers."""
    try:
        with _request(paths.socket, {"ping": True}, timeout) as conn:
            reply = _read_line(conn).split()
    except OSError:
        return None
    return int(reply[1]) if len(reply) == 2 and reply[0] == "pong" else None


def server_is_up(store: str) -> bool:
    """Is a fork server for this store and this software serving now? (Starts nothing.)"""
    try:
        return ping(ServerPaths.of(store), timeout=1.0) is not None
    except OSError:
        return False


def starts_warm(store: str) -> bool:
    """Would a replay job of this store start warm now: its server answers, or this user's template
    server does (which forks the store's server in milliseconds)? (Starts nothing.)"""
    return server_is_up(store) or server_is_up(TEMPLATE)


@contextlib.contextmanager
def _start_lock(paths: ServerPaths) -> Iterator[None]:
    path = paths.file("lock")
    while True:
        lock = open(path, "a")  # noqa: SIM115  (closed below, or when this process dies)
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or if this process dies
        if _still_at(lock, path):
            break
        lock.close()  # a stopping server removed the file while we waited: lock the one there now
    try:
        yield
    finally:
        lock.close()


def _still_at(f: IO[str], path: str) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_lock(path: str) -> None:
    """A stopping server removes its lock file, unless a process holds it (starting the next server)."""
    try:
        lock = open(path, "a")  # noqa: SIM115
    except OSError:
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        if _still_at(lock, path):
            os.unlink(path)  # under the lock: a waiter finds the file gone and locks a new one


def _start_server(paths: ServerPaths, env: dict[str, str]) -> str | None:
    """Start the store's server unless one answers (under the lock). None when it serves, else why not."""
    with _start_lock(paths):
        if ping(paths) is not None:
            return None  # another process started it while we waited for the lock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.socket)  # a dead server's
        if paths.store != TEMPLATE and _fork_from_template(paths, env):
            return None
        return _launch_server(paths, env)


def _fork_from_template(paths: ServerPaths, env: dict[str, str]) -> bool:
    """Have this user's template server (same software, no store) fork the store's server: a new
    store's first replay then starts in milliseconds instead of importing torch again."""
    template = ServerPaths.of(TEMPLATE)
    if ping(template) is None and _start_server(template, env) is not None:
        return False
    spawn = {"socket": paths.socket, "info": paths.file("json"), "store": paths.store, "idle_s": _idle_s()}
    try:
        with _request(template.socket, {"spawn": spawn}) as conn:
            return _read_line(conn) == READY
    except OSError:
        return False


def _idle_s() -> float:
    return float(os.environ.get(IDLE_ENV) or DEFAULT_IDLE_S)


def _launch_server(paths: ServerPaths, env: dict[str, str]) -> str | None:
    """A server process of its own (a fresh interpreter importing torch). None when it serves."""
    server_env = dict(env, OPENBLAS_NUM_THREADS="1")  # no BLAS pool threads before fork
    command = [sys.executable, "-m", "florql.replay.warm", paths.socket, paths.file("json"), paths.store]
    with open(paths.file("log"), "w") as log:
        proc = subprocess.Popen(
            [*command, str(_idle_s())],
            env=server_env,
            cwd=paths.folder,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # outlives this process and its terminal's signals
        )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    proc.stdout.close()
    if line == READY:
        threading.Thread(target=proc.wait, name="florql-warm-reaper", daemon=True).start()  # no zombie
        return None
    with open(paths.file("log"), errors="replace") as f:
        return line or f.read()[-OUTPUT_TAIL:] or f"exited with {proc.wait()}"


class ForkServer:
    """A process's handle on its store's fork server; `launch` runs a job in a fresh fork of it.

    On creation it connects to a live server, else starts one in the background (so that the
    imports overlap with planning the query); `ready(0)` says whether it started, `serving()` whether
    it answers now.
    """

    def __init__(self, store: str, env: dict[str, str]) -> None:
        self.paths = ServerPaths.of(store)
        self.env = env
        self.pid: int | None = ping(self.paths)
        self.failure: str | None = None
        self._ready = threading.Event()
        if self.pid is not None:
            self._ready.set()
        else:
            threading.Thread(target=self._start, name="florql-warm-start", daemon=True).start()

    def _start(self) -> None:
        try:
            self.failure = _start_server(self.paths, self.env)
        except Exception as exc:  # a start that fails means cold jobs, never a failed query
            self.failure = f"{type(exc).__name__}: {exc}"
        self.pid = ping(self.paths) if self.failure is None else None
        self._ready.set()

    def ready(self, timeout: float = START_TIMEOUT_S) -> bool:
        """Wait until the server serves (False if it could not start in time: run jobs cold then)."""
        return self._ready.wait(timeout) and self.failure is None

    def serving(self) -> bool:
        """Up and answering now (it may have stopped since it started: idle, killed)."""
        return self.ready(timeout=0) and ping(self.paths, timeout=1.0) is not None

    def launch(self, spec: JobSpec, env: dict[str, str], on_started=None) -> JobResult | None:
        """Run `spec` in a fork of the server. None when no server could be reached or started:
        the caller runs the job cold. `on_started(pid)` is called once the job's process exists."""
        with tempfile.TemporaryDirectory(prefix="florql-job-") as tmp:
            spec_path = os.path.join(tmp, SPEC_FILE)
            started = self._connect(spec, spec_path, env)
            if started is None:
                return None
            conn, pid = started
            with conn:
                conn.settimeout(None)  # the job runs as long as it runs; its end closes the socket
                if on_started is not None:
                    on_started(pid)
                status = _read_line(conn)
            try:
                with open(result_path(spec_path)) as f:
                    return JobResult(**json.load(f))
            except FileNotFoundError:
                try:
                    with open(spec_path + ".out", errors="replace") as f:
                        tail = f.read()[-OUTPUT_TAIL:]
                except FileNotFoundError:
                    tail = ""
                ended = f"exited with {status.split()[-1]}" if status else "died (killed by a signal?)"
                return JobResult(spec.job_id, ok=False, error=f"worker {ended}: {tail}")

    def _connect(self, spec: JobSpec, spec_path: str, env: dict[str, str]) -> tuple[socket.socket, int] | None:
        """A connection whose child has started, restarting a dead server once (that job is cold)."""
        for attempt in range(2):
            with open(spec_path, "w") as f:
                f.write(spec.to_json())
            try:
                conn = _request(self.paths.socket, {"spec": spec_path, "env": env})
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                started = _read_line(conn)
                if started.startswith("started "):
                    return conn, int(started.split()[1])
                conn.close()
            except OSError:
                pass
            if attempt == 0:  # dead, killed or stuck: start a new one and pay a cold start
                spec.warm = False
                self._ready.clear()
                self._start()
                if not self.ready():
                    return None
        return None

    def close(self) -> None:
        """Nothing to release: the server serves the store's later processes and stops when idle."""


_HANDLES: dict[str, ForkServer] = {}
_HANDLES_LOCK = threading.Lock()
_PRIVATE_STORE: str | None = None


def shared_fork_server(env: dict[str, str], store: str | None = None) -> ForkServer:
    """This process's handle on the fork server of `store` (without one: a server private to this
    process, which stops when the process exits)."""
    with _HANDLES_LOCK:
        store = store or _private_store()
        handle = _HANDLES.get(store)
        started = handle is not None and handle.ready(timeout=0)
        if handle is None or handle.failure is not None or (started and not handle.serving()):
            handle = _HANDLES[store] = ForkServer(store, env)  # none yet, a failed start, or stopped since
        return handle


def _private_store() -> str:
    global _PRIVATE_STORE
    if _PRIVATE_STORE is None:
        _PRIVATE_STORE = tempfile.mkdtemp(prefix="florql-private-")
        atexit.register(shutil.rmtree, _PRIVATE_STORE, True)  # its server sees the folder go and exits
    return _PRIVATE_STORE


def running_servers(store: str | None = None, current_only: bool = False) -> list[dict]:
    """The descriptions of this user's live fork servers (of `store` only, when given; of this
    software only, with `current_only`). The template's store is `TEMPLATE`."""
    folder = runtime_folder()
    wanted = os.path.realpath(store) if store and "://" not in store else store
    found = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        paths = ServerPaths(info.get("store", ""), name.removesuffix(".json"), folder)
        if (wanted is None or info.get("store") == wanted) and ping(paths) == info.get("pid"):
            info["current"] = paths.key == ServerPaths.of(info["store"]).key  # of this florql and torch
            if info["current"] or not current_only:
                found.append(info)
    return found


def stop_servers(store: str | None = None, current_only: bool = False) -> int:
    """Stop this user's fork servers (as `running_servers` selects them); how many were stopped."""
    stopped = 0
    for info in running_servers(store, current_only):
        try:
            with _request(info["socket"], {"stop": True}, timeout=5.0) as conn:
                _read_line(conn)
            stopped += 1
        except OSError:
            continue
        _wait_gone(info["pid"])
    with _HANDLES_LOCK:
        for key in [k for k in _HANDLES if store is None or os.path.realpath(k) == os.path.realpath(store)]:
            del _HANDLES[key]
    return stopped


def stop_shared_fork_server() -> None:
    """Stop the fork servers this process started or used; the next job starts one cold."""
    with _HANDLES_LOCK:
        stores = list(_HANDLES)
    for store in stores:
        stop_servers(store)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.02)


def process_alive(pid: int) -> bool:
    """Is `pid` running (a zombie, exited but not yet reaped by its parent, is not)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _read_line(conn: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# ---- the server process -------------------------------------------------------------------------
class Server:
    def __init__(self, socket_path: str, info_path: str, store: str, idle_s: float) -> None:
        self.socket_path, self.info_path, self.store, self.idle_s = socket_path, info_path, store, idle_s
        self.children: set[int] = set()  # jobs: the server is not idle while one runs
        self.spawned: set[int] = set()  # stores' servers forked from this template
        self.last_active = time.monotonic()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_path)
        self.listener.listen(64)
        self.inode = os.stat(socket_path).st_ino
        self._describe()

    def _describe(self) -> None:
        import torch

        info = {
            "pid": os.getpid(),
            "store": self.store,
            "socket": self.socket_path,
            "started_at": time.time(),
            "idle_timeout_s": self.idle_s,
            "python": sys.version.split()[0],
            "executable": sys.executable,
            "torch": torch.__version__,
        }
        tmp = f"{self.info_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, self.info_path)

    def serve(self) -> None:
        try:
            while not self._should_stop():
                readable, _, _ = select.select([self.listener], [], [], 1.0)
                self._reap()
                if readable and self._answer(*self.listener.accept()):
                    return
        finally:
            self._clean_up()

    def _should_stop(self) -> bool:
        idle = not self.children and time.monotonic() - self.last_active > self.idle_s
        store_gone = self.store != TEMPLATE and "://" not in self.store and not os.path.isdir(self.store)
        try:
            replaced = os.stat(self.socket_path).st_ino != self.inode
        except FileNotFoundError:
            replaced = True
        return idle or store_gone or replaced

    def _answer(self, conn: socket.socket, _address) -> bool:
        """Serve one request; True when asked to stop."""
        self.last_active = time.monotonic()
        with conn:
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT_S)
                request = json.loads(_read_line(conn) or "{}")
            except (OSError, ValueError):
                return False
            if request.get("stop"):
                conn.sendall(b"stopping\n")
                return True
            if "spawn" in request and self.store == TEMPLATE:
                self._spawn(conn, request["spawn"])
                return False
            if "spec" not in request:
                conn.sendall(f"pong {os.getpid()}\n".encode())
                return False
            pid = os.fork()
            if pid == 0:
                self.listener.close()
                _child(conn, request)
            self.children.add(pid)
        return False

    def _spawn(self, conn: socket.socket, where: dict) -> None:
        """Fork a store's server: it serves from its own socket and never returns here."""
        pid = os.fork()
        if pid:
            self.spawned.add(pid)
            return
        code = 1
        try:
            self.listener.close()
            os.setsid()
            server = Server(where["socket"], where["info"], where["store"], float(where["idle_s"]))
            conn.sendall(f"{READY}\n".encode())
            conn.close()
            server.serve()
            code = 0
        finally:
            os._exit(code)  # never unwind into the template's frames (its clean-up is not ours)

    def _reap(self) -> None:
        for pid in list(self.children | self.spawned):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            if pid in self.children:
                self.last_active = time.monotonic()
            self.children.discard(pid)
            self.spawned.discard(pid)

    def _clean_up(self) -> None:
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self.inode:  # ours, not a successor's
                os.unlink(self.socket_path)
                os.unlink(self.info_path)
                _remove_lock(self.socket_path.removesuffix("sock") + "lock")


def serve(socket_path: str, info_path: str, store: str, idle_s: float) -> None:
    for module in PRELOAD:
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        print(f"the fork server has {threads} threads after its imports; replay jobs start cold", flush=True)
        return
    server = Server(socket_path, info_path, store, idle_s)
    with contextlib.suppress(BrokenPipeError):  # the starter may have exited (`florql explain`): serve on
        print(READY, flush=True)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # the starter closed its end of the pipe: nothing more goes there
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up the socket on `kill`
    server.serve()


def _child(conn: socket.socket, request: dict) -> None:
    code = 1
    try:
        os.setsid()  # its own process group: a cancel kills the job and whatever it started
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        conn.settimeout(None)
        conn.sendall(f"started {os.getpid()}\n".encode())
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
        conn.sendall(f"exit {code}\n".encode())
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


def main() -> None:
    parser = argparse.ArgumentParser(description="florql's replay fork server (started by florql itself)")
    parser.add_argument("socket")
    parser.add_argument("info")
    parser.add_argument("store")
    parser.add_argument("idle_s", type=float)
    args = parser.parse_args()
    if sys.path and sys.path[0] == os.getcwd():
        del sys.path[0]  # the runtime folder: jobs import from their sandbox, as a fresh worker does
    serve(args.socket, args.info, args.store, args.idle_s)


if __name__ == "__main__":
    main()
