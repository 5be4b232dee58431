"""The loop guard's rate check inside ``publish.lua`` (issue 14): one Redis round trip.

Under the rate action ``skip`` the per-sender rate check travels in the publish script
instead of a round trip of its own before it.  What must not change: the answers (the
script's window is ``loopguard.HIT``'s), the order in which a batch counts against its
sender, what a held message leaves behind (nothing but the rate marker) and how it is
ledgered, counted and logged.
"""

from __future__ import annotations

import contextlib
import logging
import random
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis

from bench.redis_counting import label_of
from shardworker.config import Settings
from shardworker.engine.sync import FolderSync, SyncContext
from shardworker.gate import MessageGate
from shardworker.loopguard import RedisRateStore, SenderRateGuard, sender_key
from shardworker.mime import Caps
from shardworker.sink.base import Outbound, RateCheck
from shardworker.sink.redis_streams import (
    POINTER_QUEUE,
    WORKFLOW_STREAM,
    RedisStreamsSink,
    message_id_key,
    open_sink,
    uid_key,
)
from tests.support import counter, make_mail, message_ids
from tests.test_push_fetch import Folder, RecordingSink, open_folder

pytestmark = pytest.mark.timeout(90)

BOT = "Bot <bot@loop.example>"
REQUESTS: list[str] = []  # what the logged clients sent, one label per request, in order


