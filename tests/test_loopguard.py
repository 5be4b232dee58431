"""The per-sender rate guard (issue 20, item 3) against the real Redis."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shardworker.errors import PublishError
from shardworker.logs import JsonFormatter
from shardworker.loopguard import RedisRateStore, SenderRateGuard, sender_key
from shardworker.loops import Action, classify, decide, parse_policy

pytestmark = pytest.mark.timeout(60)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def guard(client: redis.Redis, clock: Clock, **kwargs: Any) -> SenderRateGuard:
    options: dict[str, Any] = {"limit": 20, "window_s": 7200.0}
    options.update(kwargs)
    return SenderRateGuard(RedisRateStore(client), clock=clock, **options)


def test_holds_after_limit_and_releases_when_window_slides(redis_client: redis.Redis) -> None:
    clock, tenant, pid = Clock(), str(uuid.uuid4()), str(uuid.uuid4())
    trips: list[int] = []
    g = guard(redis_client, clock, on_trip=lambda: trips.append(1))
    answers = []
    for i in range(25):
        clock.now += 60
        answers.append(g.check(tenant, pid, "Bot@Loop.example", f"1:{i}").held)
    assert answers == [False] * 20 + [True] * 5
    assert trips == [1] and g.stats.trips == 1 and g.stats.held == 5 and g.stats.checked == 25
    # Bounded memory: never more than limit + 1 members, and a TTL of the window.
    key = sender_key(tenant, pid, "bot@loop.example")
    assert redis_client.zcard(key) == 20
    assert 0 < redis_client.pttl(key) <= 7200 * 1000
    assert "bot" not in key and f"{{{tenant}:{pid}}}" in key
    # Two hours of silence later the sender is welcome again.
    clock.now += 7201
    assert not g.check(tenant, pid, "bot@loop.example", "1:100").held


def test_a_retried_message_gets_the_same_answer(redis_client: redis.Redis) -> None:
    clock, tenant, pid = Clock(), str(uuid.uuid4()), str(uuid.uuid4())
    g = guard(redis_client, clock, limit=3)
    first = [g.check(tenant, pid, "a@x.example", f"m{i}").held for i in range(5)]
    clock.now += 1
    again = [g.check(tenant, pid, "a@x.example", f"m{i}").held for i in range(3)]
    assert first == [False, False, False, True, True]
    assert again == [False, False, False]  # a batch retried after a crash counts once


def test_scopes_senders_providers_tenants_and_exemptions(redis_client: redis.Redis) -> None:
    clock, tenant, pid = Clock(), str(uuid.uuid4()), str(uuid.uuid4())
    g = guard(redis_client, clock, limit=2, exempt=["alerts@ops.example", "@trusted.example"])
    for i in range(3):
        g.check(tenant, pid, "bot@loop.example", f"m{i}")
    assert g.check(tenant, pid, "bot@loop.example", "m3").held
    assert not g.check(tenant, pid, "alice@loop.example", "m4").held  # same domain, other sender
    assert not g.check(tenant, str(uuid.uuid4()), "bot@loop.example", "m5").held
    assert not g.check(str(uuid.uuid4()), pid, "bot@loop.example", "m6").held
    for i in range(5):
        assert not g.check(tenant, pid, "alerts@ops.example", f"a{i}").held
        assert not g.check(tenant, pid, "x@trusted.example", f"t{i}").held
    off = guard(redis_client, clock, limit=0)
    assert not any(off.check(tenant, pid, "bot@loop.example", f"z{i}").held for i in range(50))


def test_trip_is_logged_once_without_the_address(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock, tenant, pid = Clock(), str(uuid.uuid4()), str(uuid.uuid4())
    g = guard(redis_client, clock, limit=1)
    with caplog.at_level(logging.WARNING):
        for i in range(4):
            g.check(tenant, pid, "secret.person@loop.example", f"m{i}")
    lines = [
        JsonFormatter().format(r) for r in caplog.records if r.getMessage() == "loop_guard_tripped"
    ]
    assert len(lines) == 1
    assert "secret.person" not in lines[0] and '"sender_domain":"loop.example"' in lines[0]
    assert pid in lines[0] and tenant in lines[0]


def test_concurrent_workers_agree(redis_client: redis.Redis, redis_url: str) -> None:
    tenant, pid = str(uuid.uuid4()), str(uuid.uuid4())
    held: list[bool] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        client = redis.Redis.from_url(redis_url)
        g = SenderRateGuard(RedisRateStore(client), limit=20, window_s=7200)
        for i in range(10):
            answer = g.check(tenant, pid, "bot@loop.example", f"{n}:{i}").held
            with lock:
                held.append(answer)
        client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert held.count(False) == 20 and held.count(True) == 20


def test_redis_down_is_a_publish_error() -> None:
    dead = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    g = SenderRateGuard(RedisRateStore(dead), limit=5, window_s=60)
    with pytest.raises(PublishError, match="loop guard"):
        g.check(str(uuid.uuid4()), str(uuid.uuid4()), "a@x.example", "m")


def test_ping_pong_between_two_auto_responders_stops(redis_client: redis.Redis) -> None:
    """Two mailboxes answer each other with replies that carry no auto-reply header (the
    case classification cannot catch); the guard stops the exchange, while a colleague of
    the same domain keeps getting through.  The engine-level version is in
    tests/test_loop_demo.py."""
    clock, tenant = Clock(), str(uuid.uuid4())
    providers = {"a@one.example": str(uuid.uuid4()), "b@two.example": str(uuid.uuid4())}
    g = guard(redis_client, clock)
    policy = parse_policy("publish", name="V")
    published: list[tuple[str, str]] = []
    inbox = [("b@two.example", "a@one.example", 0)]  # (from, to, n)
    while inbox:
        sender, rcpt, n = inbox.pop(0)
        clock.now += 5
        answer = g.check(tenant, providers[rcpt], sender, f"{sender}:{n}")
        decision = decide(classify({}), policy, rate_held=Action.SKIP if answer.held else None)
        if not decision.publish:
            continue
        published.append((sender, rcpt))
        inbox.append((rcpt, sender, n + 1))  # the recipient's auto-responder answers
        if n % 10 == 0:  # a human colleague of the looping sender writes meanwhile
            colleague = "carol@two.example"
            assert not g.check(tenant, providers["a@one.example"], colleague, f"c{n}").held
        assert n < 200, "the loop did not stop"
    assert published.count(("b@two.example", "a@one.example")) == 20
    assert published.count(("a@one.example", "b@two.example")) == 20
