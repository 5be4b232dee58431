"""``shardworker providers ...``: the admin operations from the command line.

The same operations and JSON bodies as the HTTP API (``shardworker.admin.api``).  A body
comes from ``--json FILE`` (``-`` for stdin), from flags, or both (flags win).  Secrets
are never taken from the command line itself, where ``ps`` would show them: use
``--password-stdin`` or ``--*-env VARIABLE``.  Output is JSON on stdout; errors name the
field and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardworker.config import Settings
from shardworker.errors import ValidationError
from shardworker.exitcodes import ExitCode

if TYPE_CHECKING:  # the service pulls in psycopg, redis and imapclient: only when run
    from shardworker.admin.service import AdminService

    Parsers = argparse._SubParsersAction[argparse.ArgumentParser]

_TLS_MODES = {
    "implicit": {"secure": True, "allow_starttls": False},
    "starttls": {"secure": False, "allow_starttls": True},
    "plain": {"secure": False, "allow_starttls": False},
}
# flag dest → body field
_FIELD_FLAGS = {
    "tenant": "tenant", "mailbox": "mailbox", "name": "provider_name", "host": "host",
    "port": "port", "auth": "auth_type", "username": "username",
    "max_per_sync": "max_emails_per_sync", "timeout_ms": "connection_timeout_ms",
    "token_url": "oauth_token_url", "client_id": "oauth_client_id", "scopes": "oauth_scopes",
    "token_expires_at": "token_expires_at", "provider_id": "provider_id",
}  # fmt: skip
_SECRET_ENV_FLAGS = {
    "password_env": "password", "client_secret_env": "oauth_client_secret",
    "refresh_token_env": "refresh_token", "access_token_env": "access_token",
}  # fmt: skip


def _print(payload: Any) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")


def _service(settings: Settings) -> tuple[AdminService, Callable[[], None]]:
    from shardworker.admin.service import AdminService
    from shardworker.db.store import open_pool
    from shardworker.redisconn import redis_client

    pool = open_pool(settings.database_url, max_size=2)
    client = redis_client(settings)

    def close() -> None:
        pool.close()
        client.close()

    return AdminService(settings, pool, client), close


def _read_json(source: str) -> Any:
    try:
        raw = sys.stdin.buffer.read() if source == "-" else open(source, "rb").read()  # noqa: SIM115
    except OSError as exc:
        raise ValidationError("--json", f"cannot read {source}: {exc.strerror}") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValidationError("--json", "not valid JSON") from None


def provider_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request body from ``--json`` and the flags (flags win)."""
    body: dict[str, Any] = {}
    if args.json is not None:
        loaded = _read_json(args.json)
        if not isinstance(loaded, dict):
            raise ValidationError("body", "must be a JSON object")
        body.update(loaded)
    for dest, name in _FIELD_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            body[name] = value
    if args.tls is not None:
        body.update(_TLS_MODES[args.tls])
    if args.folder:
        body["folder_filters"] = list(args.folder)
    if args.active is not None:
        body["is_active"] = args.active
    for dest, kind in _SECRET_ENV_FLAGS.items():
        variable = getattr(args, dest, None)
        if variable is not None:
            if not os.environ.get(variable):
                raise ValidationError(kind, f"environment variable {variable} is empty or unset")
            body[kind] = os.environ[variable]
    if args.password_stdin:
        body["password"] = sys.stdin.readline().rstrip("\r\n")
    return body


