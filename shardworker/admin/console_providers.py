"""The console's provider pages: the list, one provider with its actions, add, edit, remove.

Forms are turned into the same JSON bodies the API takes and go through ``AdminService``
(and so through ``validate.py``); a refused field is shown beside its input.  Adding runs
the connection test on the entered values first and saves only when it passes.  A secret
typed into a form is never sent back: after a refused form it must be typed again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shardworker.admin import queries
from shardworker.admin.deadletters import DeadLetters
from shardworker.admin.overview import Overview
from shardworker.admin.service import AdminService
from shardworker.admin.sessions import Session
from shardworker.admin.validate import validate_new
from shardworker.config import Settings
from shardworker.db.models import provider_key
from shardworker.errors import NotFoundError, ShardworkerError, ValidationError
from shardworker.imap.connect import Credentials, security_mode, tls_context
from shardworker.imap.probe import probe

Handler = Callable[[Request, Session], Awaitable[Response]]


class Console(Protocol):
    """What the provider pages use of the console (``console.Console``)."""

    settings: Settings
    service: AdminService
    overview: Overview
    dead: DeadLetters

    def page(self, handler: Handler, *, touch: bool = True) -> Callable[[Request], Any]: ...

    def render(
        self, template: str, request: Request, session: Session | None, status: int = 200,
        **context: Any,
    ) -> Response: ...  # fmt: skip

    def json(self, payload: Any, status: int = 200) -> Response: ...

    def back(self, session: Session, where: str, *notes: str) -> Response: ...

    async def call(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, str | None]: ...


_TLS = {"implicit": (True, False), "starttls": (False, True), "plain": (False, False)}
_TEXT_FIELDS = ("mailbox", "provider_name", "host", "username")
_INT_FIELDS = ("port", "max_emails_per_sync")
_FLAGS = ("is_active", "auto_process_emails")
_CLASSES_TTL_S = 30.0
_ACTIONS = ("test", "pause", "resume", "reconnect", "resync", "backfill")


def provider_routes(console: Console) -> list[Route]:
    pages = ProviderPages(console)
    page = console.page
    base = "/providers/{tenant}/{provider_id}"
    return [
        Route("/providers", page(pages.list_page)),
        Route("/providers/new", page(pages.new_form), methods=["GET"]),
        Route("/providers/new", page(pages.add), methods=["POST"]),
        Route(base, page(pages.detail)),
        Route(base + "/do/{action}", page(pages.act), methods=["POST"]),
        Route(base + "/edit", page(pages.edit_form), methods=["GET"]),
        Route(base + "/edit", page(pages.edit), methods=["POST"]),
        Route(base + "/remove", page(pages.remove_form), methods=["GET"]),
        Route(base + "/remove", page(pages.remove), methods=["POST"]),
        Route("/commands/{command_id}.json", page(pages.command, touch=False)),
    ]


def form_body(form: FormData) -> dict[str, Any]:
    """The provider fields of a console form, as the API's JSON body."""
    body: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            body[name] = value.strip()
    for name in _INT_FIELDS:
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            text = value.strip()
            body[name] = int(text) if text.isdigit() else text  # validate.py names the field
    tls = form.get("tls")
    if isinstance(tls, str) and tls in _TLS:
        body["secure"], body["allow_starttls"] = _TLS[tls]
    folders = form.get("folder_filters")
    if isinstance(folders, str):
        body["folder_filters"] = [f.strip() for f in folders.splitlines() if f.strip()]
    for flag in _FLAGS:
        body[flag] = form.get(flag) == "on"
    password = form.get("password")
    if isinstance(password, str) and password:
        body["password"] = password
    return body


def _command_id(text: str) -> str:
    """A command id from the query (32 hex digits), or '' for anything else."""
    return text if len(text) == 32 and all(ch in "0123456789abcdef" for ch in text) else ""


def _tls_of(row: dict[str, Any]) -> str:
    if row.get("secure"):
        return "implicit"
    return "starttls" if row.get("allow_starttls") else "plain"


