"""Ownership in PostgreSQL: fencing epochs in batches, and Alga's lease columns.

Every statement works on many providers at once (``unnest``): a pod taking over thousands
of providers must not pay a round trip per provider.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg_pool import ConnectionPool

OWNER_PREFIX = "shardworker:"


class OwnershipStore:
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

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
        honoured, never stolen.
        """
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT p.tenant::text, p.id::text FROM email_providers p "
                "JOIN imap_email_provider_config c ON c.tenant = p.tenant "
                "AND c.email_provider_id = p.id WHERE p.provider_type = 'imap' AND p.is_active "
                "AND p.inbound_paused_at IS NULL AND NOT (c.lease_owner IS NOT NULL "
                "AND c.lease_owner NOT LIKE %s AND c.lease_expires_at > now()) "
                "ORDER BY p.id",
                (OWNER_PREFIX + "%",),
            ).fetchall()
        return [(str(t), str(p)) for t, p in rows]

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
