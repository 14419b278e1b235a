"""`florql ui`: a local web interface on a store, served by the standard library's HTTP server.

Pages are static HTML + JS shipped with the package (uPlot vendored, no CDN: machines may be
offline); they read JSON from /api/…, which answers through `florql.ui.data.StoreView`.
Access: loopback without a password (and only under a loopback Host name, so that a web page
elsewhere cannot reach it by DNS rebinding); any other address needs a password (HTTP Basic),
best over TLS.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import parse_qs, urlsplit

from florql.errors import FlorqlError, UsageError
from florql.listening import is_loopback
from florql.ui.data import StoreView, UnknownRun, error_json

log = logging.getLogger("florql.ui")

STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
MAX_BODY = 1 << 20  # a query is text: a megabyte is plenty
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class UIConfigError(FlorqlError):
    sqlstate = "28000"


def loopback_host_header(value: str | None) -> bool:
    """Whether a request's Host header names this machine's loopback interface."""
    if not value:
        return False
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 or value.startswith("[") else value
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class UIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        view: StoreView,
        host: str = "127.0.0.1",
        port: int = 8765,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if password is None and not is_loopback(host):
            raise UIConfigError(
                f"refusing to serve {host!r} without a password: anyone who can reach it could read the store "
                "and start replays. Pass --password-file FILE, or listen on 127.0.0.1 only."
            )
        self.view = view
        self.password = password
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        scheme = "https" if isinstance(self.socket, ssl.SSLSocket) else "http"
        shown = f"[{host}]" if ":" in str(host) else host
        return f"{scheme}://{shown}:{port}"


class Handler(BaseHTTPRequestHandler):
    server: UIServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ---- dispatch -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, method: str) -> None:
        if not self._allowed():
            return
        url = urlsplit(self.path)
        try:
            self._route(method, url.path, parse_qs(url.query))
        except UnknownRun as err:
            self._error(HTTPStatus.NOT_FOUND, err, url.path)
        except FlorqlError as err:
            self._error(HTTPStatus.BAD_REQUEST, err, url.path)
        except Exception as err:  # our bug: say so readably, keep serving
            log.exception("internal error on %s", url.path)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(err).__name__}: {err}"})

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        view = self.server.view
        if method == "GET" and path == "/":
            self._page("runs", "florql runs")
        elif method == "GET" and (m := re.fullmatch(r"/runs/(\d+)", path)):
            view.run_table(int(m[1]))  # an unknown run is a 404 page naming it
            self._page("run", f"florql run {m[1]}", run=m[1])
        elif method == "GET" and path.startswith("/static/"):
            self._static(path.removeprefix("/static/"))
        elif method == "GET" and path == "/api/runs":
            self._json(HTTPStatus.OK, {"runs": view.runs()})
        elif method == "GET" and (m := re.fullmatch(r"/api/runs/(\d+)", path)):
            self._json(HTTPStatus.OK, view.run(int(m[1])))
        elif method == "GET" and path == "/api/compare":
            runs = [int(r) for r in ",".join(query.get("runs", [])).split(",") if r.strip().isdigit()]
            self._json(HTTPStatus.OK, {"chart": view.compare(runs, query.get("name", [""])[0])})
        elif method == "GET" and (m := re.fullmatch(r"/api/tasks/(\d+)", path)):
            self._json(HTTPStatus.OK, view.task(int(m[1])).to_json())
        elif method == "POST" and path == "/api/explain":
            self._json(HTTPStatus.OK, view.explain(self._sql()))
        elif method == "POST" and path == "/api/query":
            self._json(HTTPStatus.ACCEPTED, view.start_query(self._sql()).to_json())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"nothing at {method} {path}; the runs page is at /"})

    # ---- access -------------------------------------------------------------------------------
    def _allowed(self) -> bool:
        password = self.server.password
        if password is None:
            if loopback_host_header(self.headers.get("Host")):
                return True
            self._json(HTTPStatus.FORBIDDEN, {"error": "this server answers only at a loopback address (127.0.0.1)"})
            return False
        scheme, _, encoded = (self.headers.get("Authorization") or "").partition(" ")
        try:
            _, _, given = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            given = ""
        if scheme.lower() == "basic" and hmac.compare_digest(given.encode(), password.encode()):
            return True
        body = json.dumps({"error": "a password is required (any user name)"}).encode()
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Basic realm="florql", charset="UTF-8"')
        self._send_body(body, "application/json")
        return False

    # ---- responses ----------------------------------------------------------------------------
    def _sql(self) -> str:
        if "json" not in (self.headers.get("Content-Type") or ""):  # a cross-site form cannot send JSON
            raise UsageError('send the query as JSON: {"sql": "SELECT …"}')
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise UsageError(f"the request is {length} bytes; a query may be at most {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"the request is not JSON: {e}") from None
        sql = body.get("sql") if isinstance(body, dict) else None
        if not isinstance(sql, str) or not sql.strip():
            raise UsageError("type a query first, e.g. SELECT * FROM runs")
        return sql

    def _error(self, status: HTTPStatus, err: FlorqlError, path: str) -> None:
        if path.startswith("/api/"):
            self._json(status, error_json(err))
        else:
            self._page("error", "florql: not found", status=status, message=str(err))

    def _json(self, status: HTTPStatus, payload: Any) -> None:
        self.send_response(status)
        self._send_body(json.dumps(payload, allow_nan=False).encode(), "application/json")

    def _page(
        self, page: str, title: str, run: str = "", status: HTTPStatus = HTTPStatus.OK, message: str = ""
    ) -> None:
        shell = Template((resources.files("florql.ui") / "templates" / "page.html").read_text(encoding="utf-8"))
        html = shell.substitute(title=escape(title), page=page, run=escape(run), message=escape(message))
        self.send_response(status)
        self._send_body(html.encode(), "text/html; charset=utf-8")

    def _static(self, name: str) -> None:
        if not re.fullmatch(r"[\w-]+(/[\w.-]+)?\.\w+", name) or ".." in name:
            raise UsageError(f"no static file {name!r}")
        resource = resources.files("florql.ui") / "static" / name
        suffix = "." + name.rsplit(".", 1)[-1]
        if not resource.is_file() or suffix not in STATIC_TYPES:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no static file {name!r}"})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Cache-Control", "max-age=300")
        self._send_body(resource.read_bytes(), STATIC_TYPES[suffix] + "; charset=utf-8")

    def _send_body(self, body: bytes, content_type: str) -> None:
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header(
            "Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'"
        )
        self.end_headers()
        self.wfile.write(body)


class BackgroundUI:
    """The UI served from a thread (tests, notebooks): `url`, then `close()`."""

    def __init__(self, store: str | None, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        budget = options.pop("replay_budget", 60.0)
        self.view = StoreView(store, replay_budget=budget)
        self.server = UIServer(self.view, host, port, **options)
        self._thread = threading.Thread(target=self.server.serve_forever, name="florql-ui", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
        self.view.close()

    def __enter__(self) -> BackgroundUI:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
