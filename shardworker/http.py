"""The coordinator's HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

A tiny ASGI app served by uvicorn on its own thread (``shardworker.webserver``), with a
cap on connections, idle clients closed and a total deadline per request, so a flood of
idle sockets or a slowloris client cannot starve the liveness probe or spin the
coordinator.  The probes only read what other threads prepared (the observer's cached
verdicts) and answer on the event loop itself; ``/metrics`` renders the multiprocess files
in one background thread, at most a few renders queued.  ``stop()`` closes the socket
and joins the thread within a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson

from shardworker.errors import ConfigError
from shardworker.logs import get_logger
from shardworker.webserver import Limits, ServerThread, fd_budget, listen

log = get_logger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_MAX_QUEUED_RENDERS = 4
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


class _App:
    """The ASGI app: three GET routes; ``/metrics`` renders in a small thread pool."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")
        self.renders = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _send(send, HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", "text/plain")
            return
        try:
            code, body, ctype = await self._answer(path)
        except Exception as exc:
            log.error("http_handler_failed", path=path, error_type=type(exc).__name__)
            code, body, ctype = HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", "text/plain"
        await _send(send, code, b"" if scope["method"] == "HEAD" else body, ctype)

    async def _answer(self, path: str) -> tuple[HTTPStatus, bytes, str]:
        if path in ("/healthz", "/readyz"):
            # Cached verdicts, read on the loop: never behind a render or a slow client.
            verdict = self.routes.liveness() if path == "/healthz" else self.routes.readiness()
            code = HTTPStatus.OK if verdict.ok else HTTPStatus.SERVICE_UNAVAILABLE
            return code, verdict.body(), "application/json"
        if path != "/metrics":
            return HTTPStatus.NOT_FOUND, b"not found\n", "text/plain"
        if self.renders >= _MAX_QUEUED_RENDERS:
            return HTTPStatus.SERVICE_UNAVAILABLE, b"busy: scrape again\n", "text/plain"
        self.renders += 1
        try:
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self.renderer, self.routes.metrics)
        finally:
            self.renders -= 1
        return HTTPStatus.OK, body, METRICS_CONTENT_TYPE


async def _send(send: Send, code: HTTPStatus, body: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": int(code), "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HttpEndpoint:
    def __init__(self, addr: str, routes: Routes, limits: Limits | None = None) -> None:
        self.host, self.requested_port = parse_addr(addr)
        self.routes = routes
        self.limits = limits or Limits(
            request_timeout_s=10.0, idle_timeout_s=10.0, keepalive_s=5.0,
            max_connections=min(512, fd_budget(0.25)),
        )  # fmt: skip
        self._app = _App(routes)
        self._server: ServerThread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    def start(self) -> None:
        sock = listen(self.host, self.requested_port, "SHARDWORKER_METRICS_ADDR")
        server = ServerThread(self._app, sock, self.limits, "http")
        try:
            server.start()
        except Exception:
            server.stop(1.0)
            raise
        self._server = server
        log.info("http_listening", host=self.host, port=self.port,
                 paths=["/metrics", "/healthz", "/readyz"],
                 max_connections=self.limits.max_connections)  # fmt: skip

    def stop(self, timeout_s: float = 5.0) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(timeout_s)
        self._app.renderer.shutdown(wait=False, cancel_futures=True)