class LoggedConnection(redis.Connection):
    """Notes every request (a command or a whole pipeline) before sending it."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        parts = [command] if isinstance(command, bytes | str) else command
        packed = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts)
        REQUESTS.append(label_of(packed))
        super().send_packed_command(command, check_health)


class NoFoldSink(RecordingSink):
    """The real sink, but one the engine must ask the guard for itself (the old path)."""

    def checks_rates(self) -> bool:
        return False


@contextlib.contextmanager
def gated(
    dovecot: Any, dsn: str, redis_url: str, overrides: dict[str, str], *, fold: bool = True
) -> Iterator[tuple[Folder, MessageGate, RecordingSink]]:
    """A push folder whose sync has the loop gate, on a client that logs its requests."""
    with open_folder(dovecot, dsn, redis_url, "plain", **overrides) as f:
        client = redis.Redis.from_url(redis_url, connection_class=LoggedConnection)
        settings = f.sync.ctx.settings
        gate = MessageGate.from_settings(settings, client)
        sink = (RecordingSink if fold else NoFoldSink)(open_sink(settings, client))
        ctx = SyncContext(
            settings, f.sync.ctx.store, sink, Caps.from_settings(settings), f.sync.ctx.provider,
            None, gate=gate,
        )  # fmt: skip
        f.sync = FolderSync(ctx, f.session)
        try:
            yield f, gate, sink
        finally:
            client.close()


def drain(f: Folder, *raws: bytes) -> Any:
    prefetch = f.push(*raws)
    f.cursor, result = f.sync.drain(f.cursor, prefetch)
    return result


def ledger(f: Folder) -> list[tuple[str, str | None]]:
    with psycopg.connect(f.sync.ctx.settings.database_url) as conn:
        rows = conn.execute(
            "SELECT status, reason FROM shardworker_ledger WHERE provider_id = %s ORDER BY uid",
            (f.sync.ctx.provider.provider_id,),
        ).fetchall()
    return [(status, reason) for status, reason in rows]


@pytest.mark.parametrize(("action", "before_xadd"), [
    ("skip", ["EVALSHA publish"]),
    ("flag", ["EVALSHA unknown", "EVALSHA publish"]),  # unknown: the guard's inline HIT
])  # fmt: skip
def test_under_skip_a_push_makes_one_redis_round_trip_up_to_its_xadd(
    migrated_dsn: str, redis_url: str, dovecot: Any, action: str, before_xadd: list[str]
) -> None:
    env = {"loop_rate_limit": "5", "loop_rate_action": action}
    with gated(dovecot, migrated_dsn, redis_url, env) as (f, gate, _):
        assert drain(f, make_mail(sender=BOT, message_id="<warm@x>")).published == 1
        REQUESTS.clear()  # the scripts are loaded now
        assert drain(f, make_mail(sender=BOT, message_id="<push@x>")).published == 1
        upto = REQUESTS[: REQUESTS.index("EVALSHA publish") + 1]
        assert upto == before_xadd, REQUESTS
        # Both messages were counted against the sender, on either path.
        p = f.sync.ctx.provider
        assert f.redis.zcard(sender_key(p.tenant, p.provider_id, "bot@loop.example")) == 2
        assert gate.guard.stats.checked == 2 and gate.guard.stats.held == 0


def test_a_held_push_is_ledgered_skipped_counted_and_logged_as_before(
    migrated_dsn: str, redis_url: str, dovecot: Any, caplog: pytest.LogCaptureFixture
) -> None:
    skips = counter("shardworker_loop_messages", {"class": "normal", "action": "skip"})
    with gated(dovecot, migrated_dsn, redis_url, {"loop_rate_limit": "1"}) as (f, gate, sink):
        assert drain(f, make_mail(sender=BOT, message_id="<first@x>")).published == 1
        sink.calls.clear()
        with caplog.at_level(logging.INFO):
            result = drain(f, make_mail(sender=BOT, message_id="<held@x>"))
        assert (result.published, result.skipped) == (0, 1)
        assert sink.calls.count("publish_batch") == 1  # the hold was the publish's answer
        assert message_ids(f.redis) == ["<first@x>"]
        assert f.redis.llen(POINTER_QUEUE) == 1
        assert ledger(f) == [("published", None), ("skipped", "sender_rate_limited")]
        stats = gate.guard.stats
        assert (stats.checked, stats.held, stats.trips) == (2, 1, 1)
        names = [r.getMessage() for r in caplog.records]
        assert names.count("loop_guard_tripped") == 1 and names.count("message_skipped") == 1
        assert counter("shardworker_loop_messages", {"class": "normal", "action": "skip"}) == (
            skips + 1
        )


@pytest.mark.parametrize("fold", [True, False])
def test_a_batch_counts_against_its_sender_in_order_on_both_paths(
    migrated_dsn: str, redis_url: str, dovecot: Any, fold: bool
) -> None:
    """An auto-reply its policy skips still counts, and its guard is asked in the engine:
    the folded message before it must be counted first, or the normal mail would be the
    one held and the auto-reply the one admitted."""
    env = {"loop_rate_limit": "1", "loop_policy": "auto_reply=skip"}
    with gated(dovecot, migrated_dsn, redis_url, env, fold=fold) as (f, _, _):
        auto = make_mail(sender=BOT, headers={"Auto-Submitted": "auto-replied"})
        result = drain(f, make_mail(sender=BOT), auto, make_mail(sender=BOT))
        assert (result.published, result.skipped) == (1, 2)
        assert ledger(f) == [
            ("published", None),
            ("skipped", "sender_rate_limited"),
            ("skipped", "sender_rate_limited"),
        ]


# -- the script's window against the guard's, without the engine --------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def outbound(uid: int, rate: RateCheck) -> Outbound:
    return Outbound(
        tenant="t", provider_id="p", mailbox="desk@example.com", folder="INBOX",
        uid_validity=1, uid=uid, message_id=rate.member, payload={"emailData": {}},
        event_time=datetime.now(UTC), rate=rate,
    )  # fmt: skip


def test_the_script_answers_as_the_guard_over_a_sliding_window(redis_client: redis.Redis) -> None:
    """The same arrivals (new messages and retried ones, time sliding past the window)
    through ``HIT`` and through ``publish.lua``: the same holds, ranks and first trips."""
    rng = random.Random(14)
    clock = Clock()
    guard = SenderRateGuard(RedisRateStore(redis_client), limit=3, window_s=10, clock=clock)
    sink = RedisStreamsSink(redis_client, Settings())
    tenant_a, tenant_b = str(uuid.uuid4()), str(uuid.uuid4())
    seen: list[int] = []
    by_guard, by_script = [], []
    for step in range(400):
        clock.now += rng.choice([0.0, 0.5, 1.0, 2.0, 4.0, 12.0])
        n = rng.choice(seen) if seen and rng.random() < 0.3 else step
        seen.append(n)
        a = guard.check(tenant_a, "p", "bot@loop.example", f"<m{n}@x>")
        by_guard.append((a.held, a.rank, a.first_trip))
        rate = guard.plan(tenant_b, "p", "bot@loop.example", f"<m{n}@x>")
        assert rate is not None
        [res] = sink.publish_batch([outbound(n + 1, rate)], None)
        by_script.append((res.held, res.rank, res.first_trip))
    assert by_script == by_guard
    assert {held for held, _, _ in by_guard} == {True, False}
    assert any(first for _, _, first in by_guard)
    key_a = sender_key(tenant_a, "p", "bot@loop.example")
    key_b = sender_key(tenant_b, "p", "bot@loop.example")
    assert redis_client.zrange(key_a, 0, -1) == redis_client.zrange(key_b, 0, -1)


def test_a_held_message_leaves_no_event_job_or_dedupe_key(redis_client: redis.Redis) -> None:
    sink = RedisStreamsSink(redis_client, Settings())
    guard = SenderRateGuard(RedisRateStore(redis_client), limit=1, window_s=60)
    first = guard.plan("t", "p", "bot@loop.example", "<a@x>")
    held = guard.plan("t", "p", "bot@loop.example", "<b@x>")
    assert first is not None and held is not None
    [ok, no] = sink.publish_batch([outbound(1, first), outbound(2, held)], None)
    assert not ok.held and ok.stream_id and (no.held, no.stream_id, no.duplicate) == (
        True, "", False,
    )  # fmt: skip
    assert redis_client.xlen(WORKFLOW_STREAM) == redis_client.llen(POINTER_QUEUE) == 1
    assert redis_client.exists(uid_key("t", "p", "INBOX", 1, 1), message_id_key("t", "p", "<a@x>"))
    assert not redis_client.exists(uid_key("t", "p", "INBOX", 1, 2))
    assert not redis_client.exists(message_id_key("t", "p", "<b@x>"))
    # Without a rate check the same message is written: the hold was the rate's doing.
    [later] = sink.publish_batch([replace(outbound(2, held), rate=None)], None)
    assert not later.held and not later.duplicate
