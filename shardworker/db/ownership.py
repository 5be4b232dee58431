"""Ownership in PostgreSQL: fencing epochs in batches, and Alga's lease columns.

Every statement works on many providers at once (``unnest``): a pod taking over thousands
of providers must not pay a round trip per provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg_pool import ConnectionPool

OWNER_PREFIX = "shardworker:"


_FROM = (
    "FROM email_providers p JOIN imap_email_provider_config c "
    "ON c.tenant = p.tenant AND c.email_provider_id = p.id"
)
# Active, unpaused IMAP, and not held by a live lease of another service.
_SERVABLE = (
    "p.provider_type = 'imap' AND p.is_active AND p.inbound_paused_at IS NULL "
    "AND NOT (c.lease_owner IS NOT NULL AND c.lease_owner NOT LIKE %(like)s "
    "AND c.lease_expires_at > now())"
)


class OwnershipStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        # Full reads of every provider row (``servable``): the tests count them.
        self.full_scans = 0

    def acquire_epochs(
        self, items: Sequence[tuple[str, str]], owner: str
    ) -> dict[tuple[str, str], int]:
        """New, larger fencing epochs for (tenant, provider_id) pairs, keyed by the pair."""
        if not items:
            return {}
        tenants = [t for t, _ in items]
        pids = [p for _, p in items]
        with self._pool.connection() as conn:
            rows = conn.execute(
                "INSERT INTO shardworker_provider_state "
                "(tenant, provider_id, fencing_epoch, owner) "
                "SELECT t, p, 1, %(owner)s FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[]) "
                "AS x(t, p) ON CONFLICT (tenant, provider_id) DO UPDATE SET "
                "fencing_epoch = shardworker_provider_state.fencing_epoch + 1, "
                "owner = EXCLUDED.owner, updated_at = now() "
                "RETURNING tenant::text, provider_id::text, fencing_epoch",
                {"owner": owner, "tenants": tenants, "pids": pids},
            ).fetchall()
        return {(str(t), str(pid)): int(epoch) for t, pid, epoch in rows}

    def servable(self) -> list[tuple[str, str]]:
        """(tenant, provider_id) of every active, unpaused IMAP provider not leased elsewhere.

        A provider held by a live lease of another service (Alga's own listener) is
        honoured, never stolen.  This reads every row: the leader calls it on taking over
        and for the periodic reconcile only (``full_scans`` counts the calls).
        """
        self.full_scans += 1
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT p.tenant::text, p.id::text {_FROM} WHERE {_SERVABLE} ORDER BY p.id",
                {"like": OWNER_PREFIX + "%"},
            ).fetchall()
        return [(str(t), str(p)) for t, p in rows]

    def changed_since(self, since: datetime) -> tuple[list[tuple[str, str, bool]], datetime]:
        """Providers whose rows changed after ``since``, or whose foreign lease ran out.

        Returns ``(tenant, provider_id, servable)`` per row and the database's ``now()``,
        the next watermark.  Each part reads an index (``updated_at``, ``lease_expires_at``),
        so an unchanged cluster costs an empty index range, not a scan.
        """
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT p.tenant::text, p.id::text, ({_SERVABLE}) {_FROM} WHERE (p.tenant, p.id) "
                "IN (SELECT tenant, id FROM email_providers WHERE updated_at > %(since)s "
                "UNION SELECT tenant, email_provider_id FROM imap_email_provider_config "
                "WHERE updated_at > %(since)s UNION SELECT tenant, email_provider_id "
                "FROM imap_email_provider_config WHERE lease_expires_at > %(since)s "
                "AND lease_expires_at <= now() AND lease_owner NOT LIKE %(like)s)",
                {"since": since, "like": OWNER_PREFIX + "%"},
            ).fetchall()
            now = conn.execute("SELECT now()").fetchone()
        assert now is not None
        return [(str(t), str(p), bool(ok)) for t, p, ok in rows], now[0]

    def db_now(self) -> datetime:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]

    def alga_leased(self) -> set[tuple[str, str]]:
        """(tenant, provider_id) held by a live lease of another service (Alga's listener)."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT tenant::text, email_provider_id::text FROM imap_email_provider_config "
                "WHERE lease_owner IS NOT NULL AND lease_owner NOT LIKE %s "
                "AND lease_expires_at > now()",
                (OWNER_PREFIX + "%",),
            ).fetchall()
        return {(str(r[0]), str(r[1])) for r in rows}

    def mirror_leases(self, owners: Sequence[tuple[str, str, str]], ttl_s: float) -> int:
        """Write (tenant, provider_id, member) into Alga's lease columns, never stealing.

        A row leased by another live owner is left alone; the count of rows written is
        returned.
        """
        if not owners:
            return 0
        with self._pool.connection() as conn:
            cur = conn.execute(
                "UPDATE imap_email_provider_config c SET lease_owner = %(prefix)s || x.m, "
                "lease_expires_at = now() + make_interval(secs => %(ttl)s) "
                "FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[], %(members)s::text[]) "
                "AS x(t, p, m) WHERE c.tenant = x.t AND c.email_provider_id = x.p AND "
                "(c.lease_owner IS NULL OR c.lease_owner LIKE %(like)s "
                "OR c.lease_expires_at IS NULL OR c.lease_expires_at < now())",
                {"prefix": OWNER_PREFIX, "ttl": float(ttl_s), "like": OWNER_PREFIX + "%",
                 "tenants": [o[0] for o in owners], "pids": [o[1] for o in owners],
                 "members": [o[2] for o in owners]},
            )  # fmt: skip
            return cur.rowcount

    def clear_pairs(self, pairs: Sequence[tuple[str, str]]) -> int:
        """Drop shardworker's mirrored lease on exactly these (tenant, provider_id)."""
        if not pairs:
            return 0
        with self._pool.connection() as conn:
            cur = conn.execute(
                "UPDATE imap_email_provider_config c SET lease_owner = NULL, "
                "lease_expires_at = NULL FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[]) "
                "AS k(t, p) WHERE c.tenant = k.t AND c.email_provider_id = k.p "
                "AND c.lease_owner LIKE %(like)s",
                {"like": OWNER_PREFIX + "%", "tenants": [t for t, _ in pairs],
                 "pids": [p for _, p in pairs]},
            )  # fmt: skip
            return cur.rowcount

    def refresh_leases(self, ttl_s: float, batch: int) -> int:
        """Push out the expiry of at most ``batch`` of our mirrored leases past half-life.

        The oldest first, through the ``lease_expires_at`` index: called every round, it
        spreads the TTL refresh evenly instead of rewriting every row at once.
        """
        with self._pool.connection() as conn:
            cur = conn.execute(
                "UPDATE imap_email_provider_config c SET lease_expires_at = now() + "
                "make_interval(secs => %(ttl)s) WHERE (c.tenant, c.email_provider_id) IN "
                "(SELECT tenant, email_provider_id FROM imap_email_provider_config "
                "WHERE lease_expires_at < now() + make_interval(secs => %(half)s) "
                "AND lease_owner LIKE %(like)s ORDER BY lease_expires_at LIMIT %(batch)s)",
                {"ttl": float(ttl_s), "half": float(ttl_s) / 2, "like": OWNER_PREFIX + "%",
                 "batch": int(batch)},
            )  # fmt: skip
            return cur.rowcount

    def clear_leases(self, keep: Sequence[tuple[str, str]]) -> int:
        """Drop shardworker's mirrored leases except on the (tenant, provider_id) in ``keep``.

        The pair matters: another tenant's provider with the same id is not kept by it.
        """
        with self._pool.connection() as conn:
            cur = conn.execute(
                "UPDATE imap_email_provider_config c SET lease_owner = NULL, "
                "lease_expires_at = NULL WHERE c.lease_owner LIKE %(like)s AND NOT EXISTS "
                "(SELECT 1 FROM unnest(%(tenants)s::uuid[], %(pids)s::uuid[]) AS k(t, p) "
                "WHERE k.t = c.tenant AND k.p = c.email_provider_id)",
                {"like": OWNER_PREFIX + "%", "tenants": [t for t, _ in keep],
                 "pids": [p for _, p in keep]},
            )  # fmt: skip
            return cur.rowcount
