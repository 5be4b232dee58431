"""The partition run's stale-publish check (bench/partition_support/run.py), on log lines.

A ``published`` line is logged after the checkpoint; the check dates it by its first
stream id, when Redis took the XADD.  Unit tests of that rule, on synthetic log entries.
"""

from __future__ import annotations

from typing import Any

from bench.partition_support.run import stale_check

CUT, HEAL, TTL = 100.0, 130.0, 6.0


def line(event: str, t: float, **fields: Any) -> dict[str, Any]:
    return {"event": event, "t": t, "pid": 7, "provider_id": "p1", **fields}


def test_a_publish_made_under_the_lease_and_checkpointed_after_a_give_up_is_not_stale() -> None:
    # As in the flapping run: XADD at 105, give-up at 108, checkpoint (and log) at 109.
    entries = [line("lease_acquired", 90), line("provider_dropped", 108),
               line("published", 109, first_stream_id="105000-0")]  # fmt: skip
    out = stale_check(entries, CUT, HEAL, TTL)
    assert (out.published_after_loss, out.published_while_cut) == (0, 0)


def test_a_publish_sent_after_the_owner_gave_the_provider_up_is_stale() -> None:
    entries = [line("lease_acquired", 90), line("lease_lost", 108),
               line("published", 109, first_stream_id="108500-0")]  # fmt: skip
    out = stale_check(entries, CUT, HEAL, TTL)
    assert out.published_after_loss == 1
    assert out.leases_lost == 1


def test_a_line_without_a_stream_id_is_dated_by_its_log_time() -> None:
    entries = [line("lease_acquired", 90), line("provider_dropped", 108), line("published", 109)]
    assert stale_check(entries, CUT, HEAL, TTL).published_after_loss == 1


def test_a_publish_accepted_while_redis_was_cut_counts_as_published_while_cut() -> None:
    # Logged after the heal, but Redis took it mid-cut: no owner cut off from Redis can do that.
    entries = [line("lease_acquired", 90), line("published", 131, first_stream_id="120000-0")]
    out = stale_check(entries, CUT, HEAL, TTL)
    assert (out.published_after_loss, out.published_while_cut) == (0, 1)


def test_ownership_is_per_worker_process() -> None:
    entries = [line("lease_acquired", 90), line("lease_lost", 101),
               line("lease_acquired", 102, pid=8),
               line("published", 104, first_stream_id="103000-0")]  # fmt: skip
    assert stale_check(entries, CUT, HEAL, TTL).published_after_loss == 1
