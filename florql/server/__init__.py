"""A PostgreSQL-wire server over a florql store, for BI tools and psql.

florql serve --host 127.0.0.1 --port 5433 [--password-file F] [--tls-cert C --tls-key K]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from florql.cli import add_serve_arguments

from .backend import Backend, DuckDBBackend
from .server import BackgroundServer, Server, ServerConfigError, read_password_file, tls_context

__all__ = [
    "Backend",
    "BackgroundServer",
    "DuckDBBackend",
    "Server",
    "ServerConfigError",
    "add_serve_arguments",
    "florql_backend_factory",
    "main_args",
    "run_serve",
    "serve",
]


def florql_backend_factory(store_path: str | None, replay_budget: float | None) -> Callable[[], Backend]:
    """One florql connection per client session, so that `SET replay` stays per session."""
    import florql

    return lambda: florql.connect(store_path, replay_budget=replay_budget)


def build_server(
    store_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5433,
    password_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    replay_budget: float | None = 60.0,
) -> Server:
    if (tls_cert is None) != (tls_key is None):
        raise ServerConfigError("--tls-cert and --tls-key go together")
    password = read_password_file(password_file) if password_file else None
    context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
    return Server(
        florql_backend_factory(store_path, replay_budget), host=host, port=port, password=password, ssl_context=context
    )


def serve(**options: Any) -> None:
    """Serve the store until interrupted; `options` are `build_server`'s."""
    server = build_server(**options)
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        serve(
            store_path=getattr(args, "store", None),
            host=args.host,
            port=args.port,
            password_file=args.password_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            replay_budget=args.replay_budget,
        )
    except (ServerConfigError, OSError) as e:
        logging.getLogger("florql.server").error("%s", e)
        return 2
    return 0


def main_args(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florql serve", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
