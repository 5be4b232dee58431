"""The token-protected HTTP admin API (``SHARDWORKER_ADMIN_ADDR``), on FastAPI and uvicorn.

The same operations and JSON bodies as ``shardworker providers ...``:

    GET    /v1/providers[?tenant=]          list
    POST   /v1/providers                    add (201)
    GET    /v1/providers/{id}               show
    PATCH  /v1/providers/{id}               update
    DELETE /v1/providers/{id}               remove
    POST   /v1/providers/{id}/{operation}   test | pause | resume | resync | reconnect
    GET    /v1/commands/{id}                status of a reconnect or resync
    GET    /openapi.json                    this API's OpenAPI document

Every request needs ``Authorization: Bearer <SHARDWORKER_ADMIN_TOKEN>``, compared in
constant time before the path is routed or the body read; a missing or wrong token gets
a bare 401.  Bodies are limited to ``MAX_BODY_BYTES`` and need a ``Content-Length``.
Every error has one shape: ``{"error": phrase, "field": name or null, "message": text}``.
The console (``/console/``, ``shardworker.admin.console``) shares the listener and logs in
with the same token.  The server runs in its own thread (``shardworker.webserver``:
request deadline, connection cap, strict framing); :meth:`AdminApi.close` stops it and
closes its database pool and Redis client.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from http import HTTPStatus
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from shardworker.admin.answers import error_response, json_response
from shardworker.admin.models import NewProvider, ProviderPatch, ResyncBody, WaitBody, given
from shardworker.admin.service import AdminService
from shardworker.config import Settings
from shardworker.db.link import LinkTimeouts
from shardworker.db.store import open_pool
from shardworker.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ShardworkerError,
    ValidationError,
)
from shardworker.logs import get_logger
from shardworker.webserver import Limits, ServerThread, fd_budget, listen

log = get_logger(__name__)

MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_S = 30.0
CONSOLE_PREFIX = "/console"
_QUIET = frozenset({f"{CONSOLE_PREFIX}/live.json"})
_UUID = r"^[0-9a-fA-F-]{36}$"
_COMMAND_ID = r"^[0-9a-f]{32}$"

# On every answer, pages and JSON alike: no inline script or style, no framing.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; "
     b"img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
     b"base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ProviderId = Annotated[str, Path(pattern=_UUID, description="the provider's uuid")]
Tenant = Annotated[str | None, Query(description="needed only when the id is in two tenants")]

_STATUS: list[tuple[type[Exception], int]] = [
    (ValidationError, 400),
    (NotFoundError, 404),
    (ConflictError, 409),
]
_ERRORS = {
    code: {"description": HTTPStatus(code).phrase, "content": {"application/json": {}}}
    for code in (400, 401, 404, 409, 413, 500)
}


# -- answers ---------------------------------------------------------------------------


def _field_of(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc[1:]] or [str(loc[0]) if loc else "body"]
    name = parts[0]
    for part in parts[1:]:
        name += f"[{part}]" if part.isdigit() else f".{part}"
    return name


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "float_type": "must be a number",
    "list_type": "must be a list",
    "model_type": "must be a JSON object",
    "model_attributes_type": "must be a JSON object",
    "dict_type": "must be a JSON object",
}


def _validation_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    loc = tuple(first.get("loc", ("body",)))
    if loc and loc[0] == "path":
        return error_response(404, "not found")
    if first.get("type") == "json_invalid":
        return error_response(400, "body: not JSON", "body")
    field = _field_of(loc)
    text = _MESSAGES.get(str(first.get("type")), str(first.get("msg", "invalid")).lower())
    return error_response(400, f"{field}: {text}", field)


def _service_answer(request: Request, exc: Exception) -> Response:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return error_response(status, str(exc), getattr(exc, "field", None))
    # Messages of our own errors never carry secrets (errors.py); say what failed.
    log.warning("admin_request_failed", error_type=type(exc).__name__, error=str(exc))
    return error_response(500, f"{type(exc).__name__}: {exc}")


def _http_answer(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, HTTPStatus(exc.status_code).phrase.lower())


def _crash_answer(request: Request, exc: Exception) -> Response:
    log.error("admin_request_crashed", exc=True, path=request.url.path)
    return error_response(500, "internal error")


# -- the guard: token, body limits and the request log, before anything else runs ---------


class Guard:
    """Outermost ASGI layer.  Outside ``/console`` it checks the bearer token before the
    request reaches routing; everywhere it refuses bodies without a length or over the limit
    without reading them, and logs method, path (no query) and status."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        status = 0

        async def logged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refusal = self.refusal(scope)
        try:
            if refusal is not None:
                await refusal(scope, receive, logged_send)
            else:
                await self.app(scope, _bounded(receive), logged_send)
        except Exception:
            if not status:
                raise
            # Already answered (the JSON 500 above); the traceback is in admin_request_crashed.
        finally:
            # The console's own polls (every 2 s per open tab) only at DEBUG.
            say = log.debug if scope["path"] in _QUIET else log.info
            say("admin_request", method=scope["method"], path=scope["path"], status=status)

    def refusal(self, scope: Scope) -> Response | None:
        headers = _headers(scope)
        console = scope["path"] == CONSOLE_PREFIX or scope["path"].startswith(CONSOLE_PREFIX + "/")
        if not console and not self.authorised(headers.get(b"authorization", b"")):
            # No detail: whether the token was missing, malformed or wrong stays unsaid.
            return json_response(401, {"error": "unauthorized"},
                                 {"www-authenticate": "Bearer", "connection": "close"})  # fmt: skip
        if b"transfer-encoding" in headers:
            return _closing(error_response(411, "a Content-Length is required"))
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return _closing(error_response(400, "invalid Content-Length"))
        if int(length) > MAX_BODY_BYTES:
            # Not read: the connection is closed instead of draining a huge body.
            return _closing(error_response(413, f"body larger than {MAX_BODY_BYTES} bytes"))
        return None

    def authorised(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {bytes(k).lower(): bytes(v) for k, v in scope["headers"]}


def _closing(response: Response) -> Response:
    response.headers["connection"] = "close"
    return response


def _bounded(receive: Receive) -> Receive:
    """Stops reading past MAX_BODY_BYTES whatever the client declared (defence in depth)."""
    seen = 0

    async def read() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > MAX_BODY_BYTES:
            return {"type": "http.disconnect"}
        return message

    return read


# -- routes ----------------------------------------------------------------------------


def build_app(service: AdminService, token: str, console: Any = None) -> ASGIApp:
    """The API (and the console, when given) behind the guard."""
    app = FastAPI(
        title="shardworker admin API", version="1", docs_url=None, redoc_url=None,
        openapi_url="/openapi.json", responses=_ERRORS,  # type: ignore[arg-type]
    )  # fmt: skip
    app.add_exception_handler(RequestValidationError, _validation_answer)
    app.add_exception_handler(ShardworkerError, _service_answer)
    app.add_exception_handler(StarletteHTTPException, _http_answer)
    app.add_exception_handler(Exception, _crash_answer)
    _provider_routes(app, service)
    _operation_routes(app, service)
    if console is not None:
        app.mount(CONSOLE_PREFIX, console)
    return Guard(app, token)


def _provider_routes(app: FastAPI, svc: AdminService) -> None:
    @app.get("/v1/providers", summary="list providers")
    def list_providers(tenant: Tenant = None) -> Response:
        return json_response(200, svc.list(tenant))

    @app.post("/v1/providers", status_code=201, summary="add a provider")
    def add_provider(body: NewProvider) -> Response:
        return json_response(201, svc.add(given(body)))

    @app.get("/v1/providers/{provider_id}", summary="show a provider (never a secret)")
    def show_provider(provider_id: ProviderId, tenant: Tenant = None) -> Response:
        return json_response(200, svc.show(provider_id, tenant))

    @app.patch("/v1/providers/{provider_id}", summary="change a provider")
    def update_provider(provider_id: ProviderId, body: ProviderPatch,
                        tenant: Tenant = None) -> Response:  # fmt: skip
        return json_response(200, svc.update(provider_id, given(body), tenant))

    @app.delete("/v1/providers/{provider_id}", summary="remove a provider")
    def remove_provider(provider_id: ProviderId, tenant: Tenant = None) -> Response:
        return json_response(200, svc.remove(provider_id, tenant))


def _operation_routes(app: FastAPI, svc: AdminService) -> None:
    @app.post("/v1/providers/{provider_id}/test", summary="test the connection (no body)")
    async def test_provider(request: Request, provider_id: ProviderId,
                            tenant: Tenant = None) -> Response:  # fmt: skip
        if (await request.body()).strip():
            raise ValidationError("body", "test takes no body")
        return json_response(200, await run_in_threadpool(svc.test, provider_id, tenant))

    def operation(name: str, summary: str) -> None:
        method = getattr(svc, name)

        def run(provider_id: ProviderId, body: Annotated[WaitBody | None, Body()] = None,
                tenant: Tenant = None) -> Response:  # fmt: skip
            return json_response(200, method(provider_id, given(body), tenant))

        app.post(f"/v1/providers/{{provider_id}}/{name}", summary=summary,
                 operation_id=f"{name}_provider")(run)  # fmt: skip

    operation("pause", "pause ingestion (optionally wait until drained)")
    operation("resume", "resume ingestion (optionally wait until served)")

    @app.post("/v1/providers/{provider_id}/reconnect", summary="reconnect on the owner")
    def reconnect_provider(provider_id: ProviderId,
                           body: Annotated[WaitBody | None, Body()] = None,
                           tenant: Tenant = None) -> Response:  # fmt: skip
        return _command_answer(svc.reconnect(provider_id, given(body), tenant))

    @app.post("/v1/providers/{provider_id}/resync", summary="resync to now, or backfill since")
    def resync_provider(provider_id: ProviderId,
                        body: Annotated[ResyncBody | None, Body()] = None,
                        tenant: Tenant = None) -> Response:  # fmt: skip
        return _command_answer(svc.resync(provider_id, given(body), tenant))

    @app.get("/v1/commands/{command_id}", summary="status of a reconnect or resync")
    def command_status(command_id: Annotated[str, Path(pattern=_COMMAND_ID)]) -> Response:
        return json_response(200, svc.command(command_id))


def _command_answer(result: dict[str, Any]) -> Response:
    # A command just queued is accepted, not done.
    return json_response(202 if result.get("state") == "queued" else 200, result)


# -- the listener ----------------------------------------------------------------------


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
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
        from shardworker.admin.console import Console

        self._host, port = parse_addr(settings.admin_addr)
        self.console = Console(settings, service)
        app = build_app(service, settings.admin_token, self.console.app)
        limits = Limits(request_timeout_s=REQUEST_TIMEOUT_S, idle_timeout_s=REQUEST_TIMEOUT_S,
                        keepalive_s=5.0, max_connections=min(256, fd_budget(0.125)))  # fmt: skip
        self._server = ServerThread(app, listen(self._host, port, "SHARDWORKER_ADMIN_ADDR"),
                                    limits, "admin-api")  # fmt: skip
        self._started = False
        self._on_close = list(on_close)

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> None:
        self._server.start()
        self._started = True
        log.info("admin_api_listening", host=self._host, port=self.port, console=CONSOLE_PREFIX)

    def close(self, timeout_s: float = 5.0) -> None:
        self._server.stop(timeout_s)
        for close in self._on_close:
            close()


def start_admin_api(settings: Settings) -> AdminApi | None:
    """The API on ``SHARDWORKER_ADMIN_ADDR`` with its own clients; None when not configured."""
    if not settings.admin_addr:
        return None
    from shardworker.redisconn import redis_client

    pool = open_pool(settings.database_url, 4, link=LinkTimeouts.from_settings(settings))
    client = redis_client(settings)
    try:
        api = AdminApi(settings, AdminService(settings, pool, client), [pool.close, client.close])
        api.start()
    except Exception:
        pool.close()
        client.close()
        raise
    return api
