"""The SQL of the admin operations: read, insert, change and delete provider rows.

Each write takes the caller's connection, so the service can put the rows and their
secrets in one transaction.  Alga's secret-bearing columns (``oauth_client_secret``,
``access_token``, ``refresh_token``) are never selected: nothing read here can leak one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from shardworker.db.models import parse_cursors, parse_folder_filters
from shardworker.errors import ConflictError, NotFoundError

Connection = psycopg.Connection[TupleRow]

# Which table each writable field lives in.
PROVIDER_COLUMNS = ("provider_name", "mailbox", "is_active")
CONFIG_COLUMNS = (
    "host", "port", "secure", "allow_starttls", "auth_type", "username", "folder_filters",
    "max_emails_per_sync", "auto_process_emails", "connection_timeout_ms", "oauth_token_url",
    "oauth_client_id", "oauth_scopes", "token_expires_at",
)  # fmt: skip

_SELECT = """
SELECT p.id::text AS provider_id, p.tenant::text AS tenant, p.provider_name, p.mailbox,
       p.is_active, p.status, p.error_message, p.last_sync_at,
       p.inbound_paused_at AS paused_at, p.inbound_pause_reason AS pause_reason,
       p.inbound_auth_failure_count AS auth_failure_count,
       p.inbound_auth_failure_code AS auth_failure_code, p.created_at, p.updated_at,
       c.host, c.port, c.secure, c.allow_starttls, c.auth_type, c.username, c.folder_filters,
       c.max_emails_per_sync, c.auto_process_emails, c.connection_timeout_ms,
       c.oauth_token_url, c.oauth_client_id, c.oauth_scopes, c.token_expires_at,
       c.folder_state, c.uid_validity, c.last_uid, c.server_capabilities, c.last_error,
       c.lease_owner, c.lease_expires_at,
       COALESCE((SELECT array_agg(s.name ORDER BY s.name) FROM shardworker_secrets s
                 WHERE s.tenant = p.tenant AND s.provider_id = p.id), '{}') AS stored_secrets
FROM email_providers p
JOIN imap_email_provider_config c ON c.tenant = p.tenant AND c.email_provider_id = p.id
WHERE p.provider_type = 'imap'
"""

_INSERT_PROVIDER = """
INSERT INTO email_providers (id, tenant, provider_type, provider_name, mailbox, is_active,
                             status)
VALUES (%(provider_id)s::uuid, %(tenant)s::uuid, 'imap', %(provider_name)s, %(mailbox)s,
        %(is_active)s, 'configuring')
"""

_INSERT_CONFIG = """
INSERT INTO imap_email_provider_config
    (email_provider_id, tenant, host, port, secure, allow_starttls, auth_type, username,
     auto_process_emails, max_emails_per_sync, folder_filters, oauth_token_url,
     oauth_client_id, oauth_scopes, token_expires_at, connection_timeout_ms)
VALUES (%(provider_id)s::uuid, %(tenant)s::uuid, %(host)s, %(port)s, %(secure)s,
        %(allow_starttls)s, %(auth_type)s, %(username)s, %(auto_process_emails)s,
        %(max_emails_per_sync)s, %(folder_filters)s, %(oauth_token_url)s,
        %(oauth_client_id)s, %(oauth_scopes)s, %(token_expires_at)s,
        %(connection_timeout_ms)s)
"""

_KEY = "tenant = %(tenant)s::uuid AND {id} = %(provider_id)s::uuid"


def _row(cur: psycopg.Cursor[TupleRow], values: Sequence[Any]) -> dict[str, Any]:
    names = [d.name for d in cur.description or ()]
    row = dict(zip(names, values, strict=True))
    row["folder_filters"] = list(parse_folder_filters(row["folder_filters"]))
    cursors = parse_cursors(row.pop("folder_state"), row.pop("uid_validity"), row.pop("last_uid"))
    row["cursors"] = {
        name: {"uid_validity": c.uid_validity, "last_uid": c.last_uid}
        for name, c in sorted(cursors.items())
    }
    row["paused"] = row["paused_at"] is not None
    return row


def find(conn: Connection, provider_id: str, tenant: str | None) -> dict[str, Any]:
    """The provider's public fields; NotFoundError / ConflictError (id in two tenants)."""
    query = _SELECT + " AND p.id = %(provider_id)s::uuid"
    if tenant is not None:
        query += " AND p.tenant = %(tenant)s::uuid"
    cur = conn.execute(query, {"provider_id": provider_id, "tenant": tenant})
    rows = cur.fetchall()
    if not rows:
        raise NotFoundError(f"provider {provider_id} not found")
    if len(rows) > 1:
        raise ConflictError(f"provider {provider_id} exists in several tenants: give the tenant")
    return _row(cur, rows[0])


def find_all(conn: Connection, tenant: str | None) -> list[dict[str, Any]]:
    query = _SELECT
    if tenant is not None:
        query += " AND p.tenant = %(tenant)s::uuid"
    cur = conn.execute(query + " ORDER BY p.tenant, p.mailbox", {"tenant": tenant})
    return [_row(cur, values) for values in cur.fetchall()]


def insert(conn: Connection, values: Mapping[str, Any]) -> None:
    params = dict(values)
    params["folder_filters"] = Jsonb(list(values["folder_filters"]))
    conn.execute(_INSERT_PROVIDER, params)
    conn.execute(_INSERT_CONFIG, params)


def _set_clause(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder(c)) for c in columns
    )


def update(conn: Connection, tenant: str, provider_id: str, changes: Mapping[str, Any]) -> None:
    params: dict[str, Any] = {**changes, "tenant": tenant, "provider_id": provider_id}
    if "folder_filters" in params:
        params["folder_filters"] = Jsonb(list(params["folder_filters"]))
    for table, columns, id_column in (
        ("email_providers", PROVIDER_COLUMNS, "id"),
        ("imap_email_provider_config", CONFIG_COLUMNS, "email_provider_id"),
    ):
        changed = [c for c in columns if c in changes]
        if changed:
            query = sql.SQL("UPDATE {} SET {}, updated_at = now() WHERE " + _KEY).format(
                sql.Identifier(table), _set_clause(changed), id=sql.Identifier(id_column)
            )
            conn.execute(query, params)


def delete(conn: Connection, tenant: str, provider_id: str) -> None:
    """Both Alga rows and the fencing state; the ledger stays as the audit trail."""
    params = {"tenant": tenant, "provider_id": provider_id}
    for table, id_column in (
        ("imap_email_provider_config", "email_provider_id"),
        ("shardworker_provider_state", "provider_id"),
        ("email_providers", "id"),
    ):
        query = sql.SQL("DELETE FROM {} WHERE " + _KEY).format(
            sql.Identifier(table), id=sql.Identifier(id_column)
        )
        conn.execute(query, params)
