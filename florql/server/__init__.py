"""A PostgreSQL-wire server over a florql store, for BI tools and psql.

florql serve --host 127.0.0.1 --port 5433 [--users-file F | --password-file F] [--tls-cert C --tls-key K]
             [--replay-budget S] [--session-budget S] [--max-workers N] [--no-replay]
             [--max-connections N] [--statement-timeout S]
florql serve --users-file F --add-user NAME [--role reader|analyst|admin]
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from florql.cli import add_serve_arguments
from florql.listening import read_password_file, tls_context

from .access import Limits, Role, UsersFileError, add_user
from .backend import Backend, DuckDBBackend
from .served import ServedStore
from .server import BackgroundServer, Server, ServerConfigError

__all__ = [
    "Backend",
    "BackgroundServer",
    "DuckDBBackend",
    "Server",
    "ServerConfigError",
    "add_serve_arguments",
    "main_args",
    "run_serve",
    "serve",
]


def build_server(
    store_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5433,
    password_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    replay_budget: float | None = 60.0,
    users_file: str | None = None,
    session_budget: float | None = None,
    max_workers: int | None = None,
    no_replay: bool = False,
    max_connections: int = 64,
    statement_timeout: float | None = None,
) -> Server:
    if max_connections < 1:
        raise ServerConfigError(f"--max-connections {max_connections}: give 1 or more")
    if max_workers is not None and max_workers < 1:
        raise ServerConfigError(f"--max-workers {max_workers}: give 1 or more replay slots")
    if users_file is not None and not os.path.exists(users_file):
        raise ServerConfigError(f"users file {users_file} does not exist; create it with: florql serve --add-user NAME")
    password = read_password_file(password_file) if password_file else None
    context = tls_context(tls_cert, tls_key)
    served = ServedStore(store_path, Limits(replay_budget, session_budget, max_workers, no_replay))
    return Server(
        served.catalog_backend,
        host=host,
        port=port,
        password=password,
        ssl_context=context,
        served=served,
        users_file=users_file,
        max_connections=max_connections,
        statement_timeout=statement_timeout,
    )


def serve(**options: Any) -> None:
    """Serve the store until interrupted; `options` are `build_server`'s."""
    server = build_server(**options)
    try:
        asyncio.run(server.serve_forever())
    except KeyboardInterrupt:
        pass
    finally:
        if server.served is not None:
            server.served.queue.close()


def read_new_password(name: str) -> str:
    """Without echo from a terminal (asked twice), else the first line of standard input."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass(f"password for {name}: ")
    if getpass.getpass("again: ") != password:
        raise UsersFileError("the passwords differ")
    return password


def run_add_user(args: argparse.Namespace) -> int:
    log = logging.getLogger("florql.server")
    if not args.users_file:
        log.error("--add-user needs --users-file FILE (the file to write)")
        return 2
    try:
        add_user(args.users_file, args.add_user, Role(args.role), read_new_password(args.add_user))
    except (UsersFileError, OSError) as e:
        log.error("%s", e)
        return 2
    print(f"{args.add_user} ({args.role}) written to {args.users_file}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.add_user:
        return run_add_user(args)
    try:
        serve(
            store_path=getattr(args, "store", None),
            host=args.host,
            port=args.port,
            password_file=args.password_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            replay_budget=args.replay_budget,
            users_file=args.users_file,
            session_budget=args.session_budget,
            max_workers=args.max_workers,
            no_replay=args.no_replay,
            max_connections=args.max_connections,
            statement_timeout=args.statement_timeout,
        )
    except (ServerConfigError, OSError) as e:
        logging.getLogger("florql.server").error("%s", e)
        return 2
    return 0


def main_args(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florql serve", description=__doc__.splitlines()[0])
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
