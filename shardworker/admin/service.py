"""The admin operations, with validation, shared by the CLI and the HTTP API.

Writes are all-or-nothing: a provider's rows and its secrets go into one transaction, and a
request is validated completely before anything is written.  Secrets are stored encrypted
in shardworker's table; a provider whose secrets live in Alga's secret store (env or
filesystem in the read chain) is simply added without them.  No operation returns a secret:
a provider's ``secrets`` field says only which are stored here.

Operations that need the connection (reconnect, resync) go to the worker that owns the
provider (``commands``); pause and resume are database writes the pool reacts to within a
leader round.  ``remove`` deletes both of Alga's rows, the provider's secrets and its fencing
state; the ledger stays as the audit trail of what was published.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

import psycopg
import redis

from shardworker.admin import rows
from shardworker.admin.commands import CommandBus
from shardworker.admin.validate import (
    SECRET_KINDS,
    ProviderFields,
    uuid_text,
    validate_new,
    validate_patch,
)
from shardworker.config import Settings
from shardworker.db.models import provider_key
from shardworker.db.store import Pool, Store
from shardworker.errors import SecretNotFoundError, ValidationError
from shardworker.imap.connect import Credentials, security_mode, tls_context
from shardworker.imap.probe import probe
from shardworker.logs import get_logger
from shardworker.netpolicy import OutboundPolicy
from shardworker.pool.leases import lease_key
from shardworker.secrets.store import SecretStore, secret_name

log = get_logger(__name__)

MAX_WAIT_S = 120.0
# Changes the owner must act on at once: how it connects and what it watches.
_RECONNECT_FIELDS = frozenset({
    "host", "port", "secure", "allow_starttls", "auth_type", "username", "folder_filters",
    "max_emails_per_sync", "connection_timeout_ms", "oauth_token_url", "oauth_client_id",
    "oauth_scopes",
})  # fmt: skip
_SECRETS_BY_AUTH = {
    "password": ("password",),
    "oauth2": ("oauth_client_secret", "refresh_token", "access_token"),
}


def _wait_s(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValidationError("wait_s", "must be a number of seconds")
    return min(float(value), MAX_WAIT_S)


def _since(value: Any) -> str | None:
    """A backfill start: an ISO date or timestamp, not in the future; UTC if no zone."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError("since", "must be an ISO-8601 date or timestamp")
    try:
        stamp = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            day = date.fromisoformat(value.strip())
        except ValueError:
            raise ValidationError("since", "must be an ISO-8601 date or timestamp") from None
        stamp = datetime(day.year, day.month, day.day)
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    if stamp > datetime.now(UTC):
        raise ValidationError("since", "must not be in the future")
    return stamp.isoformat()


