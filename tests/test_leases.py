"""Leases, fencing and the registry against the real Redis and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from shardworker.db.ownership import OwnershipStore
from shardworker.db.providers import create_provider
from shardworker.db.store import LedgerEntry, Store, open_pool
from shardworker.errors import FencedError, LeaseLostError
from shardworker.pool.leases import LeaseManager, lease_key
from shardworker.pool.registry import Assignment, Registry
from shardworker.sink.base import Outbound
from shardworker.sink.redis_streams import RedisStreamsSink
from tests.support import rig_settings


@pytest.fixture
def env(migrated_dsn: str, redis_url: str) -> Iterator[dict[str, Any]]:
    pool = open_pool(migrated_dsn, max_size=4)
    client = redis.Redis.from_url(redis_url)
    tenant = str(uuid.uuid4())
    pids = [
        create_provider(
            pool,
            tenant=tenant,
            mailbox=f"m{i}@example.com",
            host="127.0.0.1",
            port=1,
            secure=True,
            allow_starttls=False,
            auth_type="password",
            username=f"u{i}",
        )
        for i in range(3)
    ]
    yield {"pool": pool, "redis": client, "tenant": tenant, "pids": pids,
           "ownership": OwnershipStore(pool), "store": Store(pool),
           "settings": rig_settings(migrated_dsn, redis_url, "")}  # fmt: skip
    client.close()
    pool.close()


def manager(env: dict[str, Any], member: str, ttl_s: float = 5.0, **kw: Any) -> LeaseManager:
    return LeaseManager(env["redis"], env["ownership"], member, ttl_s, **kw)


def test_a_lease_has_one_holder_and_a_final_token(env: dict[str, Any]) -> None:
    a, b = manager(env, "pod-a/0"), manager(env, "pod-b/0")
    items = [(env["tenant"], p) for p in env["pids"]]
    got = a.acquire(items)
    assert [x.provider_id for x in got] == env["pids"]
    assert b.acquire(items) == []
    for lease in got:
        assert env["redis"].get(lease.key).decode() == f"pod-a/0|{lease.epoch}"
    assert a.renew() == []


def test_a_stale_owner_can_neither_publish_nor_checkpoint(env: dict[str, Any]) -> None:
    tenant, pid = env["tenant"], env["pids"][0]
    a, b = manager(env, "pod-a/0", ttl_s=0.3), manager(env, "pod-b/0")
    [old] = a.acquire([(tenant, pid)])
    time.sleep(0.45)  # a is paused past its TTL (as under SIGSTOP)
    [new] = b.acquire([(tenant, pid)])
    assert new.epoch == old.epoch + 1
    publisher = RedisStreamsSink(env["redis"], env["settings"])
    out = Outbound(tenant=tenant, provider_id=pid, mailbox="m0@example.com", folder="INBOX",
                   uid_validity=1, uid=7, message_id="<stale@example.com>",
                   payload={"tenantId": tenant}, event_time=datetime.now(UTC))  # fmt: skip
    with pytest.raises(FencedError):
        publisher.publish_batch([out], old.fence)
    assert env["redis"].xlen("workflow:events:global") == 0
    store: Store = env["store"]
    entry = LedgerEntry(7, "<stale@example.com>", "1-0", "published")
    with pytest.raises(FencedError):
        store.commit_batch(tenant, pid, "INBOX", 1, [entry], 7, old.epoch)
    assert store.known_uids(tenant, pid, "INBOX", 1, [7]) == {}
    # The new owner goes through, and the old one learns it lost the lease.
    publisher.publish_batch([out], new.fence)
    store.commit_batch(tenant, pid, "INBOX", 1, [entry], 7, new.epoch)
    assert [x.provider_id for x in a.renew()] == [pid]


def test_release_never_deletes_a_successors_lease(env: dict[str, Any]) -> None:
    tenant, pid = env["tenant"], env["pids"][1]
    a, b = manager(env, "pod-a/0", ttl_s=0.2), manager(env, "pod-b/0")
    a.acquire([(tenant, pid)])
    time.sleep(0.3)
    [lease] = b.acquire([(tenant, pid)])
    assert a.holds(f"{tenant}:{pid}")  # a has not noticed yet
    assert a.release([f"{tenant}:{pid}"]) == 0
    assert env["redis"].get(lease_key(tenant, pid)).decode() == lease.token


def test_renewal_is_one_small_call_from_the_record_in_redis(env: dict[str, Any]) -> None:
    a = manager(env, "pod-a/0")
    got = a.acquire([(env["tenant"], p) for p in env["pids"]])
    record = env["redis"].hgetall(a.held_key)
    assert {k.decode(): v.decode() for k, v in record.items()} == {x.key: x.token for x in got}
    env["redis"].delete(got[0].key)  # lost behind our back
    lost = a.renew()
    assert [x.key for x in lost] == [got[0].key]
    assert got[0].key.encode() not in env["redis"].hgetall(a.held_key)
    env["redis"].hdel(a.held_key, got[1].key)  # the record disagrees: renewed by name
    assert a.renew() == [] and got[1].key.encode() in env["redis"].hgetall(a.held_key)
    assert a.release([got[1].provider, got[2].provider]) == 2
    assert env["redis"].hgetall(a.held_key) == {}
    # A restarted member (same id) drops the previous incarnation's record at once.
    env["redis"].hset(a.held_key, "sw:lease:x:y", "pod-a/0|9")
    fresh = manager(env, "pod-a/0")
    fresh.acquire([(env["tenant"], env["pids"][0])])
    assert b"sw:lease:x:y" not in env["redis"].hgetall(fresh.held_key)


def test_the_same_provider_id_in_two_tenants_is_two_leases(env: dict[str, Any]) -> None:
    pid, tenants = str(uuid.uuid4()), [env["tenant"], str(uuid.uuid4())]
    a, b = manager(env, "pod-a/0"), manager(env, "pod-b/0")
    [first] = a.acquire([(tenants[0], pid)])
    [second] = b.acquire([(tenants[1], pid)])  # not blocked by the other tenant's lease
    assert first.key != second.key and {first.epoch, second.epoch} == {1}
    assert a.holds(f"{tenants[0]}:{pid}") and not a.holds(f"{tenants[1]}:{pid}")
    assert a.release([f"{tenants[1]}:{pid}"]) == 0  # not a's: nothing released
    assert env["redis"].get(second.key).decode() == second.token
    assert a.release([f"{tenants[0]}:{pid}"]) == 1
    assert env["redis"].get(first.key) is None and b.renew() == []


def test_leases_count_as_lost_when_renewals_fail_past_the_ttl(env: dict[str, Any]) -> None:
    now = [100.0]
    a = manager(env, "pod-a/0", ttl_s=5.0, clock=lambda: now[0])
    a.acquire([(env["tenant"], p) for p in env["pids"]])
    a.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # Redis unreachable from here
    a._renew = a.client.register_script("return 1")
    a._renew_held = a.client.register_script("return 1")
    now[0] += 4.0
    assert a.renew() == []  # still within the TTL: keep serving
    now[0] += 1.5
    assert sorted(x.provider_id for x in a.renew()) == sorted(env["pids"])
    assert a.held() == {}


def test_one_leader_at_a_time_and_a_deposed_one_cannot_publish(env: dict[str, Any]) -> None:
    reg = Registry(env["redis"])
    a = reg.elect("pod-a", 0.3, None)
    assert a is not None and a.startswith("pod-a|")
    assert reg.elect("pod-b", 0.3, None) is None
    assert reg.elect("pod-a", 0.3, a) == a
    time.sleep(0.4)
    b = reg.elect("pod-b", 5.0, None)
    assert b is not None and int(b.split("|")[1]) > int(a.split("|")[1])
    with pytest.raises(LeaseLostError):
        reg.publish(a, Assignment(1, 1, {"p": "pod-a/0"}), ["pod-a/0"], [])
    assert reg.read_assignment() is None
    reg.publish(b, Assignment(1, 2, {"p": "pod-b/0"}), ["pod-b/0"], [])
    share = reg.member_assignment("pod-b/0")
    assert share is not None and share.providers == frozenset({"p"})


def test_members_live_within_the_grace_period(env: dict[str, Any]) -> None:
    reg = Registry(env["redis"])
    reg.heartbeat("pod-a/0")
    reg.heartbeat("pod-b/0")
    assert reg.live_members(0.5) == ["pod-a/0", "pod-b/0"]
    time.sleep(0.6)
    reg.heartbeat("pod-b/0")
    assert reg.live_members(0.5) == ["pod-b/0"]
    reg.leave("pod-b/0")
    assert reg.live_members(0.5) == []


@pytest.mark.timeout(30)
def test_a_silent_redis_cannot_hold_a_renewal_past_the_ttl(env: dict[str, Any]) -> None:
    # A partition drops packets: connect() succeeds here, and no reply ever comes.
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        a = manager(env, "pod-a/0", ttl_s=1.0)
        a.acquire([(env["tenant"], p) for p in env["pids"]])
        a.client = redis.Redis(port=silent.getsockname()[1], socket_timeout=20)
        a._renew = a.client.register_script("return 1")
        a._renew_held = a.client.register_script("return 1")
        started = time.monotonic()
        lost = []
        while len(lost) < len(env["pids"]) and time.monotonic() - started < 10:
            lost += a.renew()
        took = time.monotonic() - started
        assert sorted(x.provider_id for x in lost) == sorted(env["pids"])
        assert took < 1.5, f"renewal blocked {took:.1f}s past a 1 s TTL (socket timeout 20 s)"
        assert a.renew() == []  # nothing held; the stuck call is not waited for again
    finally:
        silent.close()


class _FailingEpochs(OwnershipStore):
    """PostgreSQL refusing the epoch step once (a pool timeout under load)."""

    def __init__(self, inner: OwnershipStore) -> None:
        self.__dict__.update(inner.__dict__)
        self.failures = 1

    def acquire_epochs(self, items: Any, owner: str) -> dict[tuple[str, str], int]:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("epoch step failed")
        return super().acquire_epochs(items, owner)


def test_a_failed_epoch_step_leaves_no_provisional_lease_behind(env: dict[str, Any]) -> None:
    """Else the provisional tokens keep every member off the providers for a whole TTL
    (a graceful handoff waited 20 s for them)."""
    items = [(env["tenant"], p) for p in env["pids"]]
    a = LeaseManager(env["redis"], _FailingEpochs(env["ownership"]), "pod-a/0", 30.0)
    with pytest.raises(RuntimeError, match="epoch step failed"):
        a.acquire(items)
    assert [env["redis"].get(lease_key(t, p)) for t, p in items] == [None] * len(items)
    got = manager(env, "pod-b/0").acquire(items)
    assert len(got) == len(items)


class _SlowEpochs(OwnershipStore):
    """PostgreSQL taking its time over the epoch step (a loaded database)."""

    def __init__(self, inner: OwnershipStore, delay_s: float) -> None:
        self.__dict__.update(inner.__dict__)
        self.delay_s = delay_s

    def acquire_epochs(self, items: Any, owner: str) -> dict[tuple[str, str], int]:
        time.sleep(self.delay_s)
        return super().acquire_epochs(items, owner)


def test_a_lease_counts_from_its_swap_and_never_outlives_its_key(env: dict[str, Any]) -> None:
    """A slow epoch step must not eat the lease's validity (at a cold start of a million
    leases it made leases lapse locally before their first renewal), and the local
    validity must still end no later than the key does in Redis."""
    items = [(env["tenant"], p) for p in env["pids"]]
    ttl_s, delay_s = 2.0, 1.2
    a = LeaseManager(env["redis"], _SlowEpochs(env["ownership"], delay_s), "pod-a/0", ttl_s)
    started = time.monotonic()
    got = a.acquire(items)
    assert len(got) == len(items)
    for lease in got:
        # From the swap (after the delay), not from the SET NX before it.
        assert lease.valid_until >= started + delay_s + ttl_s
        remaining_ms = env["redis"].pttl(lease_key(lease.tenant, lease.provider_id))
        read_by = time.monotonic()  # the key lives at least remaining_ms past this
        assert remaining_ms >= (lease.valid_until - read_by) * 1000 - 2, (remaining_ms, lease)
    time.sleep(ttl_s - delay_s + 0.1)  # past the TTL as counted from the SET NX
    assert a.expire_local() == [], "a lease counted from its SET NX lapsed although Redis holds it"
    assert all(env["redis"].exists(lease_key(t, p)) for t, p in items)