def _wait_body(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    body = {k: v for k, v in extra.items() if v is not None}
    if args.wait is not None:
        body["wait_s"] = args.wait
    return body


def _run(args: argparse.Namespace, svc: AdminService) -> tuple[Any, bool]:
    """(what to print, success)."""
    action, pid, tenant = args.providers_command, str(getattr(args, "id", "")), args.tenant_filter
    if action == "list":
        return svc.list(tenant), True
    if action == "show":
        return svc.show(pid, tenant), True
    if action == "add":
        return svc.add(provider_body(args)), True
    if action == "update":
        return svc.update(pid, provider_body(args), tenant), True
    if action == "remove":
        return svc.remove(pid, tenant), True
    if action == "test":
        result = svc.test(pid, tenant)
        return result, bool(result["ok"])
    if action == "command":
        return svc.command(args.command_id), True
    if action == "resync":
        body = _wait_body(args, folder=args.folder_name, since=args.since)
        result = svc.resync(pid, body, tenant)
    else:  # pause, resume, reconnect
        result = getattr(svc, action)(pid, _wait_body(args), tenant)
    return result, result.get("state") not in ("failed", "rejected", "expired")


def cmd_providers(args: argparse.Namespace, settings: Settings) -> int:
    svc, close = _service(settings)
    try:
        payload, ok = _run(args, svc)
    finally:
        close()
    _print(payload)
    return ExitCode.OK if ok else ExitCode.FAILURE


# -- parser ------------------------------------------------------------------------------


def _add_body_flags(parser: argparse.ArgumentParser, *, new: bool) -> None:
    parser.add_argument("--json", metavar="FILE", help="request body (JSON object; - = stdin)")
    if new:
        parser.add_argument("--tenant", help="tenant uuid")
        parser.add_argument("--provider-id", help="use this uuid instead of a new one")
    flags = (
        ("--mailbox", str, "mailbox address"), ("--name", str, "provider name"),
        ("--host", str, "IMAP host"), ("--port", int, "IMAP port"),
        ("--username", str, "login name"), ("--max-per-sync", int, "max_emails_per_sync"),
        ("--timeout-ms", int, "connection_timeout_ms"),
        ("--token-url", str, "oauth_token_url"), ("--client-id", str, "oauth_client_id"),
        ("--scopes", str, "oauth_scopes"),
        ("--token-expires-at", str, "expiry of the given access token (ISO-8601)"),
    )  # fmt: skip
    for flag, kind, text in flags:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--tls", choices=sorted(_TLS_MODES), help="implicit, starttls or plain")
    parser.add_argument("--auth", choices=["password", "oauth2"], help="auth_type")
    parser.add_argument("--folder", action="append", help="folder filter (repeat)")
    parser.add_argument("--active", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--password-stdin", action="store_true", help="read the password")
    for flag in ("password", "client-secret", "refresh-token", "access-token"):
        parser.add_argument(f"--{flag}-env", metavar="VAR", help=f"{flag} from this variable")


def _id_command(sub: Parsers, name: str, text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=text)
    parser.add_argument("id", help="provider id")
    parser.add_argument("--tenant", dest="tenant_filter", help="tenant uuid (if ambiguous)")
    return parser


def add_provider_commands(sub: Parsers) -> None:
    providers = sub.add_parser("providers", help="manage IMAP providers (same as the admin API)")
    providers.set_defaults(func=cmd_providers, tenant_filter=None)
    actions = providers.add_subparsers(dest="providers_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every IMAP provider")
    listing.add_argument("--tenant", dest="tenant_filter", help="only this tenant")
    _id_command(actions, "show", "one provider (never its secrets)")
    _add_body_flags(actions.add_parser("add", help="create a provider"), new=True)
    _add_body_flags(_id_command(actions, "update", "change fields or secrets"), new=False)
    _id_command(actions, "remove", "delete the provider's rows and secrets")
    _id_command(actions, "test", "connect, log in, check folders; classified result")
    for name, text in (("pause", "pause ingestion (reason manual)"),
                       ("resume", "resume ingestion"),
                       ("reconnect", "reopen the provider's connections on its owner"),
                       ("resync", "cursor to now, or --since DATE to backfill")):  # fmt: skip
        parser = _id_command(actions, name, text)
        parser.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds")
        if name == "resync":
            parser.add_argument("--folder", dest="folder_name", help="one folder (default all)")
            parser.add_argument("--since", help="backfill mail received since (ISO date/time)")
    status = actions.add_parser("command", help="status of a reconnect or resync")
    status.add_argument("command_id")
