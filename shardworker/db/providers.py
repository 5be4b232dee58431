"""Create an IMAP provider the way Alga does: an ``email_providers`` row plus its
``imap_email_provider_config`` row, in one transaction.  Used by tests, the demo and the
``providers add`` command; the running service never creates providers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from shardworker.db.store import Pool

AUTH_TYPES = frozenset({"password", "oauth2"})

_INSERT_PROVIDER = """
INSERT INTO email_providers (id, tenant, provider_type, provider_name, mailbox, is_active,
                             status)
VALUES (%(pid)s::uuid, %(tenant)s::uuid, 'imap', %(name)s, %(mailbox)s, %(active)s,
        'configuring')
"""

_INSERT_CONFIG = """
INSERT INTO imap_email_provider_config
    (email_provider_id, tenant, host, port, secure, allow_starttls, auth_type, username,
     auto_process_emails, max_emails_per_sync, folder_filters, oauth_token_url,
     oauth_client_id, oauth_scopes, connection_timeout_ms)
VALUES (%(pid)s::uuid, %(tenant)s::uuid, %(host)s, %(port)s, %(secure)s, %(starttls)s,
        %(auth)s, %(username)s, %(auto)s, %(max)s, %(filters)s, %(token_url)s,
        %(client_id)s, %(scopes)s, %(timeout_ms)s)
"""


def create_provider(
    conn_or_pool: psycopg.Connection[TupleRow] | Pool,
    *,
    tenant: str,
    mailbox: str,
    host: str,
    port: int,
    secure: bool,
    allow_starttls: bool,
    auth_type: str,
    username: str,
    folder_filters: Sequence[str] = (),
    provider_name: str | None = None,
    max_emails_per_sync: int = 50,
    auto_process_emails: bool = True,
    is_active: bool = True,
    oauth_token_url: str | None = None,
    oauth_client_id: str | None = None,
    oauth_scopes: str | None = None,
    connection_timeout_ms: int | None = None,
    provider_id: str | None = None,
) -> str:
    """Insert both rows; return the provider id (generated unless given)."""
    if auth_type not in AUTH_TYPES:
        raise ValueError(f"auth_type must be one of {sorted(AUTH_TYPES)}, got {auth_type!r}")
    params = {
        "pid": provider_id or str(uuid.uuid4()),
        "tenant": tenant,
        "name": provider_name or mailbox,
        "mailbox": mailbox,
        "active": is_active,
        "host": host,
        "port": port,
        "secure": secure,
        "starttls": allow_starttls,
        "auth": auth_type,
        "username": username,
        "auto": auto_process_emails,
        "max": max_emails_per_sync,
        "filters": Jsonb(list(folder_filters)),
        "token_url": oauth_token_url,
        "client_id": oauth_client_id,
        "scopes": oauth_scopes,
        "timeout_ms": connection_timeout_ms,
    }
    if isinstance(conn_or_pool, psycopg.Connection):
        _insert(conn_or_pool, params)
    else:
        with conn_or_pool.connection() as conn:
            _insert(conn, params)
    return str(params["pid"])


def _insert(conn: psycopg.Connection[TupleRow], params: dict[str, object]) -> None:
    with conn.transaction():
        conn.execute(_INSERT_PROVIDER, params)
        conn.execute(_INSERT_CONFIG, params)
