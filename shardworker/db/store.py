"""Every SQL statement the service runs against provider rows, the ledger and the cursor.

All statements filter by ``tenant`` (Alga distributes by it on Citus).  Multi-statement
writes run in one transaction sent as one pipeline, so a batch checkpoint costs a single
network round trip.  Fenced writes carry their guard in each statement, so a stale epoch
writes nothing even though the transaction still commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from shardworker.db.link import LinkTimeouts, link_params
from shardworker.db.models import (
    FolderCursor,
    LedgerEntry,
    ProviderConfig,
    config_version,
    parse_cursors,
    parse_folder_filters,
)
from shardworker.errors import FencedError, StoreError
from shardworker.redact import describe_dsn

__all__ = [
    "CursorSeed",
    "FolderCursor",
    "LedgerEntry",
    "Pool",
    "ProviderConfig",
    "Store",
    "open_pool",
]

Pool = ConnectionPool[psycopg.Connection[TupleRow]]

# How long a group of cursor seeds waits on a row lock before it falls back (seed_cursors).
SEED_LOCK_TIMEOUT = "200ms"

STATUSES = frozenset({"connected", "disconnected", "error", "configuring"})
PAUSE_REASONS = frozenset({"manual", "tenant_cancelled", "auth_failure"})


def open_pool(
    dsn: str, max_size: int, *, timeout_s: float = 10.0, link: LinkTimeouts | None = None
) -> Pool:
    """An open pool of autocommit connections, checked on checkout (survives a restart).

    Every connection notices a silent peer within ``link``'s bounds (``db/link.py``).
    """
    pool: Pool = ConnectionPool(
        dsn,
        min_size=1,
        max_size=max(1, max_size),
        open=True,
        kwargs={"autocommit": True, **link_params(dsn, link or LinkTimeouts())},
        # A connection broken by a server restart is discarded on checkout, not handed out.
        check=ConnectionPool.check_connection,
        timeout=timeout_s,
        reconnect_timeout=max(timeout_s, 60.0),
        name="shardworker",
    )
    try:
        pool.wait(timeout=timeout_s)
    except PoolTimeout:
        pool.close()
        raise StoreError(f"PostgreSQL {_where(dsn)} not reachable within {timeout_s}s") from None
    return pool


def _where(dsn: str) -> str:
    """Host, port and database of a DSN: never its password (parsed structurally)."""
    return describe_dsn(dsn)


def _now_iso() -> str:
    """Timestamps inside folder_state, in JavaScript's toISOString() form (as Alga writes)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_PROVIDER_SELECT = """
SELECT p.tenant::text, p.id::text, p.provider_name, p.mailbox, c.host, c.port, c.secure,
       c.allow_starttls, c.auth_type, c.username, c.folder_filters, c.max_emails_per_sync,
       c.auto_process_emails, c.connection_timeout_ms, c.oauth_token_url, c.oauth_client_id,
       c.oauth_scopes, c.token_expires_at, p.inbound_paused_at, p.inbound_pause_reason,
       c.lease_owner, c.lease_expires_at, c.folder_state, c.uid_validity, c.last_uid
FROM email_providers p
JOIN imap_email_provider_config c ON c.tenant = p.tenant AND c.email_provider_id = p.id
WHERE p.provider_type = 'imap' AND p.is_active
"""

# A fenced write proceeds only while the provider's epoch is still the caller's.
_GUARD = """(%(epoch)s::bigint IS NULL OR EXISTS (
    SELECT 1 FROM shardworker_provider_state s
    WHERE s.tenant = %(tenant)s::uuid AND s.provider_id = %(pid)s::uuid
      AND s.fencing_epoch = %(epoch)s::bigint))"""

_LOCK_FENCE = """
SELECT fencing_epoch FROM shardworker_provider_state
WHERE tenant = %(tenant)s::uuid AND provider_id = %(pid)s::uuid FOR UPDATE
"""

_INSERT_LEDGER = f"""
INSERT INTO shardworker_ledger
    (tenant, provider_id, folder, uid_validity, uid, message_id, stream_id, status, reason)
SELECT %(tenant)s::uuid, %(pid)s::uuid, %(folder)s::text, %(uv)s::bigint,
       e.uid, e.message_id, e.stream_id, e.status, e.reason
