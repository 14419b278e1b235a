"""`florql ui`: charts of runs and of query answers in a local web page.

florql ui [--host 127.0.0.1] [--port 8765] [--store PATH] [--password-file F] [--tls-cert C --tls-key K]
"""

from __future__ import annotations

import argparse
import logging
import warnings

__all__ = ["add_ui_arguments", "run_ui"]  # the server is florql.ui.server, the chart model florql.ui.charts


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    from florql.cli import add_listening_arguments

    add_listening_arguments(parser, 8765)
    parser.add_argument(
        "--replay-budget", type=float, default=60.0, help="seconds of replay a query may trigger (default 60)"
    )


def run_ui(args: argparse.Namespace) -> int:
    from florql.api import ReplayWarning
    from florql.listening import read_password_file, tls_context
    from florql.ui.data import StoreView
    from florql.ui.server import UIConfigError, UIServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Pages show what is stored; a replayed name stored for part of a run is not worth a warning per view.
    warnings.filterwarnings("ignore", category=ReplayWarning)
    context = tls_context(args.tls_cert, args.tls_key)
    password = read_password_file(args.password_file) if args.password_file else None
    view = StoreView(getattr(args, "store", None), replay_budget=args.replay_budget)
    try:
        server = UIServer(view, args.host, args.port, password=password, ssl_context=context)
    except OSError as e:
        raise UIConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from e
    print(f"florql ui: {server.url}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        view.close()
    return 0
