"""Read-only queries of the console: a page of providers, counts, ledger rows.

The provider list must stay fast at 100,000 rows: it pages by keyset (``mailbox, id``
after the last row shown) rather than by offset, asks for one row more than a page to
know whether a next page exists, and counts matches only up to ``COUNT_CAP``.  Alga's
secret-bearing columns are never selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row

from shardworker.db.store import Pool

PAGE_SIZE = 50
COUNT_CAP = 10_000
STATUSES = ("connected", "disconnected", "error", "configuring", "paused", "inactive")

_FROM = """
FROM email_providers p
JOIN imap_email_provider_config c ON c.tenant = p.tenant AND c.email_provider_id = p.id
WHERE p.provider_type = 'imap'
"""
_COLUMNS = """
SELECT p.id::text AS provider_id, p.tenant::text AS tenant, p.mailbox, p.provider_name,
       p.status, p.is_active, p.last_sync_at, p.inbound_paused_at IS NOT NULL AS paused,
       p.inbound_pause_reason AS pause_reason, c.host, c.port,
       COALESCE(c.last_error, p.error_message) AS last_error,
       NULLIF(split_part(c.last_error, ':', 1), '') AS error_class
"""


@dataclass(frozen=True)
class ProviderFilter:
    search: str = ""
    status: str = ""
    error_class: str = ""
    after: tuple[str, str] | None = None  # (mailbox, provider_id) of the last row shown

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if self.search:
            params["q"] = "%" + _escape_like(self.search.strip()) + "%"
            clauses.append("(p.mailbox ILIKE %(q)s OR c.host ILIKE %(q)s OR p.tenant::text "
                           "ILIKE %(q)s OR p.provider_name ILIKE %(q)s)")  # fmt: skip
        if self.status == "paused":
            clauses.append("p.inbound_paused_at IS NOT NULL")
        elif self.status == "inactive":
            clauses.append("NOT p.is_active")
        elif self.status in STATUSES:
            params["status"] = self.status
            clauses.append("p.status = %(status)s")
        if self.error_class:
            params["error_class"] = self.error_class
            clauses.append("split_part(c.last_error, ':', 1) = %(error_class)s")
        return "".join(" AND " + c for c in clauses), params


@dataclass(frozen=True)
class ProviderPage:
    rows: list[dict[str, Any]]
    next_after: tuple[str, str] | None
    matches: int
    capped: bool


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def provider_page(pool: Pool, wanted: ProviderFilter, size: int = PAGE_SIZE) -> ProviderPage:
    where, params = wanted.where()
    page_where = where
    if wanted.after is not None:
        params["after_mailbox"], params["after_id"] = wanted.after
        page_where += " AND (p.mailbox, p.id) > (%(after_mailbox)s, %(after_id)s::uuid)"
    params["limit"] = size + 1
    params["cap"] = COUNT_CAP + 1
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_COLUMNS + _FROM + page_where + " ORDER BY p.mailbox, p.id LIMIT %(limit)s",
                    params)  # fmt: skip
        rows = cur.fetchall()
        cur.execute("SELECT count(*) AS n FROM (SELECT 1 " + _FROM + where +
                    " LIMIT %(cap)s) AS matched", params)  # fmt: skip
        counted = cur.fetchone()
    matches = int(counted["n"]) if counted else 0
    more = len(rows) > size
    rows = rows[:size]
    after = (rows[-1]["mailbox"], rows[-1]["provider_id"]) if more and rows else None
    return ProviderPage(rows, after, min(matches, COUNT_CAP), matches > COUNT_CAP)


def error_classes(pool: Pool) -> list[str]:
    """The error classes now recorded (``ImapAuthError`` …), for the list's filter."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT DISTINCT split_part(last_error, ':', 1) FROM imap_email_provider_config "
            "WHERE last_error IS NOT NULL AND last_error <> '' ORDER BY 1 LIMIT 50"
        ).fetchall()
    return [str(r[0]) for r in rows if r[0]]


def provider_counts(pool: Pool) -> dict[str, int]:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE p.is_active), "
            "count(*) FILTER (WHERE p.inbound_paused_at IS NOT NULL), "
            "count(*) FILTER (WHERE p.status = 'error'), "
            "count(*) FILTER (WHERE p.is_active AND p.inbound_paused_at IS NULL) "
            "FROM email_providers p WHERE p.provider_type = 'imap'"
        ).fetchone()
    names = ("total", "active", "paused", "in_error", "eligible")
    return dict(zip(names, (int(v) for v in row or (0,) * 5), strict=True))


def ledger_rows(pool: Pool, tenant: str, provider_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """The provider's most recent ledger rows (published, duplicate, dead-lettered)."""
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT folder, uid_validity, uid, message_id, stream_id, status, reason, "
            "published_at FROM shardworker_ledger WHERE tenant = %s::uuid "
            "AND provider_id = %s::uuid ORDER BY published_at DESC, uid DESC LIMIT %s",
            (tenant, provider_id, limit),
        )
        return list(cur.fetchall())