FROM unnest(%(uids)s::bigint[], %(mids)s::text[], %(sids)s::text[], %(statuses)s::text[],
            %(reasons)s::text[]) AS e(uid, message_id, stream_id, status, reason)
WHERE {_GUARD}
ON CONFLICT DO NOTHING
"""

# The folder's stored cursor; INBOX falls back to the top-level columns (Alga's older rows).
_OLD_UV = """COALESCE(c.folder_state -> %(folder)s::text ->> 'uid_validity',
    CASE WHEN %(inbox)s THEN c.uid_validity END)"""
_OLD_LAST = """COALESCE(c.folder_state -> %(folder)s::text ->> 'last_uid',
    CASE WHEN %(inbox)s THEN c.last_uid END)"""
# Within one UIDVALIDITY the cursor never moves back; a new UIDVALIDITY replaces it.
_NEW_LAST = f"""(CASE WHEN {_OLD_UV} = %(uv)s::text AND {_OLD_LAST} ~ '^[0-9]{{1,18}}$'
    THEN GREATEST(({_OLD_LAST})::bigint, %(last_uid)s::bigint)
    ELSE %(last_uid)s::bigint END)"""
# Reseeding sets the cursor as given, whatever was stored.
_SET_LAST = "%(last_uid)s::bigint"


# The two ledger questions of a batch as one statement: its UIDs, then its Message-IDs
# (the same rows ``known_uids`` and ``known_message_ids`` read, one round trip).
_KNOWN_BOTH = (
    "SELECT true, uid, NULL::text, stream_id FROM shardworker_ledger "
    "WHERE tenant = %(tenant)s::uuid AND provider_id = %(pid)s::uuid AND folder = %(folder)s "
    "AND uid_validity = %(uv)s AND uid = ANY(%(uids)s::bigint[]) "
    "UNION ALL "
    "(SELECT DISTINCT ON (message_id) false, NULL::bigint, message_id, stream_id "
    "FROM shardworker_ledger WHERE tenant = %(tenant)s::uuid AND provider_id = %(pid)s::uuid "
    "AND message_id = ANY(%(mids)s::text[]) AND status <> 'dead_lettered' "
    "ORDER BY message_id, stream_id NULLS LAST)"
)


def _cursor_update(new_last: str, sync_columns: str) -> str:
    return f"""
UPDATE imap_email_provider_config c SET
    folder_state = jsonb_set(
        CASE WHEN jsonb_typeof(c.folder_state) = 'object' THEN c.folder_state
             ELSE '{{}}'::jsonb END,
        ARRAY[%(folder)s::text],
        jsonb_build_object('uid_validity', %(uv)s::text, 'last_uid', ({new_last})::text,
                           'last_seen_at', %(seen)s::text)),
    uid_validity = CASE WHEN %(inbox)s THEN %(uv)s::text ELSE c.uid_validity END,
    last_uid = CASE WHEN %(inbox)s THEN ({new_last})::text ELSE c.last_uid END,
    {sync_columns}
    updated_at = now()
