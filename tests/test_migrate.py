"""Migrations against the real PostgreSQL: idempotent, concurrent-safe, Alga-respecting."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from shardworker.db import schema
from shardworker.db.migrate import migrate, verify_schema
from shardworker.errors import MigrationError, SchemaMismatchError

FULL = [
    "created Alga table email_providers (absent)",
    "created Alga table imap_email_provider_config (absent)",
    "v1: shardworker tables: schema_version, ledger, secrets, provider_state",
    "v2: ledger status 'skipped' (loop policy)",
    "v3: indexes for incremental provider reads (updated_at, lease expiry)",
]


@pytest.fixture
def fresh_dsn(pg_dsn: str) -> Iterator[str]:
    """A second, empty throwaway database for tests that need a virgin catalog."""
    base = pg_dsn.rsplit("/", 1)[0]
    name = f"sw_test_mig_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    yield f"{base}/{name}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())


def catalog(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    """Columns, constraints and indexes of the public schema, for before/after comparison."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, character_maximum_length, "
        "column_default, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY 1, 2",
        "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
        "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
        "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = 'public' ORDER BY 1, 2",
    }
    with psycopg.connect(dsn) as conn:
        return {k: conn.execute(q.encode()).fetchall() for k, q in queries.items()}


def run_sql(dsn: str, text: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(text.encode())


def alga_shaped(drop_column: str | None = None) -> str:
    """Alga's tables as an older/newer Alga might have them: compatible, not identical."""
    providers = schema.ALGA_EMAIL_PROVIDERS.replace(
        "    mailbox varchar(255) NOT NULL,\n",
        "    mailbox varchar(320) NOT NULL,\n    vendor_config jsonb NOT NULL DEFAULT '{}',\n",
    )
    config = schema.ALGA_IMAP_CONFIG
    if drop_column:
        config = "\n".join(
            line for line in config.splitlines() if not line.strip().startswith(drop_column + " ")
        )
    return providers + config


def test_plan_distributes_every_tenant_table_on_citus() -> None:
    steps = schema.plan(["email_providers", "imap_email_provider_config"], set(), citus=True)
    sqls = [s.sql for s in steps]
    for table in (
        "email_providers",
        "imap_email_provider_config",
        "shardworker_ledger",
        "shardworker_secrets",
        "shardworker_provider_state",
    ):
        assert f"SELECT create_distributed_table('{table}', 'tenant')" in sqls
    assert sqls[0].startswith("SET LOCAL citus.multi_shard_modify_mode")
    # Each table is distributed after it is created.
    created = next(i for i, s in enumerate(steps) if s.version == 1)
    ledger = sqls.index("SELECT create_distributed_table('shardworker_ledger', 'tenant')")
    assert ledger > created


def test_plan_without_citus_or_with_everything_applied() -> None:
    plain = schema.plan(["email_providers"], set(), citus=False)
    assert not any("citus" in s.sql for s in plain)
    assert [s.description for s in plain] == [FULL[0], FULL[2], FULL[3], FULL[4]]
    assert schema.plan([], {1, 2, 3}, citus=True) == []
    assert [s.description for s in schema.plan([], {1}, citus=False)] == [FULL[3], FULL[4]]
    # Alga's existing tables are left to Alga: only shardworker's own get distributed.
    alga_present = [s.sql for s in schema.plan([], set(), citus=True)]
    assert not any("create_distributed_table('email_providers'" in s for s in alga_present)
    assert not any("create_distributed_table('imap_email" in s for s in alga_present)


def test_migrate_creates_everything_then_is_a_no_op(fresh_dsn: str) -> None:
    assert migrate(fresh_dsn) == FULL
    before = catalog(fresh_dsn)
    assert migrate(fresh_dsn) == []
    assert catalog(fresh_dsn) == before
    tables = {row[0] for row in before["columns"]}
    assert tables == {
        "email_providers",
        "imap_email_provider_config",
        "shardworker_schema_version",
        "shardworker_ledger",
        "shardworker_secrets",
        "shardworker_provider_state",
    }
    with psycopg.connect(fresh_dsn) as conn:
        verify_schema(conn)
        versions = conn.execute("SELECT version FROM shardworker_schema_version").fetchall()
    assert sorted(versions) == [(1,), (2,), (3,)]


def _ledger_row(conn: psycopg.Connection[tuple[object, ...]], status: str, uid: int) -> None:
    conn.execute(
        "INSERT INTO shardworker_ledger (tenant, provider_id, folder, uid_validity, uid, "
        "message_id, status, reason) VALUES (%s, %s, 'INBOX', 1, %s, '<m@x>', %s, 'why')",
        (uuid.uuid4(), uuid.uuid4(), uid, status),
    )


def test_v2_upgrades_a_v1_database_that_holds_rows(fresh_dsn: str) -> None:
    """A database migrated by the previous release (v1 only, ledger rows in it) gets v2:
    'skipped' becomes a valid status, the rows stay, and a second run changes nothing."""
    v1 = schema.plan(["email_providers", "imap_email_provider_config"], set(), citus=False)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        for step in v1:
            if step.version == 2:
                break
            conn.execute(step.sql.encode())
            if step.version is not None:
                conn.execute(
                    "INSERT INTO shardworker_schema_version VALUES (%s, %s)",
                    (step.version, step.description),
                )
        _ledger_row(conn, "published", 1)
        with pytest.raises(psycopg.errors.CheckViolation):
            _ledger_row(conn, "skipped", 2)
    assert migrate(fresh_dsn) == [FULL[3], FULL[4]]
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        _ledger_row(conn, "skipped", 3)
        with pytest.raises(psycopg.errors.CheckViolation):
            _ledger_row(conn, "bogus", 4)
        statuses = conn.execute("SELECT status FROM shardworker_ledger ORDER BY uid").fetchall()
        verify_schema(conn)
    assert statuses == [("published",), ("skipped",)]
    before = catalog(fresh_dsn)
    assert migrate(fresh_dsn) == []
    assert catalog(fresh_dsn) == before


def test_created_alga_tables_match_the_contract(fresh_dsn: str) -> None:
    migrate(fresh_dsn)
    with psycopg.connect(fresh_dsn, autocommit=True) as conn:
        tenant = uuid.uuid4()
        pid = conn.execute(
            "INSERT INTO email_providers (tenant, provider_type, provider_name, mailbox) "
            "VALUES (%s, 'imap', 'n', 'a@x') RETURNING id",
            (tenant,),
        ).fetchone()
        assert pid is not None
        row = conn.execute(
            "SELECT is_active, status, inbound_auth_failure_count FROM email_providers"
        ).fetchone()
        assert row == (True, "configuring", 0)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO email_providers (tenant, provider_type, provider_name, mailbox) "
                "VALUES (%s, 'imap', 'n', 'a@x')",
                (tenant,),
            )
        for bad in (
            "UPDATE email_providers SET inbound_paused_at = now()",
            "UPDATE email_providers SET inbound_pause_reason = 'manual'",
            "UPDATE email_providers SET inbound_paused_at = now(), inbound_pause_reason = 'x'",
            "UPDATE email_providers SET status = 'sleeping'",
        ):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(bad.encode())
        conn.execute(
            "UPDATE email_providers SET inbound_paused_at = now(), "
            "inbound_pause_reason = 'auth_failure'"
        )
        conn.execute(
            "INSERT INTO imap_email_provider_config (email_provider_id, tenant, host, port, "
            "auth_type, username) VALUES (%s, %s, 'h', 993, 'password', 'u')",
            (pid[0], tenant),
        )
        config = conn.execute(
            "SELECT secure, allow_starttls, auto_process_emails, max_emails_per_sync, "
            "folder_filters, folder_state, server_capabilities FROM imap_email_provider_config"
        ).fetchone()
    assert config == (True, False, True, 50, [], {}, [])


