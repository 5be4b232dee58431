"""End to end: real `shardworker run` pods sharing providers through Redis leases."""

from __future__ import annotations

import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pool_support import Cluster
from tests.support import make_mail, message_ids

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROVIDERS = 300


@pytest.fixture
def cluster(fresh_dsn: str, redis_url: str, dovecot: Any, tmp_dir: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(
        providers: int = PROVIDERS,
        pods: tuple[str, ...] = ("pod-a", "pod-b", "pod-c"),
        **overrides: str,
    ) -> Cluster:
        c = Cluster(fresh_dsn, redis_url, dovecot, tmp_dir, providers, **overrides)
        made.append(c)
        for name in pods:
            c.start_pod(name)
        c.wait(lambda: c.all_served(set(pods)), 90, "every provider served once")
        return c

    yield make
    for c in made:
        c.close()


def balance(owners: dict[str, str]) -> float:
    loads = Counter(owners.values())
    return max(loads.values()) / statistics.mean(loads.values())


def deliver(c: Cluster, pids: list[str], tag: str) -> list[str]:
    sent = []
    for i, pid in enumerate(pids):
        mid = f"<{tag}{i}@example.com>"
        c.dovecot.append(c.users[pid], "INBOX", make_mail(message_id=mid))
        sent.append(mid)
    return sent


def published_exactly(c: Cluster, sent: list[str], timeout_s: float) -> None:
    want = set(sent)
    c.wait(lambda: want <= set(message_ids(c.redis)), timeout_s, "all delivered mail published")
    time.sleep(1.0)
    got = [m for m in message_ids(c.redis) if m in want]
    assert len(got) == len(want), f"{len(got) - len(set(got))} duplicate(s)"


def test_every_provider_is_served_by_exactly_one_connection_set(cluster: Any) -> None:
    c = cluster()
    leases = c.leases()
    assert set(leases) == set(c.users)
    assert {m.split("/")[0] for m in leases.values()} == {"pod-a", "pod-b", "pod-c"}
    assert leases == c.owners()
    assert balance(c.owners()) <= 1.25
    assert set(c.sessions().values()) == {1}
    sent = deliver(c, list(c.users)[:30], "one")
    published_exactly(c, sent, 20)


def test_sigkill_of_a_pod_fails_over_and_publishes_exactly_once(cluster: Any) -> None:
    c = cluster()
    victims = [p for p, m in c.leases().items() if m.startswith("pod-c/")]
    assert victims
    c.pods["pod-c"].kill()
    killed_at = time.monotonic()
    sent = deliver(c, victims[:40] + [p for p in c.users if p not in victims][:10], "kill")
    took = c.wait(lambda: c.all_served({"pod-a", "pod-b"}), 60, "failover")
    print(f"failover of {len(victims)} providers: {time.monotonic() - killed_at:.1f}s")
    assert took < 30
    published_exactly(c, sent, 30)


def test_sigstop_past_the_lease_then_sigcont_publishes_and_checkpoints_nothing(
    cluster: Any,
) -> None:
    c = cluster()
    pod = c.pods["pod-a"]
    member, pid = sorted(pod.worker_pids().items())[0]
    victims = [p for p, m in c.leases().items() if m == member]
    assert victims
    import os

    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        c.wait(lambda: _taken_over(c.leases(), victims, member), 60, "takeover")
        sent = deliver(c, victims[:20], "stop")
        published_exactly(c, sent, 30)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.time()
    time.sleep(4.0)
    after = [line for line in pod.log_lines()
             if line.get("pid") == pid and _ts(line) >= resumed_at - 0.5]  # fmt: skip
    assert not [x for x in after if x.get("event") == "published"], "a stale owner published"
    assert [x for x in after if x.get("event") in ("lease_lost", "provider_dropped")]
    assert stopped_at < resumed_at
    published_exactly(c, sent, 5)


def _taken_over(leases: dict[str, str], victims: list[str], member: str) -> bool:
    """Every victim leased by someone else, judged on one read of the leases."""
    return all(leases.get(p) not in (None, member) for p in victims)


def _ts(line: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00")).timestamp()


def test_sigterm_of_a_pod_hands_off_without_waiting_for_ttls(cluster: Any) -> None:
    c = cluster(lease_ttl_s="20", member_grace_s="20", lease_renew_s="2")
    victims = {p for p, m in c.leases().items() if m.startswith("pod-b/")}
    started = time.monotonic()
    code = c.pods["pod-b"].terminate()
    exited = time.monotonic() - started
    stuck: list[str] = []

    def served() -> bool:
        if c.all_served({"pod-a", "pod-c"}):
            return True
        if not stuck and time.monotonic() - started > 8:
            stuck.append(c.unserved({"pod-a", "pod-c"}))
        return False

    took = c.wait(served, 30, "handoff")
    total = time.monotonic() - started
    print(
        f"graceful handoff of {len(victims)} providers: {total:.1f}s "
        f"(pod exited after {exited:.1f}s, exit {code})"
    )
    assert code == 0
    assert total < 10, f"handoff waited for lease TTLs (20 s); {stuck}; {c.warnings()}"
    assert took >= 0


def test_a_fourth_pod_moves_close_to_the_optimum(cluster: Any) -> None:
    c = cluster()
    before = c.owners()
    c.start_pod("pod-d")
    c.wait(lambda: any(m.startswith("pod-d/") for m in c.owners().values()), 30, "join")
    c.wait(lambda: c.all_served() and balance(c.owners()) <= 1.25, 60, "rebalanced")
    after = c.owners()
    moved = sum(1 for p in before if after.get(p) != before[p])
    optimum = len(before) * 2 / 8  # 2 new members of 8
    print(f"join: moved {moved} of {len(before)} (optimum {optimum:.0f}), "
          f"max/mean {balance(after):.3f}")  # fmt: skip
    assert moved <= 1.1 * optimum
    assert balance(after) <= 1.25


def test_killing_the_leader_elects_another_and_leaves_nothing_unowned(cluster: Any) -> None:
    c = cluster()
    leader = c.registry.current_leader()
    assert leader is not None
    name = leader.split("|")[0]
    c.pods[name].kill()
    started = time.monotonic()
    c.wait(lambda: (c.registry.current_leader() or name).split("|")[0] != name, 30, "new leader")
    elected = time.monotonic() - started
    rest = {n for n in c.pods if n != name}
    c.wait(lambda: c.all_served(rest), 60, "no provider unowned")
    print(f"leader {name} killed: new leader after {elected:.1f}s")
    assert elected < 10


def test_a_restarted_worker_keeps_its_providers(cluster: Any) -> None:
    c = cluster(member_grace_s="10")
    before = c.owners()
    pod = c.pods["pod-a"]
    member, pid = sorted(pod.worker_pids().items())[0]
    import os

    os.kill(pid, signal.SIGKILL)  # the coordinator restarts it in the same slot
    c.wait(lambda: pod.worker_pids().get(member, pid) != pid, 20, "worker restarted")
    c.wait(c.all_served, 30, "served again")
    assert c.owners() == before, "a worker back within the grace period lost providers"


def test_alga_leases_are_honoured_and_ours_are_mirrored(cluster: Any) -> None:
    import psycopg

    c = cluster(providers=12, pods=("pod-a",))
    alga_pid = sorted(c.users)[0]
    with psycopg.connect(c.settings.database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE imap_email_provider_config SET lease_owner = 'email-service:alga-1', "
            "lease_expires_at = now() + interval '120 seconds' WHERE email_provider_id = %s",
            (alga_pid,))  # fmt: skip
    c.wait(lambda: alga_pid not in c.leases(), 20, "alga's provider released")
    c.wait(lambda: c.sessions()[c.users[alga_pid]] == 0, 20, "its session closed")
    with psycopg.connect(c.settings.database_url) as conn:
        rows = dict(conn.execute(
            "SELECT email_provider_id::text, lease_owner FROM imap_email_provider_config "
            "WHERE tenant = %s", (c.tenant,)).fetchall())  # fmt: skip
    assert rows[alga_pid] == "email-service:alga-1"
    ours = {p: o for p, o in rows.items() if p != alga_pid}
    assert all(o is not None and o.startswith("shardworker:pod-a/") for o in ours.values()), ours
