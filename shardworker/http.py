"""The coordinator's HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

A stdlib ``ThreadingHTTPServer`` on its own thread.  Handlers only read what other
threads prepared (the observer's cached probes, the multiprocess files), so a slow
database can never make a liveness probe hang.  ``stop()`` shuts the loop down, closes
the socket and joins the thread within a bound.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from shardworker.errors import ConfigError
from shardworker.logs import get_logger

log = get_logger(__name__)

_POLL_S = 0.5
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: healthy or not, and why not (short, secret-free phrases)."""

    ok: bool
    problems: Sequence[str] = ()

    def body(self) -> bytes:
        status = "ok" if self.ok else "unavailable"
        return orjson.dumps({"status": status, "problems": list(self.problems)}) + b"\n"


@dataclass(frozen=True)
class Routes:
    metrics: Callable[[], bytes]
    liveness: Callable[[], Verdict]
    readiness: Callable[[], Verdict]


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); raises ConfigError."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(f"SHARDWORKER_METRICS_ADDR: expected host:port, got {addr!r}")
    return host or "0.0.0.0", number


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: Routes


class _V6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        routes = self.server.routes
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(HTTPStatus.OK, routes.metrics(), METRICS_CONTENT_TYPE)
            elif path in ("/healthz", "/readyz"):
                verdict = routes.liveness() if path == "/healthz" else routes.readiness()
                code = HTTPStatus.OK if verdict.ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(code, verdict.body(), "application/json")
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain")
        except Exception as exc:
            log.error("http_handler_failed", path=path, error_type=type(exc).__name__)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain")

    def _send(self, code: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # Prometheus scrapes every few seconds: access lines would drown the useful ones.
        pass


class HttpEndpoint:
    def __init__(self, addr: str, routes: Routes) -> None:
        self.host, self.requested_port = parse_addr(addr)
        self.routes = routes
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        cls = _V6Server if ":" in self.host else _Server
        try:
            server = cls((self.host, self.requested_port), _Handler)
        except OSError as exc:
            raise ConfigError(
                f"SHARDWORKER_METRICS_ADDR: cannot listen on {self.host}:{self.requested_port}"
                f" ({exc.strerror})"
            ) from None
        server.routes = self.routes
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(_POLL_S,), name="http", daemon=True
        )
        self._thread.start()
        log.info("http_listening", host=self.host, port=self.port,
                 paths=["/metrics", "/healthz", "/readyz"])  # fmt: skip

    def stop(self, timeout_s: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout_s)
