"""What `florql serve` and `florql ui` share about listening on a network: which addresses are
loopback (no password needed there), the password file, and TLS."""

from __future__ import annotations

import ipaddress
import socket
import ssl

from florql.errors import UsageError


def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback one."""
    try:
        infos = socket.getaddrinfo(host or None, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def read_password_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read the password file {path}: {e.strerror}") from e
    if not password:
        raise UsageError(f"the password file {path} is empty")
    return password


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context from a PEM certificate and key, None without them."""
    if (cert is None) != (key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the TLS certificate {cert} and key {key}: {e}") from e
    return context