WHERE c.tenant = %(tenant)s::uuid AND c.email_provider_id = %(pid)s::uuid AND {_GUARD}
"""


_ADVANCE_CURSOR = _cursor_update(
    _NEW_LAST,
    "last_seen_at = now(), last_sync_at = now(), last_processed_message_id = "
    "COALESCE(%(last_mid)s::text, c.last_processed_message_id),",
)
_RESEED_CURSOR = _cursor_update(_SET_LAST, "")

_WHERE_PROVIDER = "WHERE tenant = %(tenant)s::uuid AND id = %(pid)s::uuid"
_WHERE_CONFIG = "WHERE tenant = %(tenant)s::uuid AND email_provider_id = %(pid)s::uuid"


def _seed_key(seed: CursorSeed) -> tuple[str, str, str]:
    return (seed.tenant, seed.provider_id, seed.folder)


def _provider(row: Sequence[Any]) -> ProviderConfig:
    values: dict[str, Any] = {
        "tenant": row[0],
        "provider_id": row[1],
        "provider_name": row[2] or "",
        "mailbox": row[3],
        "host": row[4],
        "port": int(row[5]),
        "secure": True if row[6] is None else bool(row[6]),
        "allow_starttls": bool(row[7]),
        "auth_type": row[8],
        "username": row[9],
        "folder_filters": parse_folder_filters(row[10]),
        "max_emails_per_sync": int(row[11]) if row[11] else 50,
        "auto_process_emails": True if row[12] is None else bool(row[12]),
        "connection_timeout_ms": row[13],
        "oauth_token_url": row[14],
        "oauth_client_id": row[15],
        "oauth_scopes": row[16],
        "token_expires_at": row[17],
        "paused": row[18] is not None,
        "pause_reason": row[19],
        "lease_owner": row[20],
        "lease_expires_at": row[21],
    }
    values["version"] = config_version(values)
    values["cursors"] = parse_cursors(row[22], row[23], row[24])
    return ProviderConfig(**values)


@dataclass(frozen=True)
class CursorSeed:
    """A folder cursor to set as given (first sync, UIDVALIDITY change), fenced by ``epoch``."""

    tenant: str
    provider_id: str
    folder: str
    uid_validity: int
    last_uid: int
    epoch: int | None


class Store:
    """The data-access layer over one connection pool; thread-safe (the pool is)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    # -- providers ---------------------------------------------------------------------

    def load_providers(self) -> list[ProviderConfig]:
        """Every active IMAP provider, paused ones included (the caller decides)."""
        with self._pool.connection() as conn:
            rows = conn.execute(_PROVIDER_SELECT + " ORDER BY p.tenant, p.id").fetchall()
        return [_provider(r) for r in rows]

    def load_providers_for(self, pairs: Sequence[tuple[str, str]]) -> list[ProviderConfig]:
        """The active IMAP providers among these (tenant, provider_id), by primary key."""
        if not pairs:
            return []
        query = _PROVIDER_SELECT + (
            " AND (p.tenant, p.id) IN (SELECT * FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[]))"
        )
        params = {"tenants": [t for t, _ in pairs], "pids": [p for _, p in pairs]}
        with self._pool.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [_provider(r) for r in rows]

    def db_now(self) -> datetime:
        """The database's clock: watermarks are compared with ``updated_at`` written by it."""
        with self._pool.connection() as conn:
            row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    def providers_changed_since(self, since: datetime) -> tuple[list[ProviderConfig], datetime]:
        """Active IMAP providers whose rows changed after ``since`` (through the
        ``updated_at`` indexes), and the database's ``now()``, the next watermark."""
        query = _PROVIDER_SELECT + (
            " AND (p.tenant, p.id) IN (SELECT tenant, id FROM email_providers "
            "WHERE updated_at > %(since)s UNION SELECT tenant, email_provider_id "
            "FROM imap_email_provider_config WHERE updated_at > %(since)s)"
        )
        with self._pool.connection() as conn:
            rows = conn.execute(query, {"since": since}).fetchall()
            now = conn.execute("SELECT now()").fetchone()
        assert now is not None
        return [_provider(r) for r in rows], now[0]

    def load_provider(self, tenant: str, provider_id: str) -> ProviderConfig | None:
        query = _PROVIDER_SELECT + " AND p.tenant = %(tenant)s::uuid AND p.id = %(pid)s::uuid"
        with self._pool.connection() as conn:
            row = conn.execute(query, {"tenant": tenant, "pid": provider_id}).fetchone()
        return None if row is None else _provider(row)

    # -- ledger and cursor -------------------------------------------------------------

    def known_uids(
        self, tenant: str, provider_id: str, folder: str, uid_validity: int, uids: Iterable[int]
    ) -> dict[int, str | None]:
        """Ledgered UIDs among ``uids`` → their stream id (None when dead-lettered)."""
        uid_list = list(uids)
        if not uid_list:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT uid, stream_id FROM shardworker_ledger WHERE tenant = %s::uuid "
                "AND provider_id = %s::uuid AND folder = %s AND uid_validity = %s "
                "AND uid = ANY(%s::bigint[])",
                (tenant, provider_id, folder, uid_validity, uid_list),
            ).fetchall()
        return {int(uid): stream_id for uid, stream_id in rows}

    def known_message_ids(
        self, tenant: str, provider_id: str, message_ids: Iterable[str]
    ) -> dict[str, str | None]:
        """Message-IDs this provider already published (any folder) → a stream id."""
        ids = list(dict.fromkeys(message_ids))
        if not ids:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT DISTINCT ON (message_id) message_id, stream_id FROM shardworker_ledger "
                "WHERE tenant = %s::uuid AND provider_id = %s::uuid "
                "AND message_id = ANY(%s::text[]) AND status <> 'dead_lettered' "
                "ORDER BY message_id, stream_id NULLS LAST",
                (tenant, provider_id, ids),
            ).fetchall()
        return {str(mid): stream_id for mid, stream_id in rows}

    def known_uids_and_message_ids(  # noqa: PLR0917 - positional API shared with the engine
        self,
        tenant: str,
        provider_id: str,
        folder: str,
        uid_validity: int,
        uids: Iterable[int],
        message_ids: Iterable[str],
    ) -> tuple[dict[int, str | None], dict[str, str | None]]:
        """``known_uids`` and ``known_message_ids`` in one round trip (a push, whose bodies
        are already in hand, asks both at once)."""
        uid_list, ids = list(uids), list(dict.fromkeys(message_ids))
        if not uid_list and not ids:
            return {}, {}
        params = {"tenant": tenant, "pid": provider_id, "folder": folder,
                  "uv": uid_validity, "uids": uid_list, "mids": ids}  # fmt: skip
        with self._pool.connection() as conn:
            rows = conn.execute(_KNOWN_BOTH, params).fetchall()
        known = {int(uid): stream_id for is_uid, uid, _, stream_id in rows if is_uid}
        mids = {str(mid): stream_id for is_uid, _, mid, stream_id in rows if not is_uid}
        return known, mids

    def commit_batch(  # noqa: PLR0917 - positional API shared with the engine
        self,
        tenant: str,
        provider_id: str,
        folder: str,
        uid_validity: int,
        entries: Sequence[LedgerEntry],
        last_uid: int,
        epoch: int | None,
    ) -> None:
        """Record a batch and advance the folder cursor in one transaction (fenced)."""
        params = self._cursor_params(
            tenant, provider_id, folder, uv=uid_validity, last_uid=last_uid, epoch=epoch
        )
        params["last_mid"] = max(entries, key=lambda e: e.uid).message_id if entries else None
        params["uids"] = [e.uid for e in entries]
        params["mids"] = [e.message_id for e in entries]
        params["sids"] = [e.stream_id for e in entries]
        params["statuses"] = [e.status for e in entries]
        params["reasons"] = [e.reason for e in entries]
        statements = ([_INSERT_LEDGER] if entries else []) + [_ADVANCE_CURSOR]
        self._fenced_write(params, statements)

    def reseed_folder(  # noqa: PLR0917 - positional API shared with the engine
        self,
        tenant: str,
        provider_id: str,
        folder: str,
        uid_validity: int,
        last_uid: int,
        epoch: int | None,
    ) -> None:
        """Set a folder cursor as given (first sync, UIDVALIDITY change, resync)."""
        params = self._cursor_params(
            tenant, provider_id, folder, uv=uid_validity, last_uid=last_uid, epoch=epoch
        )
        self._fenced_write(params, [_RESEED_CURSOR])

    def seed_cursors(self, seeds: Sequence[CursorSeed]) -> list[bool]:
        """Set many folder cursors as given in one transaction: one round trip and one
        commit for all (a cold start seeds thousands of folders).  Each seed is fenced on
        its own, as :meth:`reseed_folder`; answers, in order, whether each was written
        (False: its epoch is stale and nothing was written for it).

        Rows are locked in (tenant, provider, folder) order, so two groups never wait on
        each other in a cycle.  Other multi-row writers (the status writer's batch, the
        leader's lease mirror) lock in their own order, so a group that waits on a lock
        for long gives up (``SEED_LOCK_TIMEOUT``) instead of deadlocking with one: the
        caller then writes its seeds one transaction each, which cannot deadlock.
        """
        order = sorted(range(len(seeds)), key=lambda i: _seed_key(seeds[i]))
        params = [
            self._cursor_params(s.tenant, s.provider_id, s.folder, uv=s.uid_validity,
                                last_uid=s.last_uid, epoch=s.epoch)
            for s in seeds
        ]  # fmt: skip
        fences: dict[int, Any] = {}
        with self._pool.connection() as conn:
            with conn.pipeline(), conn.transaction():
                if len(seeds) > 1:
                    conn.execute(f"SET LOCAL lock_timeout = '{SEED_LOCK_TIMEOUT}'")
                for i in order:
                    if seeds[i].epoch is not None:
                        fences[i] = conn.execute(_LOCK_FENCE, params[i])
                    conn.execute(_RESEED_CURSOR, params[i])
            current = {i: cur.fetchone() for i, cur in fences.items()}
        return [
            i not in fences or (current[i] is not None and current[i][0] == seed.epoch)
            for i, seed in enumerate(seeds)
        ]

    @staticmethod
    def _cursor_params(
        tenant: str, provider_id: str, folder: str, *, uv: int, last_uid: int, epoch: int | None
    ) -> dict[str, Any]:
        return {
            "tenant": tenant, "pid": provider_id, "folder": folder, "uv": uv,
            "last_uid": last_uid, "epoch": epoch, "inbox": folder == "INBOX",
            "seen": _now_iso(),
        }  # fmt: skip

    def _fenced_write(self, params: dict[str, Any], statements: Sequence[str]) -> None:
        epoch = params["epoch"]
        with self._pool.connection() as conn:
            with conn.pipeline(), conn.transaction():
                # Lock first: a concurrent acquire_epoch waits for us, or we see its result.
                fence = conn.execute(_LOCK_FENCE, params) if epoch is not None else None
                for statement in statements:
                    conn.execute(statement, params)
            row = fence.fetchone() if fence is not None else None
        if epoch is not None and (row is None or row[0] != epoch):
            current = None if row is None else row[0]
            raise FencedError(
                f"provider {params['pid']}: fencing epoch {epoch} is stale (current {current}); "
                "nothing was written"
            )

    # -- auth failures and pausing -----------------------------------------------------

    def record_auth_failure(self, tenant: str, provider_id: str, code: str, threshold: int) -> bool:
        """Count an auth failure; pause at ``threshold``.  True iff this call paused it."""
        params = {"tenant": tenant, "pid": provider_id, "code": code, "threshold": threshold}
        pause_now = "inbound_paused_at IS NULL AND inbound_auth_failure_count + 1 >= %(threshold)s"
        with self._pool.connection() as conn:
            with conn.pipeline(), conn.transaction():
                before = conn.execute(
                    "SELECT inbound_paused_at IS NOT NULL FROM email_providers "
                    + _WHERE_PROVIDER
                    + " FOR UPDATE",
                    params,
                )
                after = conn.execute(
                    "UPDATE email_providers SET "
                    "inbound_auth_failure_count = inbound_auth_failure_count + 1, "
                    "inbound_auth_failure_last_at = now(), inbound_auth_failure_code = %(code)s, "
                    "status = 'error', updated_at = now(), "
                    f"inbound_pause_reason = CASE WHEN {pause_now} THEN 'auth_failure' "
                    "ELSE inbound_pause_reason END, "
                    f"inbound_paused_at = CASE WHEN {pause_now} THEN now() "
                    "ELSE inbound_paused_at END "
                    + _WHERE_PROVIDER
                    + " RETURNING inbound_paused_at IS NOT NULL",
                    params,
                )
            was, now = before.fetchone(), after.fetchone()
        return bool(was is not None and now is not None and not was[0] and now[0])

    def pause(self, tenant: str, provider_id: str, reason: str) -> None:
        if reason not in PAUSE_REASONS:
            raise ValueError(f"pause reason must be one of {sorted(PAUSE_REASONS)}, got {reason!r}")
        with self._pool.connection() as conn:
            conn.execute(
                "UPDATE email_providers SET inbound_paused_at = COALESCE(inbound_paused_at, "
                "now()), inbound_pause_reason = %(reason)s, updated_at = now() " + _WHERE_PROVIDER,
                {"tenant": tenant, "pid": provider_id, "reason": reason},
            )

    def resume(self, tenant: str, provider_id: str) -> None:
        with self._pool.connection() as conn:
            conn.execute(
                "UPDATE email_providers SET inbound_paused_at = NULL, "
                "inbound_pause_reason = NULL, inbound_auth_failure_count = 0, "
                "updated_at = now() " + _WHERE_PROVIDER,
                {"tenant": tenant, "pid": provider_id},
            )
