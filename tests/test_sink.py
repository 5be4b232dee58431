"""The exactly-once rules every sink keeps, run against the interface.

Each test runs on the Redis Streams sink (a private Redis) and on the throwaway in-memory
sink of ``tests/sink_support.py``; the last one runs the whole engine on the in-memory
sink, chosen by ``SHARDWORKER_SINK=memory`` alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from shardworker.config import Settings
from shardworker.errors import ConfigError, FencedError
from shardworker.sink import SINKS, open_sink
from shardworker.sink.base import DeadLetter, Fence
from shardworker.sink.redis_streams import RedisStreamsSink
from tests.sink_support import MemoryHarness, MemorySink, RedisHarness, with_memory_sink
from tests.support import Rig, events, make_mail, rig_settings, wait_until
from tests.test_publish import PROVIDER, TENANT, make_settings, outbound

LEASE = Fence(f"sw:lease:{TENANT}:{PROVIDER}", "token-a", 7)


@pytest.fixture(params=["redis-streams", "memory"])
def harness(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryHarness()
    else:
        client: redis.Redis = request.getfixturevalue("redis_client")
        yield RedisHarness(client, make_settings(), TENANT)


def letter(uid: int, folder: str = "Spam Box") -> DeadLetter:
    return DeadLetter(
        tenant=TENANT, provider_id=PROVIDER, folder=folder, uid_validity=42, uid=uid,
        message_id="<bad@x>", reason="parse_error", raw=b"raw",
    )  # fmt: skip


def test_the_setting_chooses_the_sink(redis_client: redis.Redis) -> None:
    assert isinstance(open_sink(Settings(), redis_client), RedisStreamsSink)
    memory = MemorySink()
    assert open_sink(Settings(sink="memory"), redis_client, with_memory_sink(memory)) is memory
    with pytest.raises(ConfigError, match=r"SHARDWORKER_SINK: unknown sink 'kafka'.*redis-streams"):
        open_sink(Settings(sink="kafka"), redis_client, SINKS)


def test_second_publish_of_a_uid_is_a_duplicate(harness: Any) -> None:
    first = harness.sink.publish_batch([outbound(1), outbound(2)], None)
    assert [r.duplicate for r in first] == [False, False]
    again = harness.sink.publish_batch([outbound(2), outbound(1), outbound(3)], None)
    assert [r.duplicate for r in again] == [True, True, False]
    assert again[0].stream_id == first[1].stream_id
    assert again[1].stream_id == first[0].stream_id
    assert harness.event_count() == 3


def test_same_message_id_in_another_folder_is_a_duplicate(harness: Any) -> None:
    [first] = harness.sink.publish_batch([outbound(5, folder="INBOX")], None)
    [copy] = harness.sink.publish_batch(
        [outbound(900, folder="Archive", message_id="<msg-5@example.com>")], None
    )
    assert copy.duplicate and copy.stream_id == first.stream_id
    assert harness.event_count() == 1
    assert harness.known(PROVIDER, "Archive", 42, 900) == first.stream_id


def test_messages_without_message_id_do_not_collide(harness: Any) -> None:
    results = harness.sink.publish_batch(
        [outbound(1, message_id=""), outbound(2, message_id="")], None
    )
    assert [r.duplicate for r in results] == [False, False]
    assert harness.event_count() == 2


def test_matching_fence_publishes(harness: Any) -> None:
    harness.hold(LEASE)
    [result] = harness.sink.publish_batch([outbound()], LEASE)
    assert not result.duplicate and harness.event_count() == 1
    assert harness.sink.dead_letter(letter(9), LEASE)


@pytest.mark.parametrize("holder", ["token-b", None])
def test_fence_mismatch_writes_nothing(harness: Any, holder: str | None) -> None:
    if holder is not None:
        harness.hold(LEASE, holder)
    harness.sink.publish_batch([outbound(1)], None)
    before = harness.footprint()
    with pytest.raises(FencedError, match="2 of 2"):
        harness.sink.publish_batch([outbound(2), outbound(3)], LEASE)
    assert harness.footprint() == before
    with pytest.raises(FencedError):
        harness.sink.dead_letter(letter(9), LEASE)
    assert harness.footprint() == before
    assert harness.dead_count() == 0


def test_dead_letter_is_once_per_uid_and_the_uid_is_never_published(harness: Any) -> None:
    entry = harness.sink.dead_letter(letter(6), None)
    assert harness.sink.dead_letter(letter(6), None) == entry
    assert harness.dead_count() == 1
    [result] = harness.sink.publish_batch([outbound(6, folder="Spam Box")], None)
    assert result.duplicate and result.dead_lettered and result.stream_id == entry
    assert harness.event_count() == 0


def test_a_retried_batch_publishes_only_what_is_new(harness: Any) -> None:
    """A crash after the sink wrote but before the checkpoint: the retry is all duplicates."""
    first = harness.sink.publish_batch([outbound(uid) for uid in range(1, 4)], None)
    retry = harness.sink.publish_batch([outbound(uid) for uid in range(1, 6)], None)
    assert [r.stream_id for r in retry[:3]] == [r.stream_id for r in first]
    assert [r.duplicate for r in retry] == [True, True, True, False, False]
    assert harness.event_count() == 5


@pytest.mark.timeout(60)
def test_the_engine_publishes_through_a_second_sink(
    migrated_dsn: str, redis_url: str, dovecot: Any
) -> None:
    memory = MemorySink()
    settings = rig_settings(migrated_dsn, redis_url, str(dovecot.cafile), sink="memory")
    rig = Rig(settings, dovecot, sinks=with_memory_sink(memory))
    try:
        user, password = dovecot.add_user()
        pid = rig.add_provider(user, password)
        rig.start()
        wait_until(lambda: rig.row(pid)["status"] == "connected")
        for n in range(3):
            dovecot.append(user, "INBOX", make_mail(message_id=f"<sink-{n}@example.com>"))
        wait_until(lambda: len(memory.events) == 3, timeout_s=10)
        time.sleep(0.3)
        assert memory.prepared
        assert sorted(out.message_id for _, out in memory.events) == [
            f"<sink-{n}@example.com>" for n in range(3)
        ]
        ledger = {row[3]: row[4:] for row in rig.ledger(pid)}
        assert ledger == {out.message_id: (entry, "published") for entry, out in memory.events}
        assert events(rig.redis) == []  # nothing went to Alga's stream
    finally:
        rig.close()


def test_an_unknown_sink_stops_run_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardworker.cli import main
    from shardworker.exitcodes import ExitCode

    monkeypatch.setenv("SHARDWORKER_SINK", "kafka")
    monkeypatch.setenv("SHARDWORKER_DATABASE_URL", "postgresql://127.0.0.1:1/never")
    assert main(["run"]) == ExitCode.CONFIG
