"""One process's handle on the store's DuckDB file: shared by its threads, handed to other processes.

DuckDB lets one process at a time open the file, and inside a process every connection to it is a
connection to one database instance. So:

- **Inside a process** every thread (the server's sessions, a notebook's threads, the CLI) leases
  a cursor of one shared connection (`lease`). The file opens on the first lease and closes when it
  has been idle for LINGER_S (opening costs tens of milliseconds), or as soon as another process
  waits for it.
- **One ingester per process.** `sync` ingests new run files on one thread at a time. A caller
  waits for a sync that began after it asked: it then sees every run file that was complete when
  it asked, concurrent callers share one sync, and no two threads ever insert the same segment.
- **Across processes** a process that finds the file held retries with backoff and announces
  itself in `<db>.waiting/`. The holder notices within POLL_S and, once it has had the file for
  MIN_TURN_S, admits no new lease for up to YIELD_S (bounded, so that a lease held by a slow reader
  cannot stall it), closes the file when its current leases end, and leaves it to the waiter for up
  to GRACE_S. A caller that could not get the file in time gets StoreBusy naming the process that
  holds it.
- **Nothing new, no sync.** After a sync over a local store, `RunFolders` remembers the modification
  times of the folders where a new run file could appear; while none changed (and no run is still
  running), a sync has nothing to ingest and is skipped: a few `stat`s instead of listing every run.
  `catalog_token` changes whenever what the tables say may have changed (an ingest, the file
  reopened), so the query side can keep what it read of the catalog between queries.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterator

import duckdb

from florql.storage.database import is_lock_error, open_file, sync
from florql.storage.errors import StoreBusy, StoreConflict
from florql.storage.runfiles import RunFiles

DEFAULT_WAIT_S = 60.0
EXIT_WAIT_S = 2.0  # at exit, how long a query still running in another thread may take to end
LINGER_S = 1.0  # an idle file stays open this long unless another process waits for it
POLL_S = 0.025  # how often the holder looks for waiting processes
MIN_TURN_S = 0.5  # a process that opened the file keeps it this long before it yields (a query's worth)
YIELD_S = 1.0  # how long new leases wait for the current ones to end while another process waits
YIELD_COOLDOWN_S = 1.0  # after a yield that did not free the file, run this long before the next one
GRACE_S = 1.0  # after handing the file over, how long this process leaves it to the waiter
WAITER_STALE_S = 2.0  # a waiter announcement older than this is ignored (waiters refresh it each retry)
MAX_BACKOFF_S = 0.25


class SharedDatabase:
    """The DuckDB file of one store, as this process uses it. Get it with `shared_database`."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self._waiting_dir = db_path + ".waiting"
        self._cond = threading.Condition()
        self._root: duckdb.DuckDBPyConnection | None = None
        self._users = 0
        self._opening = False
        self._exclusive = 0
        self._idle_since = 0.0
        self._yield_until = 0.0
        self._turn_end = 0.0  # opened at least MIN_TURN_S ago: the file may go to a waiting process
        self._next_yield = 0.0  # no yield before this: the turn, or the cooldown after a yield
        self._reopen_after = 0.0
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file the root opened
        self._holder = ""  # what held the file when this process last found it busy
        self._ingest = threading.Condition()
        self._ingesting = False
        self._synced_at = -math.inf  # when the last completed sync began (time.monotonic)
        self._synced_identity: tuple[int, int] | None = None
        self._unchanged_since: RunFolders | None = None  # the folders as the last sync began, when trusted
        self._catalog_token: int | None = next(_TOKENS)
        self._closer_thread: threading.Thread | None = None

    # ---- leases -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, wait_s: float = DEFAULT_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of the shared connection for one operation (one thread uses it)."""
        cursor = self._acquire(wait_s)
        try:
            yield cursor
        finally:
            self._release(cursor)

    def _acquire(self, wait_s: float) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                if self._exclusive:
                    why = "it is being replaced (florql rebuild)"
                elif self._root is not None:
                    if now >= self._yield_until:
                        self._users += 1
                        return self._root.cursor()
                    why = "another process waits for it"
                elif self._opening:
                    why = "another thread is opening it"
                elif now < self._reopen_after and self._others_waiting():
                    why = "it was handed to another process"
                else:
                    self._opening = True
                    break
                if now >= deadline:
                    raise StoreBusy(self._busy_message(wait_s, why))
                self._cond.wait(min(POLL_S, deadline - now))
        try:
            root = self._connect(deadline, wait_s)
        except BaseException:
            with self._cond:
                self._opening = False
                self._cond.notify_all()
            raise
        with self._cond:
            self._opening = False
            self._root = root
            self._identity = _identity(self.db_path)
            self._catalog_token = next(_TOKENS)  # another process may have written the file meanwhile
            self._users += 1
            self._yield_until = self._reopen_after = 0.0
            self._turn_end = self._next_yield = time.monotonic() + MIN_TURN_S
            self._cond.notify_all()
            cursor = root.cursor()
        self._closer_thread = threading.Thread(target=self._closer, args=(root,), name="florql-store", daemon=True)
        self._closer_thread.start()
        return cursor

    def _release(self, cursor: duckdb.DuckDBPyConnection) -> None:
        with contextlib.suppress(duckdb.Error):
            cursor.close()
        with self._cond:
            self._users -= 1
            if self._users == 0:
                self._idle_since = time.monotonic()
                self._cond.notify_all()

    def _closer(self, root: duckdb.DuckDBPyConnection) -> None:
        """While `root` is open: watch for waiting processes, and close it when idle long enough."""
        with self._cond:
            while self._root is root:
                now = time.monotonic()
                others = self._others_waiting()
                if others and self._users and now >= max(self._yield_until, self._next_yield):
                    self._yield_until = now + YIELD_S  # new leases wait; the file closes when these end
                    self._next_yield = now + YIELD_S + YIELD_COOLDOWN_S
                handover = others and now >= self._turn_end
                if not self._users and (handover or self._exclusive or now - self._idle_since >= LINGER_S):
                    self._close_root(handover=handover)
                    return
                self._cond.wait(POLL_S)

    def _close_root(self, handover: bool = False) -> None:
        """Close the file (with `_cond` held and no users)."""
        root, self._root = self._root, None
        self._yield_until = 0.0
        self._catalog_token = next(_TOKENS)
        if handover:
            self._reopen_after = time.monotonic() + GRACE_S
        if root is not None:
            with contextlib.suppress(duckdb.Error):
                root.close()
        self._cond.notify_all()

    def close(self, wait_s: float = DEFAULT_WAIT_S) -> bool:
        """Close the file now if this process has it open; waits up to `wait_s` for leases to end."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._users or self._opening:
                if time.monotonic() >= deadline:
                    return False
                self._cond.wait(POLL_S)
            self._close_root()
            return True

    @contextlib.contextmanager
    def exclusive(self, wait_s: float = DEFAULT_WAIT_S) -> Iterator[None]:
        """No process has the file open while the block runs (for replacing it): this process's
        leases end and wait, and other processes are waited for as a lease would."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            self._exclusive += 1
        try:
            if not self.close(wait_s):
                raise StoreBusy(self._busy_message(wait_s, "threads of this process kept using it"))
            # Other processes let go of it too, and stay away (we stay announced) until the block ends.
            self._announce()
            self._connect(deadline, wait_s, withdraw=False).close()
            yield
        finally:
            self._withdraw()
            with self._cond:
                self._exclusive -= 1
                self._cond.notify_all()

    # ---- other processes ----------------------------------------------------------------------
    def _connect(self, deadline: float, wait_s: float, withdraw: bool = True) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying with backoff while another process holds it (announced as
        waiting until it is open, or for longer when not `withdraw`)."""
        delay = 0.01
        announced = False
        try:
            while True:
                try:
                    conn = open_file(self.db_path)
                except duckdb.Error as exc:
                    if not is_lock_error(exc):
                        raise
                    self._holder = _holder(str(exc))
                    self._announce()
                    announced = True
                    now = time.monotonic()
                    if now >= deadline:
                        raise StoreBusy(self._busy_message(wait_s)) from exc
                    time.sleep(min(delay * (0.5 + random.random()), deadline - now))
                    delay = min(delay * 2, MAX_BACKOFF_S)
                    continue
                _lock_down(conn)
                return conn
        finally:
            if announced and withdraw:
                self._withdraw()

    def _announce(self) -> None:
        """Tell the process holding the file that this one waits (refreshed on every retry)."""
        path = os.path.join(self._waiting_dir, str(os.getpid()))
        with contextlib.suppress(OSError):
            os.makedirs(self._waiting_dir, exist_ok=True)
            with open(path, "a"):
                pass
            os.utime(path)

    def _withdraw(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self._waiting_dir, str(os.getpid())))

    def _others_waiting(self) -> bool:
        try:
            names = os.listdir(self._waiting_dir)
        except OSError:
            return False
        me, now = str(os.getpid()), time.time()
        for name in names:
            if name == me:
                continue
            with contextlib.suppress(OSError):
                age = now - os.stat(os.path.join(self._waiting_dir, name)).st_mtime
                if age < WAITER_STALE_S:
                    return True
                if age > 60:  # left behind by a killed process
                    os.unlink(os.path.join(self._waiting_dir, name))
        return False

    def _busy_message(self, wait_s: float, why: str = "") -> str:
        held = f"in use by another process ({self._holder})" if self._holder else "busy"
        if why and not self._holder:
            held = f"busy ({why})"
        return (
            f"the store {self.db_path} stayed {held} for {wait_s:g} s; try again when that process is done, or stop it"
        )

    # ---- ingest -------------------------------------------------------------------------------
    def sync(self, files: RunFiles, wait_s: float = DEFAULT_WAIT_S) -> None:
        """Ingest every run file that is complete now, one thread of this process at a time.

        A caller waits for a sync that began after it called (running one itself when none is
        running), so concurrent callers share syncs and each sees what was complete when it asked.
        When no folder a run file could appear in changed since the last sync began, there is
        nothing to ingest and the call returns at once.
        """
        asked = time.monotonic()
        deadline = asked + wait_s
        with self.lease(wait_s) as conn:
            identity = self._identity
            with self._ingest:
                while True:
                    if self._synced_at >= asked and self._synced_identity == identity:
                        return  # a sync that began after we asked has finished
                    if not self._ingesting:
                        unchanged = self._unchanged_since
                        if unchanged is not None and self._synced_identity == identity and unchanged.same_now():
                            return  # nothing new since the last sync began
                        self._ingesting = True  # this thread ingests; the others wait for it
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise StoreBusy(self._busy_message(wait_s, "this process is still ingesting new run files"))
                    self._ingest.wait(remaining)
            self._ingest_now(conn, files, identity)

    def _ingest_now(self, conn: duckdb.DuckDBPyConnection, files: RunFiles, identity: tuple[int, int] | None) -> None:
        """One sync by this thread (it set `_ingesting`); the catalog token is withheld while it runs."""
        with self._cond:
            token, self._catalog_token = self._catalog_token, None
        began = time.monotonic()
        folders = RunFolders.taken(files)  # before the sync lists anything: a change after it shows
        touched: set[int] | None = None
        try:
            touched = sync(conn, files)
        except (duckdb.TransactionException, duckdb.ConstraintException) as exc:
            raise StoreConflict(
                f"ingesting new run files collided with another writer ({type(exc).__name__}); try again"
            ) from exc
        finally:
            with self._cond:  # a sync that wrote nothing leaves what was read of the tables valid
                self._catalog_token = token if touched is not None and not touched else next(_TOKENS)
            with self._ingest:
                self._ingesting = False
                self._unchanged_since = folders.trusted(conn) if folders and touched is not None else None
                if touched is not None:
                    self._synced_at = max(self._synced_at, began)
                    self._synced_identity = identity
                self._ingest.notify_all()

    @property
    def catalog_token(self) -> int | None:
        """Equal between two calls only if the tables' contents did not change in between, as far
        as this process can tell (None while an ingest runs: nothing read now may be kept)."""
        with self._cond:
            return self._catalog_token


class RunFolders:
    """The modification times of the folders of a local store where a new run file can appear.

    `taken` before a sync lists the run files; `trusted` after it keeps the folders that matter
    (the runs folder; per run, once sealed, only its replay jobs that have not landed) and refuses
    (None) while a run may still write or a time is too recent to tell a later change from it.
    """

    RACY_S = 2.0  # a folder changed this recently might change again within the same timestamp tick

    def __init__(self, times: dict[str, int | None], taken_ns: int) -> None:
        self.times = times
        self.taken_ns = taken_ns

    @classmethod
    def taken(cls, files: RunFiles) -> RunFolders | None:
        root = files.local_path("runs")
        if root is None:
            return None  # an object store has no cheap folder times: every sync lists
        taken_ns = time.time_ns()
        times = {root: _mtime_ns(root)}
        for run in _subfolders(root):
            if run.isdigit():
                run_dir = os.path.join(root, run)
                replays = os.path.join(run_dir, "replays")
                times[run_dir], times[replays] = _mtime_ns(run_dir), _mtime_ns(replays)
                for job in _subfolders(replays):
                    times[os.path.join(replays, job)] = _mtime_ns(os.path.join(replays, job))
        return cls(times, taken_ns)

    def trusted(self, conn: duckdb.DuckDBPyConnection) -> RunFolders | None:
        """The folders to watch, after a sync that read the run files as they were when taken."""
        sealed = {r for (r,) in conn.execute("SELECT run_id FROM _runs WHERE sealed").fetchall()}
        landed = {(str(r), j) for r, j in conn.execute("SELECT run_id, job_id FROM replay_jobs").fetchall()}
        [root, *rest] = self.times  # insertion order: the runs folder first
        watched = {root: self.times[root]}
        for path in rest:
            parts = os.path.relpath(path, root).split(os.sep)
            if len(parts) == 1 and int(parts[0]) not in sealed:
                return None  # a running run writes segments and manifests anywhere in its folder
            if len(parts) == 1 and self.times[os.path.join(path, "replays")] is None:
                watched[path] = self.times[path]  # its replays folder would appear here
            elif parts[1:] == ["replays"] and self.times[path] is not None:
                watched[path] = self.times[path]
            elif len(parts) == 3 and (parts[0], parts[2]) not in landed:
                watched[path] = self.times[path]  # its commit (or divergence) is still to come
        racy = self.taken_ns - int(self.RACY_S * 1e9)
        if any(t is not None and t >= racy for t in watched.values()):
            return None
        return RunFolders(watched, self.taken_ns)

    def same_now(self) -> bool:
        return all(_mtime_ns(path) == then for path, then in self.times.items())


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _subfolders(path: str) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_dir()]
    except OSError:
        return []


_TOKENS = itertools.count()


_CONFIGURING = threading.Lock()


def _lock_down(conn: duckdb.DuckDBPyConnection) -> None:
    """Queries run without file or network access, and cannot change that (the instance is shared)."""
    # Check and SETs go together: a thread finding the instance unlocked must not try to set it after
    # another thread locked it in between ("the configuration has been locked").
    with _CONFIGURING:
        if not conn.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
            conn.execute("SET enable_external_access = false")
            conn.execute("SET lock_configuration = true")


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _holder(message: str) -> str:
    """'PID 123: florql serve …' from DuckDB's lock error ('… is held in /usr/bin/python3 (PID 123)')."""
    match = re.search(r"\(PID (\d+)\)", message)
    if not match:
        return ""
    pid = match.group(1)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return f"PID {pid}"
    if argv and os.path.basename(argv[0]).startswith("python") and len(argv) > 1:
        argv = argv[1:]  # `python -m florql.cli serve` reads better without the interpreter's path
    command = " ".join(" ".join(argv).split())  # one line, even for `python -c "…"`
    return f"PID {pid}: {command[:200]}" if command else f"PID {pid}"


_databases: dict[str, SharedDatabase] = {}
_databases_lock = threading.Lock()


def shared_database(db_path: str) -> SharedDatabase:
    """This process's handle on the DuckDB file at `db_path` (one per file)."""
    key = os.path.abspath(db_path)
    with _databases_lock:
        database = _databases.get(key)
        if database is None:
            database = _databases[key] = SharedDatabase(key)
        return database


@atexit.register
def _close_at_exit() -> None:
    """At exit, close the files (checkpointing DuckDB's log into the file) and let their closer
    threads end. A daemon thread still inside DuckDB when the interpreter finalizes is ended by
    pthread_exit from within C++ frames, which can abort the process ("exception not rethrown")
    after its work is done: so a lease still in use gets a moment to end first."""
    for database in list(_databases.values()):
        closer = database._closer_thread
        if database.close(wait_s=EXIT_WAIT_S) and closer is not None and closer is not threading.current_thread():
            closer.join(timeout=EXIT_WAIT_S)  # it sees the file closed at its next poll


def _forget_all() -> None:
    """A forked child shares no connection with its parent: it starts afresh."""
    global _databases_lock
    _databases.clear()
    _databases_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_all)
