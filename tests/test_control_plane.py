"""The incremental control plane against a real PostgreSQL and Redis, one leader in-process.

An unchanged cluster costs no full provider scan between reconciles and publishes
nothing; a change is picked up within a round and published as a delta; a lost published
state is repaired; a new leader starts from the published owners and moves nothing; a
changed share is noted on the member's note stream, and one blocking read ends on a note
or a command.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from shardworker.db.ownership import OwnershipStore
from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.pool.inbox import CommandInbox, command_stream, status_key
from shardworker.pool.leader import Leader
from shardworker.pool.registry import ASSIGNMENT, Registry, note_stream
from tests.admin_support import private_database
from tests.support import rig_settings

MEMBERS = ["pod-a/0", "pod-a/1", "pod-b/0", "pod-b/1"]


class Rig:
    def __init__(self, dsn: str, redis_url: str) -> None:
        self.dsn = dsn
        self.settings = rig_settings(dsn, redis_url, "", provider_reconcile_s="300",
                                     join_debounce_s="0", max_rebalance_moves="1000")  # fmt: skip
        self.redis = redis.Redis.from_url(redis_url)
        self.registry = Registry(self.redis)
        self.pool = open_pool(dsn, max_size=2)
        self.ownership = OwnershipStore(self.pool)
        self.now = [1000.0]
        self.tenant = str(uuid.uuid4())
        self.pids = [self.add() for _ in range(40)]

    def add(self, tenant: str | None = None) -> str:
        n = uuid.uuid4().hex[:10]
        return create_provider(
            self.pool, tenant=tenant or self.tenant, mailbox=f"{n}@example.com",
            host="127.0.0.1", port=1, secure=False, allow_starttls=False,
            auth_type="password", username=n,
        )  # fmt: skip

    def leader(self, name: str = "coord-a") -> Leader:
        return Leader(self.settings, self.registry, self.ownership, name,
                      clock=lambda: self.now[0])  # fmt: skip

    def heartbeat(self, members: list[str] = MEMBERS) -> None:
        for member in members:
            self.registry.heartbeat(member)

    def rounds(self, leader: Leader, n: int = 1, step_s: float = 1.0) -> None:
        for _ in range(n):
            self.heartbeat()
            leader.round()
            self.now[0] += step_s

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, args)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def rig(redis_url: str) -> Iterator[Rig]:
    with private_database() as dsn:
        made = Rig(dsn, redis_url)
        try:
            yield made
        finally:
            made.pool.close()
            made.redis.close()


def owners(rig: Rig) -> dict[str, str]:
    assignment = rig.registry.read_assignment()
    return {} if assignment is None else assignment.owners


def test_an_unchanged_cluster_scans_nothing_and_publishes_nothing(rig: Rig) -> None:
    leader = rig.leader()
    rig.rounds(leader, 3)
    assert len(owners(rig)) == 40 and rig.ownership.full_scans == 1
    version, ops = leader.stats.version, leader.stats.published_ops
    rig.rounds(leader, 30)  # half a minute of an unchanged cluster
    assert rig.ownership.full_scans == 1  # no full provider scan between reconciles
    assert (leader.stats.version, leader.stats.published_ops) == (version, ops)
    assert rig.registry.read_meta() == (version, leader.view.epoch if leader.view else -1)
    rig.now[0] += rig.settings.provider_reconcile_s
    rig.rounds(leader, 1)
    assert rig.ownership.full_scans == 2 and leader.stats.reconciles == 1
    assert leader.stats.version == version  # the reconcile found no drift


def test_changes_are_picked_up_within_a_round_as_a_delta(rig: Rig) -> None:
    leader = rig.leader()
    rig.rounds(leader, 2)
    before = owners(rig)
    new = rig.add()
    rig.sql("UPDATE email_providers SET inbound_paused_at = now(), updated_at = now(), "
            "inbound_pause_reason = 'manual' "
            "WHERE id = %s::uuid", rig.pids[0])  # fmt: skip
    rig.rounds(leader, 1)
    after = owners(rig)
    assert rig.ownership.full_scans == 1
    key_new, key_paused = f"{rig.tenant}:{new}", f"{rig.tenant}:{rig.pids[0]}"
    assert key_new in after and key_paused not in after
    # Nothing else moved, and the new provider's owner sees it in its share.
    assert {k: m for k, m in after.items() if k != key_new} == {
        k: m for k, m in before.items() if k != key_paused
    }
    share = rig.registry.member_assignment(after[key_new])
    assert share is not None and key_new in share.providers
    mirrored = rig.sql("SELECT lease_owner FROM imap_email_provider_config "
                       "WHERE email_provider_id = %s::uuid", new)  # fmt: skip
    assert mirrored == [("shardworker:" + after[key_new],)]


def test_a_departed_member_moves_exactly_its_providers(rig: Rig) -> None:
    leader = rig.leader()
    rig.rounds(leader, 2)
    before = owners(rig)
    gone = MEMBERS[0]
    rig.registry.leave(gone)
    leader.round()  # MEMBERS minus the departed one, without heartbeating it again
    after = owners(rig)
    moved = {k for k in after if after[k] != before[k]}
    assert moved == {k for k, m in before.items() if m == gone}
    assert gone not in after.values() and rig.registry.member_version(gone) is None


def test_a_lost_published_state_is_repaired(rig: Rig) -> None:
    leader = rig.leader()
    rig.rounds(leader, 2)
    before = owners(rig)
    rig.redis.delete(ASSIGNMENT, "sw:owners:0", "sw:owners:1")  # as after a partial loss
    rig.rounds(leader, 1)
    assert owners(rig) == before
    for member in MEMBERS:
        share = rig.registry.member_assignment(member)
        assert share is not None
        assert share.providers == {k for k, m in before.items() if m == member}


def test_a_new_leader_takes_over_the_published_owners_without_moving_any(rig: Rig) -> None:
    first = rig.leader("coord-a")
    rig.rounds(first, 2)
    before, version = owners(rig), first.stats.version
    first.stop()  # resigns
    second = rig.leader("coord-b")
    rig.rounds(second, 3)
    assert second.stats.is_leader and owners(rig) == before
    assert second.stats.moves.total() == 0
    assert rig.registry.read_meta() is not None
    assert second.stats.version in (version, version + 1)  # at most a new epoch, no moves


def test_two_tenants_with_one_provider_id_are_two_providers(rig: Rig) -> None:
    other = str(uuid.uuid4())
    create_provider(rig.pool, tenant=other, mailbox="twin@example.com", host="127.0.0.1",
                    port=1, secure=False, allow_starttls=False, auth_type="password",
                    username="twin", provider_id=rig.pids[1])  # fmt: skip
    leader = rig.leader()
    rig.rounds(leader, 2)
    found = owners(rig)
    assert f"{rig.tenant}:{rig.pids[1]}" in found and f"{other}:{rig.pids[1]}" in found
    assert len(found) == 41


def notes(rig: Rig, member: str) -> list[int]:
    entries = rig.redis.xrange(note_stream(member))
    return [int(fields[b"version"]) for _, fields in entries]


def test_a_changed_share_is_noted_with_its_version_and_a_departed_member_loses_its_notes(
    rig: Rig,
) -> None:
    leader = rig.leader()
    rig.rounds(leader, 2)
    for member in MEMBERS:  # the first publish gave every member its share
        assert notes(rig, member)[-1] == rig.registry.member_version(member)
    quiet = {m: notes(rig, m) for m in MEMBERS}
    rig.rounds(leader, 5)
    assert {m: notes(rig, m) for m in MEMBERS} == quiet  # nothing changed, nothing noted
    gone = MEMBERS[0]
    rig.registry.leave(gone)
    leader.round()
    assert rig.redis.exists(note_stream(gone)) == 0
    for member in MEMBERS[1:]:  # each took some of its providers
        assert notes(rig, member)[-1] == rig.registry.member_version(member) == leader.stats.version
        assert len(notes(rig, member)) <= 8


class NobodysProviders:
    def holds(self, provider: str) -> bool:
        return False

    def invalidate_configs(self) -> None:
        raise AssertionError("must not be called")


def test_one_blocking_read_ends_on_a_note_or_a_command_and_otherwise_at_the_timeout(
    rig: Rig,
) -> None:
    inbox = CommandInbox(rig.redis, None, None, "pod-x/0", owner=NobodysProviders())  # type: ignore[arg-type]
    stream = note_stream("pod-x/0")
    started = time.monotonic()
    assert inbox.wait(0.3, stream) is False
    assert time.monotonic() - started >= 0.25
    rig.redis.xadd(stream, {"version": "7"})
    started = time.monotonic()
    assert inbox.wait(5.0, stream) is True
    assert inbox.wait(0.2, stream) is False  # the same note does not wake it twice
    rig.registry.wake("pod-x/0", "drain")  # a member waking itself (drain, lost lease, stop)
    assert inbox.wait(5.0, stream) is True
    command = {
        "command_id": "e" * 32, "op": "reconnect", "tenant": str(uuid.uuid4()),
        "provider_id": str(uuid.uuid4()), "args": "{}", "created_at": str(time.time()),
    }  # fmt: skip
    rig.redis.xadd(command_stream("pod-x/0"), command)  # type: ignore[arg-type]
    assert inbox.wait(5.0, stream) is False  # a command ends the wait too, and is served
    assert time.monotonic() - started < 2.0
    assert rig.redis.hget(status_key("e" * 32), "state") == b"rejected"


def test_member_changes_are_incremental_steps_and_the_reconcile_finds_no_drift(rig: Rig) -> None:
    leader = rig.leader()
    rig.rounds(leader, 2)
    assert (leader.stats.full_plans, leader.stats.plans) == (1, 1)  # the first round's
    rig.registry.leave(MEMBERS[0])
    for live in (MEMBERS[1:], [*MEMBERS[1:], "pod-c/0"]):  # a loss, then a join
        rig.heartbeat(live)
        leader.round()
        rig.now[0] += 1.0
    view = leader.view
    assert view is not None and view.placement is not None
    assert (leader.stats.full_plans, leader.stats.plans) == (1, 3)
    assert "pod-c/0" in view.owners.values() and MEMBERS[0] not in view.owners.values()
    assert owners(rig) == view.owners
    assert view.placement.drift(view.providers, view.owners) == 0
    version = leader.stats.version
    rig.now[0] += rig.settings.provider_reconcile_s
    rig.heartbeat([*MEMBERS[1:], "pod-c/0"])
    leader.round()
    assert leader.stats.full_plans == 2 and leader.stats.drift == 0
    assert leader.stats.version == version  # the full plan agreed with the steps


def test_a_reconcile_rebuilds_a_planner_state_that_drifted(rig: Rig) -> None:
    leader = rig.leader()
    rig.rounds(leader, 2)
    view = leader.view
    assert view is not None and view.placement is not None
    view.placement.remove([next(iter(view.providers))])  # as a bug would leave it
    rig.now[0] += rig.settings.provider_reconcile_s
    rig.rounds(leader, 1)
    assert leader.stats.drift >= 1 and leader.stats.full_plans == 2
    assert view.placement is not None and view.placement.drift(view.providers, view.owners) == 0
    assert owners(rig) == view.owners and set(view.owners) == view.providers
