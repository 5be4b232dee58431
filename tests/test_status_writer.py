"""Batched provider status write-back against the real PostgreSQL."""

from __future__ import annotations

import uuid

import psycopg

from shardworker.db.providers import create_provider
from shardworker.db.status import StatusWriter
from shardworker.db.store import Store, open_pool


def test_latest_state_per_provider_is_written_in_one_flush(migrated_dsn: str) -> None:
    tenant = str(uuid.uuid4())
    with open_pool(migrated_dsn, max_size=2) as pool:
        pids = [
            create_provider(
                pool,
                tenant=tenant,
                mailbox=f"s{i}@example.com",
                host="127.0.0.1",
                port=993,
                secure=True,
                allow_starttls=False,
                auth_type="password",
                username=f"s{i}",
            )
            for i in range(3)
        ]
        store = Store(pool)
        for _ in range(2):
            store.record_auth_failure(tenant, pids[0], "auth_failed", threshold=10)
        writer = StatusWriter(pool, interval_s=60)  # flushed by hand below
        writer.status(tenant, pids[0], "error", "first")
        writer.status(tenant, pids[0], "connected", None)
        writer.connected(tenant, pids[0], ["IMAP4rev1", "IDLE"])
        writer.status(tenant, pids[1], "error", "AuthError: rejected")
        assert writer.flush() == 2
        assert writer.flush() == 0
    with psycopg.connect(migrated_dsn) as conn:
        rows = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT p.id::text, p.status, p.error_message, p.inbound_auth_failure_count, "
                "c.last_error, c.server_capabilities FROM email_providers p "
                "JOIN imap_email_provider_config c ON c.tenant = p.tenant "
                "AND c.email_provider_id = p.id WHERE p.tenant = %s",
                (tenant,),
            ).fetchall()
        }
    assert rows[pids[0]] == ("connected", None, 0, None, ["IMAP4rev1", "IDLE"])
    assert rows[pids[1]][:4] == ("error", "AuthError: rejected", 0, "AuthError: rejected")
    assert rows[pids[2]][0] == "configuring"  # untouched
