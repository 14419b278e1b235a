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

from .access import Limits, Role, UsersFileError, add_user
from .backend import Backend, DuckDBBackend
from .served import ServedStore
from .server import BackgroundServer, Server, ServerConfigError, read_password_file, tls_context

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
    if (tls_cert is None) != (tls_key is None):
        raise ServerConfigError("--tls-cert and --tls-key go together")
    if max_connections < 1:
        raise ServerConfigError(f"--max-connections {max_connections}: give 1 or more")
    if max_workers is not None and max_workers < 1:
        raise ServerConfigError(f"--max-workers {max_workers}: give 1 or more replay slots")
    if users_file is not None and not os.path.exists(users_file):
        raise ServerConfigError(f"users file {users_file} does not exist; create it with: florql serve --add-user NAME")
    password = read_password_file(password_file) if password_file else None
    context = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: `florql --store X serve` must keep the global option's value.
    parser.add_argument("--store", default=argparse.SUPPRESS, help="store directory (default .florql/ or $FLORQL_HOME)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5433, help="port to listen on (default 5433)")
    parser.add_argument("--password-file", help="file holding the password (required unless listening on loopback)")
    parser.add_argument("--tls-cert", help="PEM certificate for TLS (sslmode=require)")
    parser.add_argument("--tls-key", help="PEM private key for TLS")
    parser.add_argument(
        "--replay-budget",
        type=_duration,
        default=60.0,
        help="ceiling on the replay a query may trigger, e.g. 60, '10 min', 'unlimited' (default 60 s); SET may only lower it",
    )
    parser.add_argument(
        "--session-budget",
        type=_duration,
        default=None,
        help="every session's starting budget (default: --replay-budget); analysts may lower it, admins raise it up to --replay-budget",
    )
    parser.add_argument(
        "--max-workers", type=int, help="replay slots shared by all sessions; no session may SET workers above it"
    )
    parser.add_argument(
        "--no-replay", action="store_true", help="serve stored values only; a NOTICE names what a replay would compute"
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="clients connected at once (default 64); one more is refused with SQLSTATE 53300",
    )
    parser.add_argument(
        "--statement-timeout",
        type=_duration,
        default=None,
        help="ceiling on one statement's time, replay included, e.g. '10 min' (default none); "
        "a client's SET statement_timeout may only lower it",
    )
    parser.add_argument("--users-file", help="users, roles and SCRAM verifiers (write one with --add-user)")
    parser.add_argument("--add-user", metavar="NAME", help="add or replace NAME in --users-file, then exit")
    parser.add_argument(
        "--role", choices=[r.value for r in Role], default=Role.ANALYST.value, help="the role --add-user gives"
    )


def _duration(text: str) -> float | None:
    from florql.api import parse_duration
    from florql.errors import UsageError

    try:
        return parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