def _only(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise ValidationError("body", "must be a JSON object")
    for key in body:
        if key not in allowed:
            raise ValidationError(str(key), "unknown field")
    return body


class AdminService:
    def __init__(self, settings: Settings, pool: Pool, client: redis.Redis) -> None:
        self.settings = settings
        self.pool = pool
        self.store = Store(pool)
        self.secrets = SecretStore(settings, pool)
        self.bus = CommandBus(client)

    # -- reading -------------------------------------------------------------------------

    def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        tenant = None if tenant is None else uuid_text("tenant", tenant)
        with self.pool.connection() as conn:
            found = rows.find_all(conn, tenant)
        owners = self._owners(found)
        return [self._public(row, owners) for row in found]

    def show(self, provider_id: str, tenant: str | None = None) -> dict[str, Any]:
        row = self._find(provider_id, tenant)
        return self._public(row, self._owners([row]))

    def command(self, command_id: str) -> dict[str, Any]:
        return self.bus.status(command_id)

    def _find(self, provider_id: str, tenant: str | None) -> dict[str, Any]:
        with self.pool.connection() as conn:
            return rows.find(conn, *_ids(provider_id, tenant))

    def _owners(self, found: Sequence[Mapping[str, Any]]) -> Mapping[str, str]:
        """The owners of exactly the rows shown (``tenant:provider_id`` → member)."""
        keys = [provider_key(r["tenant"], r["provider_id"]) for r in found]
        try:
            return self.bus.registry.owners_for(keys)
        except redis.RedisError as exc:
            # Listing must work without Redis; only the owner column is unknown then.
            log.warning("owners_unavailable", error_type=type(exc).__name__)
            return {}

    def _public(self, row: dict[str, Any], owners: Mapping[str, str]) -> dict[str, Any]:
        stored = set(row.pop("stored_secrets") or ())
        pid = row["provider_id"]
        row["secrets"] = {
            kind: "stored" if secret_name(kind, pid) in stored else "external"
            for kind in _SECRETS_BY_AUTH.get(row["auth_type"], ())
        }
        row["owner"] = owners.get(provider_key(row["tenant"], pid))
        return row

    # -- writing -------------------------------------------------------------------------

    def add(self, body: Any) -> dict[str, Any]:
        fields = validate_new(body)
        values = fields.values
        values["provider_id"] = values.get("provider_id") or str(uuid.uuid4())
        tenant, pid = values["tenant"], values["provider_id"]
        with self.pool.connection() as conn, conn.transaction():
            try:
                rows.insert(conn, values)
            except psycopg.errors.UniqueViolation as exc:
                raise _duplicate(exc) from None
            self._write_secrets(conn, tenant, pid, fields)
        log.info("provider_added", provider_id=pid, tenant=tenant, host=values["host"],
                 auth_type=values["auth_type"], secrets=sorted(fields.secrets))  # fmt: skip
        return self.show(pid, tenant)

    def update(self, provider_id: str, body: Any, tenant: str | None = None) -> dict[str, Any]:
        with self.pool.connection() as conn, conn.transaction():
            current = rows.find(conn, *_ids(provider_id, tenant))
            fields = validate_patch(body, current)
            tenant, pid = current["tenant"], current["provider_id"]
            try:
                rows.update(conn, tenant, pid, fields.values)
            except psycopg.errors.UniqueViolation as exc:
                raise _duplicate(exc) from None
            new_auth = fields.values.get("auth_type", current["auth_type"])
            if new_auth != current["auth_type"]:
                # The other auth type's secrets would only confuse a later switch back.
                for kind in _SECRETS_BY_AUTH[current["auth_type"]]:
                    fields.secrets.setdefault(kind, None)
            self._write_secrets(conn, tenant, pid, fields)
        log.info("provider_updated", provider_id=pid, tenant=tenant,
                 fields=sorted(fields.values), secrets=sorted(fields.secrets))  # fmt: skip
        out = {"provider": self.show(pid, tenant), "command": None}
        if fields.secrets or set(fields.values) & _RECONNECT_FIELDS:
            out["command"] = self._reconnect_after_update(tenant, pid)
        return out

    def _reconnect_after_update(self, tenant: str, pid: str) -> dict[str, Any] | None:
        """New credentials must replace the owner's cached ones now, not at the next failure."""
        if self.bus.owner(tenant, pid) is None:
            return None  # not served: the next owner reads the new row anyway
        return self.bus.send(tenant, pid, "reconnect", {})

    def _write_secrets(
        self, conn: rows.Connection, tenant: str, pid: str, fields: ProviderFields
    ) -> None:
        for kind in SECRET_KINDS:
            if kind not in fields.secrets:
                continue
            value, name = fields.secrets[kind], secret_name(kind, pid)
            if value is None:
                self.secrets.delete(tenant, name, conn=conn)
            else:
                self.secrets.put(tenant, pid, name, value, conn=conn)

    def remove(self, provider_id: str, tenant: str | None = None) -> dict[str, Any]:
        with self.pool.connection() as conn, conn.transaction():
            row = rows.find(conn, *_ids(provider_id, tenant))
            tenant, pid = row["tenant"], row["provider_id"]
            rows.delete(conn, tenant, pid)
            secrets = self.secrets.delete_provider_secrets(tenant, pid, conn=conn)
        log.info("provider_removed", provider_id=pid, tenant=tenant, secrets=secrets)
        return {"provider_id": pid, "tenant": tenant, "removed": True, "secrets_deleted": secrets}

    # -- operations ----------------------------------------------------------------------

    def test(self, provider_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Connect, log in, resolve and EXAMINE the folders; a classified result."""
        row = self._find(provider_id, tenant)
        try:
            creds = self._credentials(row)
        except SecretNotFoundError as exc:
            return {"ok": False, "classification": "secret_missing", "message": str(exc),
                    "capabilities": [], "folders": [], "missing_folders": []}  # fmt: skip
        timeout = (row["connection_timeout_ms"] or 0) / 1000 or self.settings.connect_timeout_s
        result = probe(
            row["host"], row["port"], security_mode(row["secure"], row["allow_starttls"]),
            creds, row["folder_filters"], timeout_s=timeout,
            ssl_context=tls_context(self.settings.tls_ca_file),
            policy=OutboundPolicy.from_settings(self.settings),
        )  # fmt: skip
        log.info("provider_tested", provider_id=row["provider_id"],
                 classification=result.classification)  # fmt: skip
        return {"ok": result.ok, "classification": result.classification,
                "message": result.message, "capabilities": list(result.capabilities),
                "folders": list(result.folders),
                "missing_folders": list(result.missing_folders)}  # fmt: skip

    def _credentials(self, row: Mapping[str, Any]) -> Credentials:
        tenant, pid = row["tenant"], row["provider_id"]
        if row["auth_type"] == "oauth2":
            # The stored access token as is: refreshing belongs to the owning worker alone
            # (a rotating refresh token must never be used by two processes).
            name = secret_name("access_token", pid)
            return Credentials("oauth2", row["username"], self.secrets.get(tenant, pid, name))
        name = secret_name("password", pid)
        return Credentials("password", row["username"], self.secrets.get(tenant, pid, name))

    def pause(
        self, provider_id: str, body: Any = None, tenant: str | None = None
    ) -> dict[str, Any]:
        wait_s = _wait_s(_only(body, ("wait_s",)).get("wait_s"))
        row = self._find(provider_id, tenant)
        self.store.pause(row["tenant"], row["provider_id"], "manual")
        log.info("provider_paused", provider_id=row["provider_id"], reason="manual")
        drained = self._wait_lease(row, present=False, wait_s=wait_s) if wait_s else None
        return {"provider": self.show(row["provider_id"], row["tenant"]), "drained": drained}

    def resume(
        self, provider_id: str, body: Any = None, tenant: str | None = None
    ) -> dict[str, Any]:
        wait_s = _wait_s(_only(body, ("wait_s",)).get("wait_s"))
        row = self._find(provider_id, tenant)
        self.store.resume(row["tenant"], row["provider_id"])
        log.info("provider_resumed", provider_id=row["provider_id"])
        served = self._wait_lease(row, present=True, wait_s=wait_s) if wait_s else None
        return {"provider": self.show(row["provider_id"], row["tenant"]), "served": served}

    def _wait_lease(self, row: Mapping[str, Any], *, present: bool, wait_s: float) -> bool:
        """Wait until an owner holds (or no longer holds) the provider's lease."""
        key = lease_key(row["tenant"], row["provider_id"])
        deadline = time.monotonic() + wait_s
        while bool(self.bus.client.exists(key)) != present:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def reconnect(
        self, provider_id: str, body: Any = None, tenant: str | None = None
    ) -> dict[str, Any]:
        wait_s = _wait_s(_only(body, ("wait_s",)).get("wait_s"))
        row = self._find(provider_id, tenant)
        sent = self.bus.send(row["tenant"], row["provider_id"], "reconnect", {})
        return self.bus.wait(sent["command_id"], wait_s) if wait_s else sent

    def resync(
        self, provider_id: str, body: Any = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Reset a folder's cursor to now, or (with ``since``) backfill older mail."""
        args = _only(body, ("folder", "since", "wait_s"))
        wait_s = _wait_s(args.get("wait_s"))
        folder = args.get("folder")
        if folder is not None and (not isinstance(folder, str) or not folder.strip()):
            raise ValidationError("folder", "must be a non-empty folder name")
        row = self._find(provider_id, tenant)
        command = {"folder": folder, "since": _since(args.get("since"))}
        sent = self.bus.send(row["tenant"], row["provider_id"], "resync", command)
        return self.bus.wait(sent["command_id"], wait_s) if wait_s else sent


def _ids(provider_id: str, tenant: str | None) -> tuple[str, str | None]:
    pid = uuid_text("provider_id", provider_id)
    return pid, None if tenant is None else uuid_text("tenant", tenant)


def _duplicate(exc: psycopg.errors.UniqueViolation) -> ValidationError:
    constraint = (exc.diag.constraint_name or "").lower()
    if "mailbox" in constraint:
        return ValidationError("mailbox", "a provider with this mailbox exists in the tenant")
    return ValidationError("provider_id", "a provider with this id exists")
