"""Read-only queries of the console: a page of providers, counts, ledger rows.

The provider list must stay fast at 100,000 rows: it is ordered by tenant and mailbox,
the order of Alga's unique index ``(tenant, mailbox)``, so a page is an index range; it
pages by keyset (the last row's ``tenant, mailbox``) rather than by offset, asks for one
row more than a page to know whether a next page exists, and counts matches only up to
``COUNT_CAP``.  Alga's
secret-bearing columns are never selected.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from psycopg.rows import dict_row

from shardworker.db.store import Pool

PAGE_SIZE = 50
COUNT_CAP = 10_000
STATUSES = ("connected", "disconnected", "error", "configuring", "paused", "inactive")

# Keys are found in email_providers alone; a filter on a config column (host, error class)
# is a hashed IN over the matching config rows.  A join of the two 100k-row tables would
# hash one of them whole on every page (~100 ms), since the planner cannot estimate the
# two-column join and never expects a LIMIT to stop it early.
_KEYS = """
SELECT p.tenant, p.id FROM email_providers p WHERE p.provider_type = 'imap'
"""
_CONFIG_IN = (
    "(p.tenant, p.id) IN (SELECT c.tenant, c.email_provider_id "
    "FROM imap_email_provider_config c WHERE {})"
)
_ROWS = """
SELECT p.id::text AS provider_id, p.tenant::text AS tenant, p.mailbox, p.provider_name,
       p.status, p.is_active, p.last_sync_at, p.inbound_paused_at IS NOT NULL AS paused,
       p.inbound_pause_reason AS pause_reason, c.host, c.port,
       COALESCE(c.last_error, p.error_message) AS last_error,
       NULLIF(split_part(c.last_error, ':', 1), '') AS error_class
FROM unnest(%(tenants)s::uuid[], %(ids)s::uuid[]) AS k(tenant, id)
JOIN email_providers p ON p.tenant = k.tenant AND p.id = k.id
JOIN imap_email_provider_config c ON c.tenant = p.tenant AND c.email_provider_id = p.id
ORDER BY p.tenant, p.mailbox
"""


@dataclass(frozen=True)
class ProviderFilter:
    search: str = ""
    status: str = ""
    error_class: str = ""
    after: tuple[str, str] | None = None  # (tenant, mailbox) of the last row shown

    def where(self) -> tuple[str, dict[str, Any]]:
        """SQL conditions on ``p`` (email_providers) and their parameters."""
        clauses: list[str] = []
        params: dict[str, Any] = {}
        term = self.search.strip()
        if _is_uuid(term):
            # A tenant or provider id: an index lookup, not a text scan of every uuid.
            params["id"] = term
            clauses.append("(p.tenant = %(id)s::uuid OR p.id = %(id)s::uuid)")
        elif term:
            # strpos, not ILIKE: about 5x cheaper per row, which a 100k-row scan needs.  It
            # matches the term as typed and in lower case; addresses and host names are
            # stored in lower case nearly always (both are case-insensitive by their RFCs).
            params["q"], params["ql"] = term, term.lower()
            found = "strpos({0}, %(q)s) > 0"
            if term != term.lower():
                found = "(strpos({0}, %(q)s) > 0 OR strpos({0}, %(ql)s) > 0)"
            clauses.append("(" + found.format("p.mailbox") + " OR "
                           + _CONFIG_IN.format(found.format("c.host")) + ")")  # fmt: skip
        if self.status == "paused":
            clauses.append("p.inbound_paused_at IS NOT NULL")
        elif self.status == "inactive":
            clauses.append("NOT p.is_active")
        elif self.status in STATUSES:
            params["status"] = self.status
            clauses.append("p.status = %(status)s")
        if self.error_class:
            params["error_class"] = self.error_class
            params["error_prefix"] = self.error_class + ":"
            clauses.append(_CONFIG_IN.format("starts_with(c.last_error, %(error_prefix)s)"))
        return "".join(" AND " + c for c in clauses), params


@dataclass(frozen=True)
class ProviderPage:
    rows: list[dict[str, Any]]
    next_after: tuple[str, str] | None
    matches: int
    capped: bool


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return len(text) == 36


def _keys_query(where: str, keyset: str, *, scan: bool) -> str:
    page = " ORDER BY p.tenant, p.mailbox LIMIT %(limit)s"
    if not scan:
        return _KEYS + where + keyset + page
    # A search matches few rows: find them once, then sort the matches.  Walking the
    # (tenant, mailbox) index in page order would test every row on the way (~0.8 s).
    # The count comes from the same scan.
    return ("WITH p AS MATERIALIZED (SELECT p.tenant, p.id, p.mailbox FROM email_providers p "
            "WHERE p.provider_type = 'imap'" + where + ") SELECT p.tenant, p.id, "
            "(SELECT count(*) FROM p) AS total FROM p WHERE true" + keyset + page)  # fmt: skip


def provider_page(pool: Pool, wanted: ProviderFilter, size: int = PAGE_SIZE) -> ProviderPage:
    """One page of providers in (tenant, mailbox) order, and how many match (capped)."""
    where, params = wanted.where()
    searching = bool(wanted.search.strip())
    keyset = ""
    if wanted.after is not None:
        params["after_tenant"], params["after_mailbox"] = wanted.after
        keyset = " AND (p.tenant, p.mailbox) > (%(after_tenant)s::uuid, %(after_mailbox)s)"
    params["limit"] = size + 1
    params["cap"] = COUNT_CAP + 1
    with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        cur.execute(_keys_query(where, keyset, scan=searching), params)
        keys = cur.fetchall()
        more = len(keys) > size
        keys = keys[:size]
        cur.execute(_ROWS, {"tenants": [k["tenant"] for k in keys],
                            "ids": [k["id"] for k in keys]})  # fmt: skip
        rows = cur.fetchall()
        if keys and "total" in keys[0]:
            matches = int(keys[0]["total"])
        elif searching and wanted.after is None:
            matches = 0  # the scan found nothing
        else:
            cur.execute("SELECT count(*) AS n FROM (" + _KEYS + where + " LIMIT %(cap)s) AS m",
                        params)  # fmt: skip
            counted = cur.fetchone()
            matches = int(counted["n"]) if counted else 0
    after = (rows[-1]["tenant"], rows[-1]["mailbox"]) if more and rows else None
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
