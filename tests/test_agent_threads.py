"""The agent's threads against each other: a stopping member gives back every lease, even
one an assign round was still taking; a heartbeat stuck in Redis never holds a renewal.

The agent with the real Redis registry and leases and the real PostgreSQL epochs, a null
engine, and a lease manager or registry whose calls the test holds.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, cast

import pytest
import redis

from shardworker.db.models import provider_key
from shardworker.db.ownership import OwnershipStore
from shardworker.db.providers import create_provider
from shardworker.db.store import ProviderConfig, Store, open_pool
from shardworker.engine.loop import Engine
from shardworker.pool.agent import PoolAgent
from shardworker.pool.leases import Lease, LeaseManager, lease_key
from shardworker.pool.registry import Assignment, Registry
from shardworker.sink.base import Fence
from tests.support import rig_settings, wait_until

pytestmark = pytest.mark.timeout(60)

ME = "pod-b/0"


class HeldAcquire(LeaseManager):
    """Each acquisition waits for ``proceed`` before it starts."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.entered = threading.Event()
        self.proceed = threading.Event()

    def acquire(self, wanted: Sequence[tuple[str, str]]) -> list[Lease]:
        self.entered.set()
        self.proceed.wait(10)
        return super().acquire(wanted)


class NullEngine:
    def update_providers(
        self, configs: Sequence[ProviderConfig], fences: Mapping[str, Fence] | None = None
    ) -> None:
        pass

    def drop_provider_now(self, key: str, reason: str = "lease_lost") -> None:
        pass

    def request_stop(self) -> None:
        pass


def _provider(pool: Any, tenant: str, i: int) -> str:
    return create_provider(
        pool, tenant=tenant, mailbox=f"s{i}@example.com", host="127.0.0.1", port=1,
        secure=True, allow_starttls=False, auth_type="password", username=f"s{i}",
    )  # fmt: skip


def _agent(
    settings: Any, registry: Registry, leases: LeaseManager, pool: Any, *, tenant: str,
    pids: list[str],
) -> PoolAgent:  # fmt: skip
    """The agent of ``ME``, published as the owner of ``pids`` by a leader."""
    token = registry.elect("pod-a", 30, None)
    assert token is not None
    owners = {provider_key(tenant, p): ME for p in pids}
    registry.publish(token, Assignment(1, 1, owners), [ME], [])
    return PoolAgent(
        settings, ME, registry=registry, leases=leases, store=Store(pool),
        engine=cast(Engine, NullEngine()), released=queue.SimpleQueue(),
    )  # fmt: skip


def test_stop_releases_the_leases_an_assign_round_took_while_it_stopped(
    migrated_dsn: str, redis_url: str
) -> None:
    pool = open_pool(migrated_dsn, max_size=4)
    client = redis.Redis.from_url(redis_url)
    try:
        tenant = str(uuid.uuid4())
        pids = [_provider(pool, tenant, i) for i in range(3)]
        settings = rig_settings(migrated_dsn, redis_url, "", lease_ttl_s="30")
        registry = Registry(client)
        leases = HeldAcquire(client, OwnershipStore(pool), ME, settings.lease_ttl_s)
        agent = _agent(settings, registry, leases, pool, tenant=tenant, pids=pids)
        agent.start()
        assert leases.entered.wait(10), "the assigner never tried to acquire"
        stopper = threading.Thread(target=agent.stop, kwargs={"timeout_s": 10.0})
        stopper.start()
        wait_until(agent._stop.is_set, timeout_s=5)
        leases.proceed.set()  # the round goes on and takes the leases
        stopper.join(15)
        assert not stopper.is_alive()
        left = [client.get(lease_key(tenant, p)) for p in pids]
        assert left == [None] * len(pids), "leases left to their 30 s TTL after stop"
    finally:
        client.close()
        pool.close()


class StuckHeartbeat(Registry):
    """Every heartbeat after the first blocks until ``release`` (a Redis gone silent for
    that one call)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.beats = 0
        self.release = threading.Event()

    def heartbeat(self, member: str, database_ok_age_s: float | None = None) -> None:
        self.beats += 1
        if self.beats > 1:
            self.release.wait(30)
        super().heartbeat(member, database_ok_age_s)


def test_a_heartbeat_stuck_in_redis_does_not_hold_the_renewals(
    migrated_dsn: str, redis_url: str
) -> None:
    pool = open_pool(migrated_dsn, max_size=4)
    client = redis.Redis.from_url(redis_url)
    registry = StuckHeartbeat(client)
    try:
        tenant = str(uuid.uuid4())
        pids = [_provider(pool, tenant, i) for i in range(3)]
        settings = rig_settings(migrated_dsn, redis_url, "", lease_ttl_s="2",
                                lease_renew_s="0.3")  # fmt: skip
        leases = LeaseManager(client, OwnershipStore(pool), ME, settings.lease_ttl_s)
        agent = _agent(settings, registry, leases, pool, tenant=tenant, pids=pids)
        agent.start()
        try:
            wait_until(lambda: leases.count() == 3, timeout_s=10)
            wait_until(lambda: registry.beats > 1, timeout_s=5)  # now stuck
            time.sleep(3 * settings.lease_ttl_s)
            assert registry.beats == 2, "the heartbeat thread was not stuck"
            assert leases.count() == 3, "renewals waited behind the stuck heartbeat"
            assert all(client.pttl(lease_key(tenant, p)) > 0 for p in pids)
        finally:
            registry.release.set()
            agent.stop()
    finally:
        client.close()
        pool.close()
