"""Gmail's daily download budget (issue 20, item 1) against the real Redis."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shardworker.budget import MIB, DailyByteBudget, budget_key
from shardworker.errors import PublishError

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self, when: str) -> None:
        self.now = datetime.fromisoformat(when).timestamp()

    def __call__(self) -> float:
        return self.now


def test_backfill_stops_at_the_budget_and_resets_at_utc_midnight(
    redis_client: redis.Redis,
) -> None:
    clock = Clock("2026-12-02T23:00:00+00:00")
    b = DailyByteBudget(redis_client, "Big@Workspace.example", limit_bytes=100 * MIB,
                        reserve_bytes=20 * MIB, clock=clock)  # fmt: skip
    granted = 0
    while b.try_spend(7 * MIB):
        granted += 1
    assert granted == 11  # 77 MiB used; 84 would pass the 80 MiB left for backfill
    p = b.progress()
    assert p.used_bytes == 77 * MIB and p.backfill_remaining_bytes == 3 * MIB
    assert not b.try_spend(4 * MIB) and b.try_spend(3 * MIB)
    assert b.progress().exhausted
    # Live mail is never refused; it counts, into the reserve and past the limit.
    assert b.record(30 * MIB) == 110 * MIB
    report = b.progress().as_dict()
    assert report["used_percent"] == 110.0 and report["resets_at"] == "2026-12-03T00:00:00Z"
    assert report["limit_bytes"] == 100 * MIB and report["backfill_remaining_bytes"] == 0
    clock.now += 3600  # a new UTC day
    assert b.progress().used_bytes == 0 and b.try_spend(7 * MIB)
    day = datetime.fromtimestamp(clock.now, UTC).strftime("%Y-%m-%d")
    key = budget_key("big@workspace.example", day)
    assert 0 < redis_client.pttl(key) <= 2 * 86400 * 1000
    assert "workspace" not in key.lower()


def test_budget_is_per_account_and_shared_between_processes(redis_url: str) -> None:
    clock = Clock("2026-12-02T12:00:00+00:00")
    clients = [redis.Redis.from_url(redis_url) for _ in range(4)]
    grants: list[bool] = []
    lock = threading.Lock()

    def spend(client: redis.Redis) -> None:
        b = DailyByteBudget(client, "shared@gmail.example", limit_bytes=10 * MIB, clock=clock)
        for _ in range(10):
            ok = b.try_spend(MIB)
            with lock:
                grants.append(ok)

    threads = [threading.Thread(target=spend, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert grants.count(True) == 10  # never more than the budget, however many workers
    other = DailyByteBudget(clients[0], "other@gmail.example", limit_bytes=10 * MIB, clock=clock)
    assert other.try_spend(MIB)
    for c in clients:
        c.close()


def test_first_fetch_of_a_day_always_passes_and_zero_disables(redis_client: redis.Redis) -> None:
    clock = Clock("2026-12-02T12:00:00+00:00")
    tiny = DailyByteBudget(redis_client, "a@x.example", limit_bytes=MIB, clock=clock)
    assert tiny.try_spend(25 * MIB)  # one message larger than the whole budget still moves
    assert not tiny.try_spend(1)
    off = DailyByteBudget(redis_client, "b@x.example", limit_bytes=0, clock=clock)
    assert all(off.try_spend(1000 * MIB) for _ in range(5))


def test_redis_down_is_a_publish_error() -> None:
    dead = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    b = DailyByteBudget(dead, "a@x.example", limit_bytes=MIB)
    with pytest.raises(PublishError, match="budget"):
        b.try_spend(1)
    with pytest.raises(PublishError, match="budget"):
        b.progress()
