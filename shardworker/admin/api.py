"""The token-protected HTTP admin API (``SHARDWORKER_ADMIN_ADDR``), stdlib only.

The same operations and JSON bodies as ``shardworker providers ...``:

    GET    /v1/providers[?tenant=]          list
    POST   /v1/providers                    add (201)
    GET    /v1/providers/{id}               show
    PATCH  /v1/providers/{id}               update
    DELETE /v1/providers/{id}               remove
    POST   /v1/providers/{id}/{operation}   test | pause | resume | resync | reconnect
    GET    /v1/commands/{id}                status of a reconnect or resync

Every request needs ``Authorization: Bearer <SHARDWORKER_ADMIN_TOKEN>``, checked before the
body is read; a missing or wrong token gets a bare 401.  Bodies are limited to
``MAX_BODY_BYTES``.  The server runs in its own thread; :meth:`AdminApi.close` stops it
(bounded join) and closes its database pool and Redis client.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from shardworker.admin.service import AdminService
from shardworker.config import Settings
from shardworker.db.store import open_pool
from shardworker.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ShardworkerError,
    ValidationError,
)
from shardworker.logs import get_logger

log = get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 30.0
_UUID = r"[0-9a-fA-F-]{36}"
_OPERATIONS = ("test", "pause", "resume", "resync", "reconnect")

Handler = Callable[[AdminService, dict[str, str], Any, str | None], tuple[int, Any]]


def _list(svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None) -> tuple[int, Any]:
    return 200, svc.list(tenant)


def _add(svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None) -> tuple[int, Any]:
    return 201, svc.add(body)


def _show(svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None) -> tuple[int, Any]:
    return 200, svc.show(ids["id"], tenant)


def _update(
    svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None
) -> tuple[int, Any]:
    return 200, svc.update(ids["id"], body, tenant)


def _remove(
    svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None
) -> tuple[int, Any]:
    return 200, svc.remove(ids["id"], tenant)


def _operate(
    svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None
) -> tuple[int, Any]:
    op = ids["op"]
    if op == "test":
        if body:
            raise ValidationError("body", "test takes no body")
        return 200, svc.test(ids["id"], tenant)
    method = getattr(svc, op)
    result = method(ids["id"], body, tenant)
    # A command just queued is accepted, not done.
    accepted = op in ("resync", "reconnect") and result.get("state") == "queued"
    return (202 if accepted else 200), result


def _command(
    svc: AdminService, ids: dict[str, str], body: Any, tenant: str | None
) -> tuple[int, Any]:
    return 200, svc.command(ids["cid"])


_ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    ("GET", re.compile(r"/v1/providers"), _list),
    ("POST", re.compile(r"/v1/providers"), _add),
    ("GET", re.compile(rf"/v1/providers/(?P<id>{_UUID})"), _show),
    ("PATCH", re.compile(rf"/v1/providers/(?P<id>{_UUID})"), _update),
    ("DELETE", re.compile(rf"/v1/providers/(?P<id>{_UUID})"), _remove),
    ("POST", re.compile(rf"/v1/providers/(?P<id>{_UUID})/(?P<op>{'|'.join(_OPERATIONS)})"),
     _operate),
    ("GET", re.compile(r"/v1/commands/(?P<cid>[0-9a-f]{32})"), _command),
]  # fmt: skip

_STATUS: list[tuple[type[Exception], int]] = [
    (ValidationError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
]


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")  # not a route: a JSON 405 (after auth) instead of an HTML 501

    def _handle(self, method: str) -> None:
        if not self._authorised():
            # No detail: whether the token was missing, malformed or wrong stays unsaid.
            self._reply(401, {"error": "unauthorized"}, close=True)
            return
        url = urlsplit(self.path)
        route = self._route(method, url.path)
        if route is None:
            return
        body, ok = self._body()
        if not ok:
            return
        tenant = parse_qs(url.query).get("tenant", [None])[0]
        handler, ids = route
        status, payload = self._run(handler, ids, body, tenant)
        self._reply(status, payload)

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        expected = self.server.token.encode()
        given = token.strip().encode("utf-8", "replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, expected)

    def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        path = path.rstrip("/") or "/"
        allowed = False
        for verb, pattern, handler in _ROUTES:
            match = pattern.fullmatch(path)
            if match is not None:
                if verb == method:
                    return handler, match.groupdict()
                allowed = True
        if allowed:
            self._reply(405, {"error": "method not allowed"}, close=True)
        else:
            self._reply(404, {"error": "not found"}, close=True)
        return None

    def _body(self) -> tuple[Any, bool]:
        if self.headers.get("Transfer-Encoding"):
            self._reply(411, {"error": "a Content-Length is required"}, close=True)
            return None, False
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._reply(400, {"error": "invalid Content-Length"}, close=True)
            return None, False
        if length > MAX_BODY_BYTES:
            # Not read: the connection is closed instead of draining a huge body.
            self._reply(413, {"error": f"body larger than {MAX_BODY_BYTES} bytes"}, close=True)
            return None, False
        raw = self.rfile.read(length) if length else b""
        if not raw.strip():
            return None, True
        try:
            return orjson.loads(raw), True
        except orjson.JSONDecodeError:
            self._reply(400, {"error": "invalid", "field": "body", "message": "not JSON"})
            return None, False

    def _run(
        self, handler: Handler, ids: dict[str, str], body: Any, tenant: str | None
    ) -> tuple[int, Any]:
        try:
            return handler(self.server.service, ids, body, tenant)
        except ShardworkerError as exc:
            for kind, status in _STATUS:
                if isinstance(exc, kind):
                    field = getattr(exc, "field", None)
                    return status, {"error": HTTPStatus(status).phrase.lower(), "field": field,
                                    "message": str(exc)}  # fmt: skip
            # Messages of our own errors never carry secrets (errors.py); say what failed.
            log.warning("admin_request_failed", error_type=type(exc).__name__, error=str(exc))
            return 500, {"error": type(exc).__name__, "message": str(exc)}
        except Exception:
            log.error("admin_request_crashed", exc=True, path=urlsplit(self.path).path)
            return 500, {"error": "internal error"}

    def _reply(self, status: int, payload: Any, *, close: bool = False) -> None:
        data = orjson.dumps(payload)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: no query string, no headers (the token is in one).
        log.info("admin_request", method=self.command, path=urlsplit(self.path).path,
                 status=int(code) if str(code).isdigit() else code)  # fmt: skip

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("admin_http_error", detail=(format % args)[:200])


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: AdminService, token: str) -> None:
        super().__init__(address, _RequestHandler)
        self.service = service
        self.token = token


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"SHARDWORKER_ADMIN_ADDR: expected host:port, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class AdminApi:
    def __init__(
        self,
        settings: Settings,
        service: AdminService,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        if not settings.admin_token:
            raise ConfigError(
                "SHARDWORKER_ADMIN_TOKEN: required when SHARDWORKER_ADMIN_ADDR is set"
            )
        self._server = _Server(parse_addr(settings.admin_addr), service, settings.admin_token)
        self._thread: threading.Thread | None = None
        self._host = parse_addr(settings.admin_addr)[0]
        self._on_close = list(on_close)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="admin-api",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        log.info("admin_api_listening", host=self._host, port=self.port)

    def close(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout_s)
        self._server.server_close()
        for close in self._on_close:
            close()


def start_admin_api(settings: Settings) -> AdminApi | None:
    """The API on ``SHARDWORKER_ADMIN_ADDR`` with its own clients; None when not configured."""
    if not settings.admin_addr:
        return None
    from shardworker.redisconn import redis_client

    pool = open_pool(settings.database_url, max_size=2)
    client = redis_client(settings)
    try:
        api = AdminApi(settings, AdminService(settings, pool, client), [pool.close, client.close])
    except Exception:
        pool.close()
        client.close()
        raise
    api.start()
    return api
