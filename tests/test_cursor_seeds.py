"""First-sync cursor seeds in groups (issue 14, cold start): one transaction for many
folders, each seed still fenced and answered on its own."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from shardworker.db.migrate import migrate
from shardworker.db.ownership import OwnershipStore
from shardworker.db.seeds import CursorSeeder, write_group
from shardworker.db.store import CursorSeed, FolderCursor, Pool, Store, open_pool
from shardworker.errors import FencedError, StoreError
from tests.test_store import add, config_row

pytestmark = pytest.mark.timeout(60)


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


def epoch_of(pool: Pool, tenant: str, pid: str, owner: str) -> int:
    return OwnershipStore(pool).acquire_epochs([(tenant, pid)], owner)[tenant, pid]


def cursors(store: Store, tenant: str, pid: str) -> dict[str, FolderCursor]:
    config = store.load_provider(tenant, pid)
    assert config is not None
    return dict(config.cursors)


def test_one_call_seeds_many_folders_each_fenced_on_its_own(
    pool: Pool, store: Store, tenant: str
) -> None:
    a, b, stale = add(pool, tenant), add(pool, tenant), add(pool, tenant)
    epoch_a = epoch_of(pool, tenant, a, "pod-a")
    old = epoch_of(pool, tenant, stale, "pod-a")
    epoch_of(pool, tenant, stale, "pod-b")  # the provider moved on: `old` is stale
    before = config_row(pool, tenant, stale, "folder_state, updated_at")
    seeds = [
        CursorSeed(tenant, a, "INBOX", 7, 41, epoch_a),
        CursorSeed(tenant, stale, "INBOX", 7, 99, old),
        CursorSeed(tenant, a, "Sent", 8, 3, epoch_a),  # a second folder of the same row
        CursorSeed(tenant, b, "INBOX", 9, 0, None),  # unfenced
    ]
    assert store.seed_cursors(seeds) == [True, False, True, True]
    assert cursors(store, tenant, a) == {"INBOX": FolderCursor(7, 41), "Sent": FolderCursor(8, 3)}
    assert config_row(pool, tenant, a, "uid_validity, last_uid") == ("7", "41")  # INBOX mirror
    assert cursors(store, tenant, b) == {"INBOX": FolderCursor(9, 0)}
    assert config_row(pool, tenant, stale, "folder_state, updated_at") == before


def test_concurrent_seeds_share_transactions_and_each_waits_for_its_own(
    pool: Pool, store: Store, tenant: str
) -> None:
    pids = [add(pool, tenant) for _ in range(24)]
    seeder = CursorSeeder(store)
    seen: dict[str, object] = {}
    start = threading.Barrier(len(pids))

    def seed(i: int, pid: str) -> None:
        start.wait()
        try:
            seeder.seed(CursorSeed(tenant, pid, "INBOX", 3, i, None))
            # Returned: the cursor is committed and visible to anyone.
            seen[pid] = cursors(Store(pool), tenant, pid)["INBOX"]
        except Exception as exc:  # reported by the assertion below
            seen[pid] = exc

    threads = [threading.Thread(target=seed, args=(i, p)) for i, p in enumerate(pids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen == {pid: FolderCursor(3, i) for i, pid in enumerate(pids)}
    assert seeder.seeds == len(pids)
    assert seeder.groups < len(pids), "every seed had a transaction of its own"


def test_a_stale_fence_fails_only_its_own_seed(pool: Pool, store: Store, tenant: str) -> None:
    good, moved = add(pool, tenant), add(pool, tenant)
    epoch = epoch_of(pool, tenant, good, "pod-a")
    old = epoch_of(pool, tenant, moved, "pod-a")
    epoch_of(pool, tenant, moved, "pod-b")
    seeder = CursorSeeder(store)
    with pytest.raises(FencedError, match=f"epoch {old} is stale"):
        seeder.seed(CursorSeed(tenant, moved, "INBOX", 1, 5, old))
    seeder.seed(CursorSeed(tenant, good, "INBOX", 1, 5, epoch))
    assert cursors(store, tenant, good) == {"INBOX": FolderCursor(1, 5)}
    assert cursors(store, tenant, moved) == {}


def test_a_group_that_fails_as_a_whole_is_retried_seed_by_seed(
    pool: Pool, store: Store, tenant: str
) -> None:
    """A row PostgreSQL refuses (here a tenant that is no uuid) fails its own seed only."""
    ok = add(pool, tenant)
    bad = CursorSeed("not-a-uuid", ok, "INBOX", 1, 1, None)
    errors = write_group(store, [bad, CursorSeed(tenant, ok, "INBOX", 2, 4, None)])
    assert isinstance(errors[0], StoreError) and "not written" in str(errors[0])
    assert errors[1] is None
    assert cursors(store, tenant, ok) == {"INBOX": FolderCursor(2, 4)}