class ProviderPages:
    def __init__(self, console: Console) -> None:
        self.c = console
        self.service = console.service
        self._classes: tuple[float, list[str]] | None = None

    # -- list --------------------------------------------------------------------------

    async def list_page(self, request: Request, session: Session) -> Response:
        q = request.query_params
        after = None
        if q.get("after_tenant") and q.get("after_mailbox") is not None:
            after = (q.get("after_tenant", ""), q.get("after_mailbox", ""))
        wanted = queries.ProviderFilter(
            search=q.get("q", "")[:200], status=q.get("status", ""),
            error_class=q.get("error", "")[:200], after=after,
        )  # fmt: skip
        try:
            found = await run_in_threadpool(queries.provider_page, self.service.pool, wanted)
            classes = await run_in_threadpool(self._error_classes)
        except Exception as exc:  # e.g. a malformed after_id: an empty page, not a 500
            text = f"The list could not be read ({type(exc).__name__})."
            return self.c.render("message.html", request, session, 400, title="Providers",
                                 text=text)  # fmt: skip
        owners = await run_in_threadpool(self._owners, found.rows)
        return self.c.render("providers.html", request, session, page=found, wanted=wanted,
                             statuses=queries.STATUSES, classes=classes, owners=owners)  # fmt: skip

    def _error_classes(self) -> list[str]:
        """The filter's choices, read at most every ``_CLASSES_TTL_S`` (a scan of every row)."""
        now = time.monotonic()
        if self._classes is None or now - self._classes[0] > _CLASSES_TTL_S:
            self._classes = (now, queries.error_classes(self.service.pool))
        return self._classes[1]

    def _owners(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
        """The owners of the providers on the page, ``tenant:provider_id`` → member."""
        try:
            keys = [provider_key(r["tenant"], r["provider_id"]) for r in rows]
            return self.c.overview.registry.owners_for(keys)
        except Exception:
            return {}

    # -- one provider ------------------------------------------------------------------

    async def detail(self, request: Request, session: Session) -> Response:
        tenant, pid = request.path_params["tenant"], request.path_params["provider_id"]
        row, error = await self.c.call(self.service.show, pid, tenant)
        if row is None:
            status = 404 if error and "not found" in error else 400
            return self.c.render("message.html", request, session, status, title="Provider",
                                 text=error or "not found")  # fmt: skip
        ledger = await run_in_threadpool(queries.ledger_rows, self.service.pool, tenant, pid)
        command = _command_id(request.query_params.get("command", ""))
        letters, _ = await self.c.call(self.c.dead.of_provider, pid)
        return self.c.render("provider.html", request, session, p=row, ledger=ledger,
                             letters=[d.public() for d in letters or []],
                             command=command)  # fmt: skip

    async def act(self, request: Request, session: Session) -> Response:
        tenant, pid = request.path_params["tenant"], request.path_params["provider_id"]
        action = request.path_params["action"]
        here = f"/providers/{tenant}/{pid}"
        if action not in _ACTIONS:
            return self.c.back(session, here, f"Unknown action {action!r}.")
        form = await request.form()
        result, error = await self.c.call(self._run_action, action, pid, tenant, form)
        if error is not None:
            return self.c.back(session, here, f"{action}: {error}")
        note, command = result
        where = here + (f"?command={command}" if command else "")
        return self.c.back(session, where, note)

    def _run_action(
        self, action: str, pid: str, tenant: str, form: FormData
    ) -> tuple[str, str | None]:
        svc = self.service
        if action == "test":
            got = svc.test(pid, tenant)
            return f"Connection test: {got['classification']} — {got['message']}", None
        if action in ("pause", "resume"):
            getattr(svc, action)(pid, None, tenant)
            return f"{action.capitalize()}d.", None
        if action == "reconnect":
            sent = svc.reconnect(pid, None, tenant)
            return f"Reconnect {sent['state']} on {sent.get('owner')}.", str(sent["command_id"])
        folder = form.get("folder")
        body: dict[str, Any] = {"folder": folder.strip() if isinstance(folder, str)
                                and folder.strip() else None}  # fmt: skip
        if action == "backfill":
            since = form.get("since")
            if not isinstance(since, str) or not since.strip():
                raise ValidationError("since", "give the date to backfill from")
            body["since"] = since.strip()
        sent = svc.resync(pid, body, tenant)
        label = "Backfill" if action == "backfill" else "Resync to now"
        return f"{label} {sent['state']} on {sent.get('owner')}.", str(sent["command_id"])

    async def command(self, request: Request, session: Session) -> Response:
        status, error = await self.c.call(self.service.command, request.path_params["command_id"])
        if status is None:
            return self.c.json({"error": "not found", "field": None, "message": error}, 404)
        return self.c.json(status)

    # -- add ---------------------------------------------------------------------------

    async def new_form(self, request: Request, session: Session) -> Response:
        values = {"port": 993, "tls": "implicit", "max_emails_per_sync": 50,
                  "is_active": True, "auto_process_emails": True, "folder_filters": []}  # fmt: skip
        return self.c.render("edit.html", request, session, mode="new", v=values, errors={},
                             test=None)  # fmt: skip

    async def add(self, request: Request, session: Session) -> Response:
        form = await request.form()
        body = form_body(form)
        tenant = form.get("tenant")
        body["tenant"] = tenant.strip() if isinstance(tenant, str) else ""
        shown = {**body, "tls": form.get("tls"), "password": None}
        try:
            test = await run_in_threadpool(self._pretest, body)
        except ValidationError as exc:
            return self.c.render("edit.html", request, session, 400, mode="new", v=shown,
                                 errors={exc.field: str(exc)}, test=None)  # fmt: skip
        if not test["ok"]:
            return self.c.render("edit.html", request, session, 400, mode="new", v=shown,
                                 errors={}, test=test)  # fmt: skip
        made, error = await self.c.call(self.service.add, body)
        if made is None:
            field = error.split(":", 1)[0] if error else "body"
            return self.c.render("edit.html", request, session, 400, mode="new", v=shown,
                                 errors={field: error}, test=test)  # fmt: skip
        return self.c.back(
            session,
            f"/providers/{made['tenant']}/{made['provider_id']}",
            "Saved: the connection test passed.",
        )

    def _pretest(self, body: dict[str, Any]) -> dict[str, Any]:
        """The connection test of ``body`` before anything is saved (as ``providers test``)."""
        fields = validate_new(body)
        v = fields.values
        kind = "password" if v["auth_type"] == "password" else "access_token"
        secret = fields.secrets.get(kind)
        if not secret:
            text = f"give the {kind.replace('_', ' ')} to test the connection"
            return {"ok": False, "classification": "secret_missing", "message": text}
        settings = self.c.settings
        timeout = (v.get("connection_timeout_ms") or 0) / 1000 or settings.connect_timeout_s
        result = probe(
            v["host"], v["port"], security_mode(v["secure"], v["allow_starttls"]),
            Credentials(v["auth_type"], v["username"], secret), v["folder_filters"],
            timeout_s=timeout, ssl_context=tls_context(settings.tls_ca_file),
        )  # fmt: skip
        return {"ok": result.ok, "classification": result.classification,
                "message": result.message}  # fmt: skip

    # -- edit and remove ---------------------------------------------------------------

    async def edit_form(self, request: Request, session: Session) -> Response:
        row, error = await self._row(request)
        if row is None:
            return self.c.back(session, "/providers", error or "not found")
        return self.c.render("edit.html", request, session, mode="edit", p=row,
                             v={**row, "tls": _tls_of(row)}, errors={}, test=None)  # fmt: skip

    async def edit(self, request: Request, session: Session) -> Response:
        row, error = await self._row(request)
        if row is None:
            return self.c.back(session, "/providers", error or "not found")
        form = await request.form()
        body = form_body(form)
        patch = {k: v for k, v in body.items() if k == "password" or row.get(k) != v}
        here = f"/providers/{row['tenant']}/{row['provider_id']}"
        if not patch:
            return self.c.back(session, here, "Nothing changed.")
        try:
            await run_in_threadpool(self.service.update, row["provider_id"], patch, row["tenant"])
        except ValidationError as exc:
            shown = {**row, **body, "tls": form.get("tls"), "password": None}
            return self.c.render("edit.html", request, session, 400, mode="edit", p=row,
                                 v=shown, errors={exc.field: str(exc)}, test=None)  # fmt: skip
        except ShardworkerError as exc:
            return self.c.back(session, here, f"Not saved: {exc}")
        return self.c.back(session, here, "Saved.")

    async def remove_form(self, request: Request, session: Session) -> Response:
        row, error = await self._row(request)
        if row is None:
            return self.c.back(session, "/providers", error or "not found")
        return self.c.render("remove.html", request, session, p=row, error=None)

    async def remove(self, request: Request, session: Session) -> Response:
        row, error = await self._row(request)
        if row is None:
            return self.c.back(session, "/providers", error or "not found")
        form = await request.form()
        if form.get("confirm") != row["mailbox"]:
            return self.c.render("remove.html", request, session, 400, p=row,
                                 error="Type the mailbox exactly to confirm.")  # fmt: skip
        done, error = await self.c.call(self.service.remove, row["provider_id"], row["tenant"])
        if done is None:
            return self.c.back(session, f"/providers/{row['tenant']}/{row['provider_id']}",
                               f"Not removed: {error}")  # fmt: skip
        return self.c.back(session, "/providers", f"Removed {row['mailbox']}.")

    async def _row(self, request: Request) -> tuple[dict[str, Any] | None, str | None]:
        tenant, pid = request.path_params["tenant"], request.path_params["provider_id"]
        try:
            return await run_in_threadpool(self.service.show, pid, tenant), None
        except (NotFoundError, ValidationError) as exc:
            return None, str(exc)
        except ShardworkerError as exc:
            return None, str(exc)
