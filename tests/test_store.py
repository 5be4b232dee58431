"""The Store against the real PostgreSQL: providers, ledger, cursor, fencing, auth pauses."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from shardworker.db.migrate import migrate
from shardworker.db.ownership import OwnershipStore
from shardworker.db.providers import create_provider
from shardworker.db.status import StatusWriter
from shardworker.db.store import FolderCursor, LedgerEntry, Pool, Store, open_pool
from shardworker.errors import FencedError, StoreError


@pytest.fixture(scope="module")
def pool(pg_dsn: str) -> Iterator[Pool]:
    migrate(pg_dsn)
    with open_pool(pg_dsn, max_size=4) as p:
        yield p


@pytest.fixture
def store(pool: Pool) -> Store:
    return Store(pool)


@pytest.fixture
def tenant() -> str:
    return str(uuid.uuid4())


def add(pool: Pool, tenant: str, **overrides: object) -> str:
    fields: dict[str, object] = {
        "tenant": tenant,
        "mailbox": f"{uuid.uuid4().hex[:8]}@example.com",
        "host": "imap.example.com",
        "port": 993,
        "secure": True,
        "allow_starttls": False,
        "auth_type": "password",
        "username": "user",
    }
    fields.update(overrides)
    return create_provider(pool, **fields)  # type: ignore[arg-type]


def sql(pool: Pool, query: str, *params: object) -> list[tuple[object, ...]]:
    with pool.connection() as conn:
        cur = conn.execute(query.encode(), params)
        return cur.fetchall() if cur.description else []


def config_row(pool: Pool, tenant: str, pid: str, columns: str) -> tuple[object, ...]:
    rows = sql(
        pool,
        f"SELECT {columns} FROM imap_email_provider_config "
        "WHERE tenant = %s AND email_provider_id = %s",
        tenant,
        pid,
    )
    return rows[0]


def provider_row(pool: Pool, tenant: str, pid: str, columns: str) -> tuple[object, ...]:
    rows = sql(
        pool, f"SELECT {columns} FROM email_providers WHERE tenant = %s AND id = %s", tenant, pid
    )
    return rows[0]


def acquire_epoch(pool: Pool, tenant: str, pid: str, owner: str) -> int:
    """What a lease acquisition does in PostgreSQL (shardworker.pool.leases, step 2)."""
    return OwnershipStore(pool).acquire_epochs([(tenant, pid)], owner)[tenant, pid]


def current_epoch(pool: Pool, tenant: str, pid: str) -> int:
    rows = sql(pool, "SELECT fencing_epoch FROM shardworker_provider_state WHERE tenant = %s "
               "AND provider_id = %s", tenant, pid)  # fmt: skip
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def write_status(pool: Pool, tenant: str, pid: str, status: str, error: str | None) -> None:
    writer = StatusWriter(pool)
    writer.status(tenant, pid, status, error)
    writer.flush()


def entries(*uids: int, status: str = "published") -> list[LedgerEntry]:
    return [LedgerEntry(u, f"<m{u}@x>", f"{u}-0", status) for u in uids]


# -- providers ---------------------------------------------------------------------------


def test_load_providers_filters_type_and_activity(pool: Pool, store: Store, tenant: str) -> None:
    active = add(pool, tenant, folder_filters=["INBOX", "Support"], provider_name="Support")
    paused = add(pool, tenant)
    add(pool, tenant, is_active=False)
    sql(
        pool,
        "INSERT INTO email_providers (tenant, provider_type, provider_name, mailbox) "
        "VALUES (%s, 'google', 'g', 'g@example.com')",
        tenant,
    )
    store.pause(tenant, paused, "manual")
    mine = {p.provider_id: p for p in store.load_providers() if p.tenant == tenant}
    assert set(mine) == {active, paused}
    config = mine[active]
    assert config.folder_filters == ("INBOX", "Support")
    assert config.provider_name == "Support"
    assert (config.host, config.port, config.secure, config.allow_starttls) == (
        "imap.example.com",
        993,
        True,
        False,
    )
    assert (config.max_emails_per_sync, config.auto_process_emails, config.paused) == (
        50,
        True,
        False,
    )
    assert config.cursors == {}
    assert mine[paused].paused and mine[paused].pause_reason == "manual"
    assert store.load_provider(tenant, active) == config
    assert store.load_provider(tenant, str(uuid.uuid4())) is None
    assert store.load_provider(str(uuid.uuid4()), active) is None


def test_repr_holds_none_of_alga_s_secret_columns(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant, auth_type="oauth2", oauth_client_id="client-1")
    sql(
        pool,
        "UPDATE imap_email_provider_config SET oauth_client_secret = 'S3KRIT-1', "
        "access_token = 'S3KRIT-2', refresh_token = 'S3KRIT-3' WHERE tenant = %s",
        tenant,
    )
    config = store.load_provider(tenant, pid)
    assert config is not None and config.oauth_client_id == "client-1"
    assert "S3KRIT" not in repr(config)


def test_cursors_parse_alga_shapes_with_inbox_fallback(
    pool: Pool, store: Store, tenant: str
) -> None:
    pid = add(pool, tenant)
    sql(
        pool,
        "UPDATE imap_email_provider_config SET uid_validity = '7', last_uid = '41', "
        "folder_state = %s::jsonb WHERE tenant = %s",
        '{"Sent": {"uid_validity": "3", "last_uid": "9"}, "Odd": {"uid_validity": 5, '
        '"last_uid": 6}, "Bad": {"uid_validity": "x"}, "Worse": 12}',
        tenant,
    )
    config = store.load_provider(tenant, pid)
    assert config is not None
    assert config.cursors == {
        "Sent": FolderCursor(3, 9),
        "Odd": FolderCursor(5, 6),
        "INBOX": FolderCursor(7, 41),
    }


def test_version_changes_on_config_edits_only(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    first = store.load_provider(tenant, pid)
    assert first is not None
    store.commit_batch(tenant, pid, "INBOX", 1, entries(1), 1, None)
    writer = StatusWriter(pool)
    writer.status(tenant, pid, "connected", None)
    writer.connected(tenant, pid, ["IDLE"])
    writer.flush()
    unchanged = store.load_provider(tenant, pid)
    assert unchanged is not None and unchanged.version == first.version
    sql(pool, "UPDATE imap_email_provider_config SET host = 'other' WHERE tenant = %s", tenant)
    edited = store.load_provider(tenant, pid)
    assert edited is not None and edited.version != first.version
    store.pause(tenant, pid, "manual")
    paused = store.load_provider(tenant, pid)
    assert paused is not None and paused.version != edited.version


# -- ledger and cursor -------------------------------------------------------------------


def test_commit_batch_records_ledger_and_cursor(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    dead = LedgerEntry(12, "uid:12", None, "dead_lettered", "parse_error: x")
    batch = [*entries(10, 11), dead]
    store.commit_batch(tenant, pid, "INBOX", 77, batch, 12, None)
    assert store.known_uids(tenant, pid, "INBOX", 77, [9, 10, 11, 12]) == {
        10: "10-0",
        11: "11-0",
        12: None,
    }
    assert store.known_uids(tenant, pid, "INBOX", 78, [10]) == {}
    assert store.known_uids(tenant, pid, "Other", 77, [10]) == {}
    assert store.known_uids(tenant, pid, "INBOX", 77, []) == {}
    assert store.known_message_ids(tenant, pid, ["<m10@x>", "<nope@x>", "uid:12"]) == {
        "<m10@x>": "10-0"
    }
    state, top_uv, top_last, last_mid, synced, seen = config_row(
        pool,
        tenant,
        pid,
        "folder_state, uid_validity, last_uid, last_processed_message_id, last_sync_at, "
        "last_seen_at",
    )
    assert isinstance(state, dict)
    assert state["INBOX"]["uid_validity"] == "77" and state["INBOX"]["last_uid"] == "12"
    assert str(state["INBOX"]["last_seen_at"]).endswith("Z")
    assert (top_uv, top_last, last_mid) == ("77", "12", "uid:12")
    assert synced is not None and seen is not None
    config = store.load_provider(tenant, pid)
    assert config is not None and config.cursors == {"INBOX": FolderCursor(77, 12)}


def test_other_folders_do_not_touch_the_inbox_mirror(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    store.commit_batch(tenant, pid, "Support/Ünïcode", 5, entries(3), 3, None)
    state, top_uv, top_last = config_row(pool, tenant, pid, "folder_state, uid_validity, last_uid")
    assert (top_uv, top_last) == (None, None)
    assert isinstance(state, dict) and state["Support/Ünïcode"]["last_uid"] == "3"


def test_cursor_never_moves_back_within_a_uidvalidity(
    pool: Pool, store: Store, tenant: str
) -> None:
    pid = add(pool, tenant)
    store.commit_batch(tenant, pid, "INBOX", 5, entries(20), 20, None)
    store.commit_batch(tenant, pid, "INBOX", 5, [], 15, None)
    store.commit_batch(tenant, pid, "Sent", 5, [], 8, None)
    store.commit_batch(tenant, pid, "Sent", 5, [], 4, None)
    config = store.load_provider(tenant, pid)
    assert config is not None
    assert config.cursors == {"INBOX": FolderCursor(5, 20), "Sent": FolderCursor(5, 8)}
    assert config_row(pool, tenant, pid, "last_uid") == ("20",)
    # A different UIDVALIDITY replaces the cursor (the old UIDs mean nothing).
    store.commit_batch(tenant, pid, "INBOX", 6, [], 3, None)
    config = store.load_provider(tenant, pid)
    assert config is not None and config.cursors["INBOX"] == FolderCursor(6, 3)


def test_greatest_also_honours_alga_s_top_level_inbox(
    pool: Pool, store: Store, tenant: str
) -> None:
    pid = add(pool, tenant)
    sql(
        pool,
        "UPDATE imap_email_provider_config SET uid_validity = '9', last_uid = '100' "
        "WHERE tenant = %s",
        tenant,
    )
    store.commit_batch(tenant, pid, "INBOX", 9, [], 50, None)
    config = store.load_provider(tenant, pid)
    assert config is not None and config.cursors["INBOX"] == FolderCursor(9, 100)


def test_ledger_rows_are_never_overwritten(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    store.commit_batch(tenant, pid, "INBOX", 1, entries(1), 1, None)
    store.commit_batch(
        tenant, pid, "INBOX", 1, [LedgerEntry(1, "<m1@x>", "9-9", "duplicate")], 1, None
    )
    assert store.known_uids(tenant, pid, "INBOX", 1, [1]) == {1: "1-0"}


def test_reseed_sets_the_cursor_unconditionally(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    store.commit_batch(tenant, pid, "INBOX", 5, [], 50, None)
    store.reseed_folder(tenant, pid, "INBOX", 5, 10, None)
    config = store.load_provider(tenant, pid)
    assert config is not None and config.cursors["INBOX"] == FolderCursor(5, 10)
    assert config_row(pool, tenant, pid, "uid_validity, last_uid") == ("5", "10")


# -- fencing -----------------------------------------------------------------------------


def test_epochs_increase_per_provider(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    assert current_epoch(pool, tenant, pid) == 0
    assert acquire_epoch(pool, tenant, pid, "pod-a") == 1
    assert acquire_epoch(pool, tenant, pid, "pod-b") == 2
    assert current_epoch(pool, tenant, pid) == 2
    assert sql(pool, "SELECT owner FROM shardworker_provider_state WHERE tenant = %s", tenant) == [
        ("pod-b",)
    ]


def test_stale_epoch_writes_nothing(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    old = acquire_epoch(pool, tenant, pid, "pod-a")
    store.commit_batch(tenant, pid, "INBOX", 1, entries(1), 1, old)
    new = acquire_epoch(pool, tenant, pid, "pod-b")
    before = config_row(pool, tenant, pid, "folder_state, last_uid, updated_at, last_sync_at")
    with pytest.raises(FencedError, match=f"epoch {old} is stale"):
        store.commit_batch(tenant, pid, "INBOX", 1, entries(2, 3), 3, old)
    with pytest.raises(FencedError):
        store.reseed_folder(tenant, pid, "INBOX", 2, 0, old)
    assert (
        config_row(pool, tenant, pid, "folder_state, last_uid, updated_at, last_sync_at") == before
    )
    assert store.known_uids(tenant, pid, "INBOX", 1, [1, 2, 3]) == {1: "1-0"}
    store.commit_batch(tenant, pid, "INBOX", 1, entries(2), 2, new)
    assert set(store.known_uids(tenant, pid, "INBOX", 1, [1, 2, 3])) == {1, 2}


def test_epoch_without_state_row_is_fenced(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    with pytest.raises(FencedError):
        store.commit_batch(tenant, pid, "INBOX", 1, entries(1), 1, 1)
    assert store.known_uids(tenant, pid, "INBOX", 1, [1]) == {}


def test_a_takeover_in_flight_fences_the_waiting_writer(
    pg_dsn: str, pool: Pool, store: Store, tenant: str
) -> None:
    pid = add(pool, tenant)
    old = acquire_epoch(pool, tenant, pid, "pod-a")
    outcome: list[BaseException | None] = []
    with psycopg.connect(pg_dsn) as takeover:
        takeover.execute(
            "UPDATE shardworker_provider_state SET fencing_epoch = fencing_epoch + 1 "
            "WHERE tenant = %s AND provider_id = %s",
            (tenant, pid),
        )

        def write() -> None:
            try:
                store.commit_batch(tenant, pid, "INBOX", 1, entries(1), 1, old)
                outcome.append(None)
            except FencedError as exc:
                outcome.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        time.sleep(0.3)
        assert outcome == []  # blocked on the row lock the takeover holds
        takeover.commit()
        writer.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], FencedError)
    assert store.known_uids(tenant, pid, "INBOX", 1, [1]) == {}
    assert config_row(pool, tenant, pid, "folder_state") == ({},)


# -- status, auth failures, pausing, leases ----------------------------------------------


def test_status_and_capabilities(pool: Pool, tenant: str) -> None:
    pid = add(pool, tenant)
    write_status(pool, tenant, pid, "error", "connection refused")
    assert provider_row(pool, tenant, pid, "status, error_message") == (
        "error",
        "connection refused",
    )
    assert config_row(pool, tenant, pid, "last_error") == ("connection refused",)
    write_status(pool, tenant, pid, "connected", None)
    assert provider_row(pool, tenant, pid, "status, error_message") == ("connected", None)
    with pytest.raises(ValueError, match="status"):
        write_status(pool, tenant, pid, "sleeping", None)
    writer = StatusWriter(pool)
    writer.connected(tenant, pid, ["IMAP4rev1", "IDLE", "UIDPLUS"])
    writer.flush()
    assert config_row(pool, tenant, pid, "server_capabilities") == (
        ["IMAP4rev1", "IDLE", "UIDPLUS"],
    )


def test_a_pause_through_the_status_writer_drops_a_pending_status(
    pool: Pool, store: Store, tenant: str
) -> None:
    pid = add(pool, tenant)
    writer = StatusWriter(pool)
    writer.status(tenant, pid, "connected", None)
    writer.paused(tenant, pid, "auth_failure", "refresh token rejected")
    writer.flush()
    assert provider_row(pool, tenant, pid, "status, error_message, inbound_pause_reason") == (
        "error", "refresh token rejected", "auth_failure",
    )  # fmt: skip
    assert config_row(pool, tenant, pid, "last_error") == ("refresh token rejected",)
    config = store.load_provider(tenant, pid)
    assert config is not None and config.paused
    with pytest.raises(ValueError, match="pause reason"):
        writer.paused(tenant, pid, "bored", "x")


def test_auth_failures_pause_at_the_threshold(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    cols = "inbound_auth_failure_count, inbound_pause_reason, status, inbound_auth_failure_code"
    assert store.record_auth_failure(tenant, pid, "imap:AUTHENTICATIONFAILED", 3) is False
    assert store.record_auth_failure(tenant, pid, "imap:AUTHENTICATIONFAILED", 3) is False
    assert provider_row(pool, tenant, pid, cols) == (2, None, "error", "imap:AUTHENTICATIONFAILED")
    assert store.record_auth_failure(tenant, pid, "imap:AUTHENTICATIONFAILED", 3) is True
    assert provider_row(pool, tenant, pid, cols)[:2] == (3, "auth_failure")
    assert store.record_auth_failure(tenant, pid, "imap:AUTHENTICATIONFAILED", 3) is False
    config = store.load_provider(tenant, pid)
    assert config is not None and config.paused and config.pause_reason == "auth_failure"
    store.resume(tenant, pid)
    cols2 = "inbound_auth_failure_count, inbound_paused_at, inbound_pause_reason"
    assert provider_row(pool, tenant, pid, cols2) == (0, None, None)


def test_clear_keeps_history(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    store.record_auth_failure(tenant, pid, "oauth:invalid_grant", 5)
    writer = StatusWriter(pool)
    writer.connected(tenant, pid, ["IDLE"])  # a login succeeded: the count resets
    writer.flush()
    count, code, last_at = provider_row(
        pool,
        tenant,
        pid,
        "inbound_auth_failure_count, inbound_auth_failure_code, inbound_auth_failure_last_at",
    )
    assert (count, code) == (0, "oauth:invalid_grant") and last_at is not None


def test_a_manual_pause_is_not_relabelled(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    store.pause(tenant, pid, "manual")
    assert store.record_auth_failure(tenant, pid, "x", 1) is False
    assert provider_row(pool, tenant, pid, "inbound_pause_reason") == ("manual",)
    with pytest.raises(ValueError, match="pause reason"):
        store.pause(tenant, pid, "bored")


def test_alga_lease_columns(pool: Pool, tenant: str) -> None:
    pid = add(pool, tenant)
    ownership = OwnershipStore(pool)
    assert ownership.mirror_leases([(tenant, pid, "pod-a/0")], 30) == 1
    assert ownership.mirror_leases([(tenant, pid, "pod-a/0")], 30) == 1
    assert config_row(pool, tenant, pid, "lease_owner") == ("shardworker:pod-a/0",)
    assert ownership.clear_leases(keep=[]) >= 1
    assert config_row(pool, tenant, pid, "lease_owner, lease_expires_at") == (None, None)
    sql(
        pool,
        "UPDATE imap_email_provider_config SET lease_owner = 'alga', "
        "lease_expires_at = now() + interval '30 seconds' WHERE tenant = %s",
        tenant,
    )
    assert ownership.mirror_leases([(tenant, pid, "pod-b/0")], 30) == 0  # never stolen
    assert (tenant, pid) in ownership.alga_leased()
    sql(
        pool,
        "UPDATE imap_email_provider_config SET lease_expires_at = now() - interval '1 second' "
        "WHERE tenant = %s",
        tenant,
    )
    assert ownership.mirror_leases([(tenant, pid, "pod-b/0")], 30) == 1


# -- pool --------------------------------------------------------------------------------


def test_open_pool_failure_names_host_never_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}/nowhere") as info:
        open_pool(f"postgresql://u:hunter2@127.0.0.1:{port}/nowhere", 1, timeout_s=0.5)
    assert "hunter2" not in str(info.value)


def test_pool_survives_server_side_disconnects(pg_dsn: str, tenant: str) -> None:
    with open_pool(pg_dsn, max_size=2) as own:
        pid = add(own, tenant)
        assert current_epoch(own, tenant, pid) == 0
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            # What a PostgreSQL restart does to every open connection of the pool.
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        assert acquire_epoch(own, tenant, pid, "pod") == 1
        assert own.get_stats().get("connections_lost", 0) >= 1


def test_commit_batch_throughput(pool: Pool, store: Store, tenant: str) -> None:
    pid = add(pool, tenant)
    epoch = acquire_epoch(pool, tenant, pid, "bench")
    batches, size = 40, 50
    start = time.perf_counter()
    for b in range(batches):
        uids = range(b * size + 1, (b + 1) * size + 1)
        store.known_uids(tenant, pid, "INBOX", 1, uids)
        store.commit_batch(tenant, pid, "INBOX", 1, entries(*uids), uids[-1], epoch)
    rate = batches * size / (time.perf_counter() - start)
    print(f"commit_batch+known_uids: {rate:.0f} msg/s in batches of {size}")
    assert rate > 2000
    assert len(store.known_uids(tenant, pid, "INBOX", 1, range(1, 2001))) == 2000
