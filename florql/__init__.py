"""florql: hindsight logging for PyTorch training.

Training side::

    lr = florql.arg("lr", 0.01)
    with florql.checkpointing(model=net, optimizer=opt):
        for epoch in florql.loop("epoch", range(10)):
            for x, y in florql.loop("step", loader):
                ...
                florql.log("loss", loss)

Query side::

    db = florql.connect()
    db.sql("SELECT epoch, avg(grad_norm) FROM run_1 GROUP BY epoch").df()
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from florql import args as _args  # noqa: F401  (strips --florql-args before the script's own parser runs)
from florql import reads as _reads  # noqa: F401  (installs the audit hook for config files)
from florql.errors import FlorqlError, UsageError

if TYPE_CHECKING:  # importing florql stays light: torch loads with the first training call
    from florql.session import TrainingSession

__version__ = "0.1.0"
__all__ = ["FlorqlError", "UsageError", "arg", "checkpointing", "connect", "log", "loop", "run_id"]

_session: TrainingSession | None = None
_session_lock = threading.Lock()
REPLAY_ENV = "FLORQL_REPLAY_JOB"


def _start() -> TrainingSession:
    global _session
    with _session_lock:
        if _session is None:
            if os.environ.get(REPLAY_ENV):
                from florql.replaying import ReplaySession

                _session = ReplaySession.from_env()
            else:
                from florql.recording import RecordSession

                _session = RecordSession()
                _install_exit_hooks(_session)
        return _session


def _install_exit_hooks(session: TrainingSession) -> None:
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # record why the run failed, then behave as before
        session.fail(exc_type, exc, tb)
        previous(exc_type, exc, tb)

    sys.excepthook = hook
    atexit.register(session.finish)


def log(name: str, value: Any) -> None:
    """Record `value` under `name` at the current loop coordinates (cheap: appends to memory)."""
    s = _session
    if s is None:
        s = _start()
    s.log(name, value)


def loop(name: str, iterable: Iterable[Any]) -> Iterator[Any]:
    """Iterate `iterable` as the loop `name`; records inside carry its iteration index."""
    return (_session or _start()).loop(name, iterable, sys._getframe(1))


def arg(name: str, default: Any) -> Any:
    """A recorded hyperparameter, overridable with `--florql-args name=value` on the command line."""
    return (_session or _start()).arg(name, default)


@contextlib.contextmanager
def checkpointing(budget: float | None = None, **objects: Any) -> Iterator[None]:
    """Register objects with state_dict()/load_state_dict() for adaptive checkpoints.

    `budget` is the overhead bound ε: checkpoints never stall training more than this fraction
    of its time (default 0.02).
    """
    session = _session or _start()
    session.register(objects, budget)
    try:
        yield
    finally:
        session.unregister()


def run_id() -> int | None:
    """The id of the run this process records (None before any florql call)."""
    return getattr(_session, "run_id", None)


def connect(path: str | os.PathLike | None = None, **options: Any):
    """A query connection to the store at `path` (default: $FLORQL_HOME or ./.florql)."""
    from florql.api import connect as _connect

    return _connect(path, **options)
