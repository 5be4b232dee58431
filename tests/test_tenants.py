"""Two tenants whose providers share one provider id, served by a real pool.

Alga's provider ids are unique only within a tenant.  The pool identifies a provider by
``(tenant, provider_id)`` everywhere: both are assigned, leased, mirrored into Alga's lease
columns and served with their own login, and an admin command for one never reaches the
other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from shardworker.admin.service import AdminService
from shardworker.db.providers import create_provider
from shardworker.db.store import open_pool
from shardworker.secrets.store import SecretStore, secret_name
from tests.admin_support import private_database
from tests.harness.dovecot import Dovecot
from tests.pool_support import Cluster

SHARED_ID = str(uuid.uuid4())


class Twins:
    """The cluster and the two tenants' providers (same id, different mailboxes)."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.tenants = [str(uuid.uuid4()), str(uuid.uuid4())]
        self.users: dict[str, str] = {}
        with open_pool(cluster.settings.database_url, max_size=2) as pool:
            secrets = SecretStore(cluster.settings, pool)
            for tenant in self.tenants:
                user, password = cluster.dovecot.add_user()
                create_provider(
                    pool, tenant=tenant, mailbox=f"{user}@example.com", host="127.0.0.1",
                    port=cluster.dovecot.plain_port, secure=False, allow_starttls=False,
                    auth_type="password", username=user, provider_id=SHARED_ID,
                )  # fmt: skip
                secrets.put(tenant, SHARED_ID, secret_name("password", SHARED_ID), password)
                self.users[tenant] = user

    def logins(self, tenant: str) -> int:
        return self.c.dovecot.log_text().count(f"Login: user=<{self.users[tenant]}>")

    def both_served(self) -> bool:
        leased = all(SHARED_ID in self.c.leases(t) for t in self.tenants)
        sessions = self.c.dovecot.who()
        return leased and all(sessions.get(u, 0) == 1 for u in self.users.values())

    def settled(self, members: int) -> bool:
        """Every member has joined and the leases follow an assignment made with all of
        them: a rebalance still to come would log a provider in again mid-test."""
        if len(self.c.registry.live_members(60)) < members:
            return False
        owners = [self.c.owners(t).get(SHARED_ID) for t in self.tenants]
        leases = [self.c.leases(t).get(SHARED_ID) for t in self.tenants]
        return None not in owners and owners == leases and self.both_served()


@pytest.fixture(scope="module")
def twins(redis_server: str, dovecot: Dovecot, tmp_path_factory: Any) -> Iterator[Twins]:
    url = f"{redis_server}/0"
    flush = redis.Redis.from_url(url)
    flush.flushdb()
    flush.close()
    tmp: Path = tmp_path_factory.mktemp("tenants")
    with private_database() as dsn:
        cluster = Cluster(dsn, url, dovecot, tmp, providers=0, workers="2")
        found = Twins(cluster)
        try:
            cluster.start_pod("pod-a")
            cluster.start_pod("pod-b")
            cluster.wait(found.both_served, 60, "both tenants' providers served")
            # Two pods of two workers; settled twice, 2 s apart, with no login between.
            for _ in range(10):
                cluster.wait(lambda: found.settled(4), 60, "all four members joined")
                logins = [found.logins(t) for t in found.tenants]
                time.sleep(2.0)
                if found.settled(4) and [found.logins(t) for t in found.tenants] == logins:
                    break
            else:
                raise AssertionError(f"the pool never settled; {cluster.diagnose()}")
            yield found
        finally:
            cluster.close()


def test_both_tenants_are_assigned_and_leased(twins: Twins) -> None:
    c = twins.c
    owners = [c.owners(t).get(SHARED_ID) for t in twins.tenants]
    leases = [c.leases(t).get(SHARED_ID) for t in twins.tenants]
    assert None not in owners and None not in leases
    c.wait(lambda: [c.leases(t).get(SHARED_ID) for t in twins.tenants]
           == [c.owners(t).get(SHARED_ID) for t in twins.tenants], 30, "leases follow")  # fmt: skip
    assert twins.both_served()


def test_the_lease_mirror_writes_each_tenants_row(twins: Twins) -> None:
    def mirrored() -> dict[str, str | None]:
        with (
            open_pool(twins.c.settings.database_url, max_size=1) as pool,
            pool.connection() as conn,
        ):
            rows = conn.execute(
                "SELECT tenant::text, lease_owner FROM imap_email_provider_config "
                "WHERE email_provider_id = %s::uuid",
                (SHARED_ID,),
            ).fetchall()
        return {str(t): o for t, o in rows}

    expected = {t: "shardworker:" + twins.c.owners(t)[SHARED_ID] for t in twins.tenants}
    twins.c.wait(lambda: mirrored() == expected, 30, "both rows mirrored")


@pytest.mark.parametrize("which", [0, 1])
def test_reconnect_of_one_tenant_reaches_only_that_tenant(twins: Twins, which: int) -> None:
    target, other = twins.tenants[which], twins.tenants[1 - which]
    before = {t: twins.logins(t) for t in twins.tenants}
    with open_pool(twins.c.settings.database_url, max_size=2) as pool:
        service = AdminService(twins.c.settings, pool, twins.c.redis)
        done = service.reconnect(SHARED_ID, {"wait_s": 20}, tenant=target)
    assert done["state"] == "done", done
    assert done["tenant"] == target
    twins.c.wait(lambda: twins.logins(target) > before[target], 20, "the target logs in again")
    twins.c.wait(twins.both_served, 30, "both served after the reconnect")
    time.sleep(1.0)  # a stray reconnect of the other tenant would have logged in by now
    assert twins.logins(other) == before[other]


def test_resync_of_one_tenant_runs_on_that_tenants_provider(twins: Twins) -> None:
    target = twins.tenants[0]
    with open_pool(twins.c.settings.database_url, max_size=2) as pool:
        service = AdminService(twins.c.settings, pool, twins.c.redis)
        done = service.resync(SHARED_ID, {"wait_s": 20}, tenant=target)
    assert done["state"] == "done", done
    assert done["tenant"] == target
    assert done["owner"] == twins.c.owners(target)[SHARED_ID]


def test_a_command_naming_another_tenant_is_not_applied_by_this_owner(twins: Twins) -> None:
    """The inbox checks the (tenant, provider_id) lease, not the id alone: B's owner holds
    a lease for ``SHARED_ID``, yet a command naming that id in a third tenant is refused."""
    from shardworker.pool.inbox import command_stream, status_key, wire_text

    owner_b = twins.c.owners(twins.tenants[1])[SHARED_ID]
    before = {t: twins.logins(t) for t in twins.tenants}
    cid = uuid.uuid4().hex
    entry = {"command_id": cid, "op": "reconnect", "tenant": str(uuid.uuid4()),
             "provider_id": SHARED_ID, "args": {}, "created_at": time.time()}  # fmt: skip
    twins.c.redis.xadd(command_stream(owner_b), {k: wire_text(v) for k, v in entry.items()})
    state = lambda: twins.c.redis.hget(status_key(cid), "state")  # noqa: E731
    twins.c.wait(lambda: state() is not None, 10, "the command was seen")
    assert state() == b"rejected"
    assert twins.c.redis.hget(status_key(cid), "detail") == b"not_owner"
    assert {t: twins.logins(t) for t in twins.tenants} == before
