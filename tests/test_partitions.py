"""Partitions in CI: exactly-once while one pod's network lies, and Redis fails over.

The short version of bench/partitions.py: 3 pods x 2 workers, each pod in its own network
namespace, 45 mailboxes (not 300: three faults must fit in a few minutes on two shared
cores, and the pool tests already cover 300 providers), two messages per mailbox delivered
during each fault.  Faults: one pod cut off from Redis (and the Sentinels) for 15 s, one
cut off from PostgreSQL for 15 s (both past the 6 s lease TTL and the 6 s member grace),
and a Redis failover to a replica that missed the last 3 s of writes.  Each test asserts
Message-ID accounting on the workflow stream and on the pointer queue (0 lost, 0
duplicated), full service again after the heal, and no publish by the cut-off pod after it
had given up a lease.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.partition_support.run import (
    PhaseResult,
    PhaseRunner,
    Plan,
    faults,
    partition_pool,
    phase_line,
)
from tests.harness.netns import NetnsError
from tests.harness.pgserver import PgServerError
from tests.harness.sentinel import SentinelError

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CUT_S = 15.0
FAULTS = faults(CUT_S, 20.0)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhaseRunner]:
    log_dir = tmp_path_factory.mktemp("partitions")  # pods' logs kept for a failed run
    plan = Plan([], mailboxes=45, per_mailbox=2, recovery_s=60)
    try:
        with partition_pool(plan, log_dir, progress=print) as r:
            yield r
    except (NetnsError, PgServerError, SentinelError, OSError) as exc:
        pytest.fail(f"cannot build the partition rig: {exc}", pytrace=False)


def assert_exactly_once(p: PhaseResult) -> None:
    print(phase_line(p))
    assert p.delivered == 90
    assert (p.stream.lost, p.stream.duplicated) == (0, 0), p.stream
    assert (p.pointer.lost, p.pointer.duplicated) == (0, 0), p.pointer
    assert p.recovered_s is not None, f"not fully served {60} s after the heal"


def test_a_pod_cut_off_from_redis_is_replaced_and_publishes_nothing_stale(
    runner: PhaseRunner,
) -> None:
    p = runner.run(FAULTS["redis_cut"])
    assert_exactly_once(p)
    assert p.stale.leases_lost > 0, "the cut-off pod never gave up a lease"
    assert p.stale.published_after_loss == 0
    assert p.stale.published_while_cut == 0
    assert p.takeover_s is not None, f"its providers were not taken over: {p.unserved}"
    assert p.stale_sessions_max == 0, "the cut-off pod kept IMAP sessions after the takeover"
    published = [e for e in runner.pool.log_entries(p.pod) if e.get("event") == "published"]
    assert any(str(e.get("first_stream_id", "")).count("-") == 1 for e in published), (
        "the stale check dates publishes by their stream id; no published line carries one"
    )


@pytest.fixture(scope="module")
def postgres_cut(runner: PhaseRunner) -> PhaseResult:
    return runner.run(FAULTS["postgres_cut"])


def test_a_pod_cut_off_from_postgres_loses_and_repeats_nothing(postgres_cut: PhaseResult) -> None:
    assert_exactly_once(postgres_cut)
    assert postgres_cut.stale.published_after_loss == 0


def test_a_pod_cut_off_from_postgres_hands_its_providers_over(postgres_cut: PhaseResult) -> None:
    assert postgres_cut.takeover_s is not None, postgres_cut.unserved


def test_a_lossy_redis_failover_loses_and_repeats_nothing(runner: PhaseRunner) -> None:
    p = runner.run(FAULTS["redis_failover"])
    assert p.failover["lost_replication_bytes"] > 0, "the replica was not behind"
    assert_exactly_once(p)
    # What the consumer read before the failover took it, it reads again with the same
    # event_id, so a consumer deduping on event_id (Alga's runtime) processes it once.
    assert p.consumer_new_event_ids == 0, f"{p.consumer_duplicates} read twice"
