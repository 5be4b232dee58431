"""The admin web console: server-rendered pages under ``/console`` on the admin listener.

Login is with the admin token (compared in constant time, rate-limited, no hint on a
wrong one); the session is an HttpOnly, SameSite=Strict cookie (``sessions.py``).  Every
state-changing request is a POST carrying the session's CSRF token.  Pages are Jinja2
templates with autoescaping; one small script (``static/console.js``) polls JSON for the
live figures and command progress, so the strict Content-Security-Policy that the guard
sets on every answer allows no inline script or style.  Operations go through
``AdminService``; nothing here reads or renders a secret.

The provider pages are in ``console_providers.py``; this module holds the app, the login
and the pages around it.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from shardworker.admin.answers import json_response
from shardworker.admin.console_providers import provider_routes
from shardworker.admin.deadletters import DeadLetters
from shardworker.admin.overview import Overview
from shardworker.admin.service import AdminService
from shardworker.admin.sessions import (
    LoginLimiter,
    RedisLoginLimiter,
    RedisSessions,
    Session,
    Sessions,
    csrf_ok,
)
from shardworker.config import Settings
from shardworker.errors import ShardworkerError
from shardworker.logs import get_logger

log = get_logger(__name__)

PREFIX = "/console"
SESSION_COOKIE = "sw_console"
LOGIN_COOKIE = "sw_console_login"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_STATIC = {"console.css": "text/css", "console.js": "text/javascript"}

Handler = Callable[[Request, Session], Awaitable[Response]]


def shown(value: Any) -> str:
    """A setting as an operator reads it: lists joined, mappings as ``key: value``."""
    if value is None or value == []:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z")
    return str(value)


class Console:
    def __init__(
        self, settings: Settings, service: AdminService, *, sessions: Sessions | None = None,
        limiter: LoginLimiter | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.service = service
        self.sessions = sessions or RedisSessions(service.bus.client)
        self.limiter = limiter or RedisLoginLimiter(service.bus.client)
        self._token = settings.admin_token.encode()
        self.overview = Overview(settings, service.pool, service.bus.client)
        self.dead = DeadLetters(settings, service.pool, service.bus.client)
        self.env = Environment(loader=PackageLoader("shardworker.admin", "templates"),
                               autoescape=select_autoescape(default=True))  # fmt: skip
        self.env.filters["shown"] = shown
        self._static = {
            name: resources.files("shardworker.admin").joinpath("static", name).read_bytes()
            for name in _STATIC
        }
        self.app = Starlette(routes=[
            Route("/", self.page(self.overview_page)),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.page(self.logout), methods=["POST"]),
            Route("/live.json", self.page(self.live, touch=False)),
            Route("/static/{name}", self.static),
            Route("/dead-letters", self.page(self.dead_letters_page)),
            Route("/dead-letters/{entry_id}/raw", self.page(self.dead_letter_raw)),
            Route("/dead-letters/{entry_id}/replay", self.page(self.replay), methods=["POST"]),
            *provider_routes(self),
        ])  # fmt: skip

    # -- plumbing ----------------------------------------------------------------------

    def page(self, handler: Handler, *, touch: bool = True) -> Callable[[Request], Any]:
        """The handler behind a valid session, and behind the CSRF check for a POST."""

        async def endpoint(request: Request) -> Response:
            session = self.sessions.get(request.cookies.get(SESSION_COOKIE), touch=touch)
            if session is None:
                if request.url.path.endswith(".json"):
                    return self.json({"error": "unauthorized"}, 401)
                return RedirectResponse(f"{PREFIX}/login", 303)
            if request.method == "POST":
                form = await request.form()
                token = form.get("csrf")
                if not csrf_ok(session, token if isinstance(token, str) else None):
                    log.warning("console_csrf_refused", path=request.url.path)
                    return self.render("message.html", request, None, 403,
                                       title="Refused", text="The form was not accepted (CSRF "
                                       "check failed). Reload the page and try again.")  # fmt: skip
            return await handler(request, session)

        return endpoint

    def render(
        self, template: str, request: Request, session: Session | None, status: int = 200,
        **context: Any,
    ) -> HTMLResponse:  # fmt: skip
        flash: list[str] = []
        if session is not None and session.flash:
            flash, session.flash = session.flash, []
            self.sessions.save(session)
        html = self.env.get_template(template).render(
            session=session, csrf=session.csrf if session else "", flash=flash, prefix=PREFIX,
            path=request.url.path, **context,
        )  # fmt: skip
        return HTMLResponse(html, status)

    @staticmethod
    def json(payload: Any, status: int = 200) -> Response:
        return json_response(status, payload)

    def back(self, session: Session, where: str, *notes: str) -> Response:
        session.flash.extend(notes)
        self.sessions.save(session)
        return RedirectResponse(f"{PREFIX}{where}", 303)

    async def call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]:
        """``fn(*args)`` off the event loop; (result, None) or (None, what went wrong)."""
        try:
            return await run_in_threadpool(fn, *args), None
        except ShardworkerError as exc:
            return None, str(exc)

    # -- login -------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        if self.sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
            return RedirectResponse(f"{PREFIX}/", 303)
        return self._login_page(request, None, 200)

    def _login_page(self, request: Request, error: str | None, status: int) -> Response:
        nonce = secrets.token_urlsafe(24)
        response = self.render("login.html", request, None, status, error=error, nonce=nonce)
        self._cookie(response, request, LOGIN_COOKIE, nonce, 600)
        return response

    async def login(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        form = await request.form()
        nonce, cookie = form.get("nonce"), request.cookies.get(LOGIN_COOKIE, "")
        if (
            not isinstance(nonce, str)
            or not cookie
            or not secrets.compare_digest(nonce.encode(), cookie.encode())
        ):
            return self._login_page(request, "The form expired. Try again.", 403)
        if not self.limiter.allowed(client):
            log.warning("console_login_limited", client=client)
            return self._login_page(request, "Too many attempts. Wait a minute.", 429)
        token = form.get("token")
        given = token.strip().encode() if isinstance(token, str) else b""
        if not secrets.compare_digest(given, self._token):
            self.limiter.failed(client)
            log.warning("console_login_failed", client=client)
            return self._login_page(request, "The token was not accepted.", 401)
        session = self.sessions.create()
        log.info("console_login", client=client)
        response = RedirectResponse(f"{PREFIX}/", 303)
        self._cookie(response, request, SESSION_COOKIE, session.sid, self.sessions.max_age_s)
        response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        self.sessions.drop(session.sid)
        response = RedirectResponse(f"{PREFIX}/login", 303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    @staticmethod
    def _cookie(response: Response, request: Request, name: str, value: str, age: float) -> None:
        # Secure except on loopback (http://127.0.0.1 in a port-forward): a browser on any
        # other host sends the session only over https.
        secure = request.url.hostname not in _LOOPBACK
        response.set_cookie(name, value, max_age=int(age), path=PREFIX, httponly=True,
                            samesite="strict", secure=secure)  # fmt: skip

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._static:
            return Response(b"not found", 404, media_type="text/plain")
        return Response(self._static[name], media_type=_STATIC[name],
                        headers={"cache-control": "max-age=300"})  # fmt: skip

    # -- overview and dead letters -----------------------------------------------------

    async def overview_page(self, request: Request, session: Session) -> Response:
        figures = await run_in_threadpool(self.overview.figures)
        return self.render("overview.html", request, session, f=figures)

    async def live(self, request: Request, session: Session) -> Response:
        return self.json(await run_in_threadpool(self.overview.figures))

    async def dead_letters_page(self, request: Request, session: Session) -> Response:
        before = request.query_params.get("before") or None
        letters, error = await self.call(self.dead.page, before)
        total, _ = await self.call(self.dead.length)
        done, _ = await self.call(self.dead.replayed, letters or [])
        shown = [{**d.public(), "replayed": d.entry_id in (done or ())} for d in letters or []]
        older = shown[-1]["entry_id"] if len(shown) == 50 else None
        return self.render("deadletters.html", request, session, letters=shown, error=error,
                           total=total, older=older)  # fmt: skip

    async def dead_letter_raw(self, request: Request, session: Session) -> Response:
        entry_id = request.path_params["entry_id"]
        letter, error = await self.call(self.dead.get, entry_id)
        if letter is None or not letter.has_raw:
            return self.back(session, "/dead-letters", error or "No raw message is kept.")
        safe = "".join(ch for ch in entry_id if ch.isdigit() or ch == "-")
        return Response(letter.raw(), media_type="message/rfc822", headers={
            "content-disposition": f'attachment; filename="dead-letter-{safe}.eml"'})  # fmt: skip

    async def replay(self, request: Request, session: Session) -> Response:
        entry_id = request.path_params["entry_id"]
        result, error = await self.call(self.dead.replay, entry_id)
        if error is not None:
            return self.back(session, "/dead-letters", f"Replay refused: {error}")
        return self.back(
            session,
            "/dead-letters",
            f"Replayed {entry_id}: {result['status']} ({result['stream_id']})",
        )