def test_concurrent_migrations_both_succeed(fresh_dsn: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        try:
            results.append(migrate(fresh_dsn))
        except BaseException as exc:  # reported below, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(results, key=len) == [[], FULL]


def test_alga_tables_are_left_untouched_and_accepted(fresh_dsn: str) -> None:
    run_sql(fresh_dsn, alga_shaped())
    alga_before = catalog(fresh_dsn)
    assert migrate(fresh_dsn) == FULL[2:]
    after = catalog(fresh_dsn)
    for part, rows in alga_before.items():
        assert [r for r in after[part] if r in rows] == rows
    columns = {(r[0], r[1]): r[3] for r in after["columns"]}
    assert columns[("email_providers", "vendor_config")] is None
    assert columns[("email_providers", "mailbox")] == 320


def test_missing_required_column_is_named_and_nothing_changes(fresh_dsn: str) -> None:
    run_sql(fresh_dsn, alga_shaped(drop_column="folder_state"))
    before = catalog(fresh_dsn)
    with pytest.raises(SchemaMismatchError, match=r"imap_email_provider_config\.folder_state"):
        migrate(fresh_dsn)
    assert catalog(fresh_dsn) == before


def test_only_the_absent_alga_table_is_created(fresh_dsn: str) -> None:
    run_sql(fresh_dsn, schema.ALGA_EMAIL_PROVIDERS)
    assert migrate(fresh_dsn) == FULL[1:]


def test_email_processed_messages_is_never_touched(fresh_dsn: str) -> None:
    run_sql(
        fresh_dsn,
        "CREATE TABLE email_processed_messages (message_id text, provider_id uuid, tenant uuid,"
        " processing_status text, PRIMARY KEY (message_id, provider_id, tenant));"
        f"INSERT INTO email_processed_messages VALUES ('imap:<a@b>', '{uuid.uuid4()}', "
        f"'{uuid.uuid4()}', 'success')",
    )
    before = catalog(fresh_dsn)
    migrate(fresh_dsn)
    after = catalog(fresh_dsn)
    assert [r for r in after["columns"] if r[0] == "email_processed_messages"] == [
        r for r in before["columns"] if r[0] == "email_processed_messages"
    ]
    with psycopg.connect(fresh_dsn) as conn:
        rows = conn.execute("SELECT message_id FROM email_processed_messages").fetchall()
    assert rows == [("imap:<a@b>",)]


def test_verify_schema_refuses_an_unmigrated_database(fresh_dsn: str) -> None:
    with psycopg.connect(fresh_dsn) as conn, pytest.raises(MigrationError, match="migrate"):
        verify_schema(conn)
    run_sql(fresh_dsn, alga_shaped())
    with psycopg.connect(fresh_dsn) as conn, pytest.raises(MigrationError, match="version 0"):
        verify_schema(conn)
