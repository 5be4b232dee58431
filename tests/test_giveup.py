"""A member cut off from PostgreSQL gives its providers up (pool/dbwatch.py, pool/agent.py).

The probe (and the leader) against the real PostgreSQL through a fault proxy that black-holes it (a
partition: bytes held, nothing refused); the agent with the real Redis registry and leases
and the real PostgreSQL epochs, a recording engine, and a probe whose answer the test sets
(the agent only asks ``healthy()`` and ``down_for()``).
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from shardworker.db.models import provider_key
from shardworker.db.ownership import OwnershipStore
from shardworker.db.providers import create_provider
from shardworker.db.store import ProviderConfig, Store, open_pool
from shardworker.engine.loop import Engine
from shardworker.pool.agent import PoolAgent
from shardworker.pool.dbwatch import DatabaseWatch
from shardworker.pool.leader import Leader
from shardworker.pool.leases import LeaseManager, lease_key
from shardworker.pool.registry import Assignment, Registry
from shardworker.sink.base import Fence
from tests.faultproxy import FaultProxy
from tests.support import rig_settings, wait_until

pytestmark = pytest.mark.timeout(60)

ME, PEER = "pod-c/0", "pod-a/0"


def _via(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


def test_the_probe_counts_an_unanswered_query_as_failed_after_its_deadline(
    migrated_dsn: str,
) -> None:
    """A black hole behind a peer that acknowledges (here a proxy; a connection pooler cut
    off from PostgreSQL) is invisible to TCP's bounds: the overdue probe is the signal.
    (A silent link itself is tests/test_pg_link.py.)"""
    pg_port = urlsplit(migrated_dsn).port or 5432
    with FaultProxy("127.0.0.1", pg_port) as proxy:
        watch = DatabaseWatch(_via(migrated_dsn, proxy.port), every_s=0.1, deadline_s=2.0)
        watch.start()
        try:
            wait_until(lambda: watch.probes >= 2 and watch.healthy())
            proxy.blackhole(60)
            started = time.monotonic()
            wait_until(lambda: not watch.healthy(), timeout_s=10)
            took = time.monotonic() - started
            assert 1.8 <= took < 2.0 + 0.1 + 2.5, f"noticed after {took:.1f}s"
            wait_until(lambda: watch.down_for() > 3.0, timeout_s=5)
            down_s = watch.down_for()
            assert watch.ok_age() >= down_s  # read after: the clock only moves on
            proxy.heal()  # the held query is answered: the probe succeeds
            wait_until(lambda: watch.healthy() and watch.down_for() == 0.0, timeout_s=10)
            assert watch.failures == 0  # nothing failed: one probe was late
        finally:
            watch.stop()


def test_a_refused_probe_fails_at_once_and_counts(migrated_dsn: str) -> None:
    pg_port = urlsplit(migrated_dsn).port or 5432
    with FaultProxy("127.0.0.1", pg_port) as proxy:
        watch = DatabaseWatch(_via(migrated_dsn, proxy.port), every_s=0.1, deadline_s=2.0)
        try:
            assert watch.probe_once() and watch.down_for() == 0.0
            proxy.drop(30)  # every connection reset, new ones too
            assert not watch.probe_once() and not watch.probe_once()
            assert not watch.healthy() and watch.down_for() > 0.0
            proxy.heal()
            assert watch.probe_once() and watch.healthy()
            assert (watch.probes, watch.failures) == (4, 2)
        finally:
            watch.stop()


@dataclass
class Probe:
    """What the agent asks of a DatabaseWatch, answered by the test: ``down_s`` > 0 means
    the probe has been failing since that long ago (its last success)."""

    down_s: float = 0.0

    def healthy(self) -> bool:
        return self.down_s == 0.0

    def down_for(self) -> float:
        return self.down_s

    def ok_age(self) -> float:
        return self.down_s

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class RecordingEngine:
    """The two calls the agent makes of the engine; a drop records whether the lease was
    still in Redis at that moment."""

    client: redis.Redis
    served: list[list[str]] = field(default_factory=list)
    dropped: list[tuple[str, bool]] = field(default_factory=list)

    def update_providers(
        self, configs: Sequence[ProviderConfig], fences: Mapping[str, Fence] | None = None
    ) -> None:
        self.served.append(sorted(c.key for c in configs))

    def drop_provider_now(self, key: str, reason: str = "lease_lost") -> None:
        tenant, pid = key.split(":")
        self.dropped.append((key, bool(self.client.exists(lease_key(tenant, pid)))))


def _provider(pool: Any, tenant: str, i: int) -> str:
    return create_provider(
        pool, tenant=tenant, mailbox=f"g{i}@example.com", host="127.0.0.1", port=1,
        secure=True, allow_starttls=False, auth_type="password", username=f"g{i}",
    )  # fmt: skip


@pytest.fixture
def rig(migrated_dsn: str, redis_url: str) -> Iterator[dict[str, Any]]:
    pool = open_pool(migrated_dsn, max_size=4)
    client = redis.Redis.from_url(redis_url)
    tenant = str(uuid.uuid4())
    pids = [_provider(pool, tenant, i) for i in range(3)]
    keys = [provider_key(tenant, p) for p in pids]
    settings = rig_settings(migrated_dsn, redis_url, "", lease_ttl_s="6", lease_renew_s="1")
    registry = Registry(client)
    token = registry.elect("pod-a", 30, None)
    assert token is not None
    registry.publish(token, Assignment(1, 1, dict.fromkeys(keys, ME)), [ME, PEER], [])
    probe = Probe()
    engine = RecordingEngine(client)
    leases = LeaseManager(client, OwnershipStore(pool), ME, settings.lease_ttl_s)
    agent = PoolAgent(
        settings, ME, registry=registry, leases=leases, store=Store(pool),
        engine=cast(Engine, engine), released=queue.SimpleQueue(),
        database=cast(DatabaseWatch, probe),
    )  # fmt: skip
    agent.assign_once()
    assert engine.served == [sorted(keys)] and len(leases.held()) == 3
    registry.heartbeat(ME, 0.0)
    yield {"agent": agent, "probe": probe, "engine": engine, "registry": registry,
           "client": client, "keys": keys, "tenant": tenant, "pids": pids}  # fmt: skip
    client.close()
    pool.close()


def test_a_member_without_postgres_releases_its_leases_then_drops_its_providers(
    rig: dict[str, Any],
) -> None:
    agent, probe, engine, registry = rig["agent"], rig["probe"], rig["engine"], rig["registry"]
    registry.heartbeat(PEER, 0.0)  # a member whose PostgreSQL works
    probe.down_s = 5.0  # less than the 6 s TTL: keep everything
    agent.check_database()
    assert not agent.given_up.is_set() and len(agent.leases.held()) == 3
    probe.down_s = 6.5
    agent.check_database()
    assert agent.given_up.is_set()
    assert ME not in registry.live_members(60), "still a member: the leader would not move"
    assert ME not in registry.members_with_database(60)
    assert agent.leases.held() == {}
    assert not any(rig["client"].exists(lease_key(rig["tenant"], p)) for p in rig["pids"])
    # Released before the drop: whatever the engine still publishes is fenced.
    assert sorted(engine.dropped) == sorted((k, False) for k in rig["keys"])


def test_a_member_that_gave_up_takes_nothing_until_its_postgres_answers(
    rig: dict[str, Any],
) -> None:
    agent, probe, engine, registry = rig["agent"], rig["probe"], rig["engine"], rig["registry"]
    registry.heartbeat(PEER, 0.0)
    probe.down_s = 7.0
    agent.check_database()
    served = len(engine.served)
    agent.assign_once()  # its share still names its providers (the leader has not moved them)
    assert agent.leases.held() == {} and len(engine.served) == served
    probe.down_s = 0.0
    agent.check_database()
    assert not agent.given_up.is_set()
    agent.assign_once()
    assert len(agent.leases.held()) == 3 and engine.served[-1] == sorted(rig["keys"])


def test_a_member_whose_probe_fails_heartbeats_on_with_an_ageing_database_stamp(
    rig: dict[str, Any],
) -> None:
    """Heartbeats are its Redis liveness (a PostgreSQL blip moves nothing); the stamp says
    when its PostgreSQL last answered, which is what a peer's give-up asks."""
    agent, probe, registry = rig["agent"], rig["probe"], rig["registry"]
    probe.down_s = 1.0  # failing, not yet for a lease TTL
    agent.start()  # heartbeats every lease_renew_s (1 s)
    try:
        time.sleep(1.5)
        probe.down_s = 3.0
        time.sleep(1.2)
        assert ME in registry.live_members(1.5)
        assert ME not in registry.members_with_database(2.5)
        probe.down_s = 0.0
        wait_until(lambda: ME in registry.members_with_database(0.5), timeout_s=5)
    finally:
        agent.stop()


def test_nobody_gives_up_when_no_other_member_has_a_working_postgres(
    rig: dict[str, Any],
) -> None:
    """PostgreSQL down for everyone: nobody could checkpoint, so nothing moves."""
    agent, probe, registry = rig["agent"], rig["probe"], rig["registry"]
    registry.heartbeat(PEER, 5.0)  # alive, but its PostgreSQL last answered 5 s ago
    probe.down_s = 30.0
    agent.check_database()
    assert not agent.given_up.is_set() and len(agent.leases.held()) == 3
    registry.heartbeat(PEER, 0.0)
    agent.check_database()
    assert agent.given_up.is_set()


def test_a_leader_without_postgres_resigns_and_stands_again_once_it_answers(
    migrated_dsn: str, redis_url: str
) -> None:
    """Its lease renews through Redis: without resigning, a leader cut off from PostgreSQL
    would stay leader, unable to read a provider change or move a provider."""
    client = redis.Redis.from_url(redis_url)
    now = [0.0]
    settings = rig_settings(migrated_dsn, redis_url, "", leader_ttl_s="4")
    pg_port = urlsplit(migrated_dsn).port or 5432
    with FaultProxy("127.0.0.1", pg_port) as proxy:
        pool = open_pool(_via(migrated_dsn, proxy.port), 2, timeout_s=1.0)
        registry = Registry(client)
        leader = Leader(settings, registry, OwnershipStore(pool), "pod-x", clock=lambda: now[0])
        try:
            leader.run_round()
            assert leader.token is not None and registry.current_leader() == leader.token
            proxy.drop(60)  # every connection reset, new ones too
            now[0] += 1.0
            leader.run_round()  # fails, but for less than the leader TTL: still leading
            assert leader.token is not None and not leader.sitting_out
            now[0] += 4.0
            leader.run_round()
            assert leader.token is None and leader.sitting_out
            assert registry.current_leader() is None, "resigned: another may be elected"
            now[0] += 1.0
            leader.run_round()
            assert registry.current_leader() is None, "stood for election without PostgreSQL"
            proxy.heal()
            now[0] += 1.0
            wait_until(lambda: _round_elects(leader), timeout_s=15, every_s=0.2)
            assert not leader.sitting_out
        finally:
            pool.close()
            client.close()


def _round_elects(leader: Leader) -> bool:
    leader.run_round()
    return leader.token is not None
