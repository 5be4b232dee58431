"""sink.housekeeping against a real Redis: trim by consumption, the byte cap, memory by
kind, and the eviction/restart watch."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from shardworker.config import load_settings
from shardworker.errors import ConfigError
from shardworker.metrics import footprint
from shardworker.sink.housekeeping import Housekeeper, scan_coverage
from shardworker.sink.redis_streams import FULL_FLAG, WORKFLOW_STREAM, RedisStreamsSink
from tests.test_publish import make_settings, outbound

GROUP = "workflow-runtime-v2"


def fill(client: redis.Redis, count: int) -> list[bytes]:
    return [client.xadd(WORKFLOW_STREAM, {"n": str(i)}) for i in range(count)]


def read(client: redis.Redis, group: str, count: int, ack: bool = True) -> list[bytes]:
    got = client.xreadgroup(group, "c1", {WORKFLOW_STREAM: ">"}, count=count)
    ids = [entry_id for _, entries in got for entry_id, _ in entries]
    if ack and ids:
        client.xack(WORKFLOW_STREAM, group, *ids)
    return ids


def keeper(client: redis.Redis, **overrides: Any) -> Housekeeper:
    return Housekeeper(client, make_settings(**overrides))


def test_read_entries_go_and_unread_ones_stay(redis_client: redis.Redis) -> None:
    ids = fill(redis_client, 10)
    redis_client.xgroup_create(WORKFLOW_STREAM, GROUP, id="0")
    read(redis_client, GROUP, 6)
    [result] = keeper(redis_client).trim()
    assert result.floor == ids[5].decode()
    assert [e for e, _ in redis_client.xrange(WORKFLOW_STREAM)] == ids[5:]


def test_pending_entries_are_kept_for_a_consumer_to_claim(redis_client: redis.Redis) -> None:
    ids = fill(redis_client, 10)
    redis_client.xgroup_create(WORKFLOW_STREAM, GROUP, id="0")
    read(redis_client, GROUP, 2, ack=False)  # delivered to a consumer that then crashed
    read(redis_client, GROUP, 6)
    keeper(redis_client).trim()
    assert [e for e, _ in redis_client.xrange(WORKFLOW_STREAM)] == ids


def test_the_slowest_honoured_group_decides_and_others_do_not(redis_client: redis.Redis) -> None:
    ids = fill(redis_client, 10)
    for group in (GROUP, "alga-audit", "someone-elses"):
        redis_client.xgroup_create(WORKFLOW_STREAM, group, id="0")
    read(redis_client, GROUP, 8)
    read(redis_client, "alga-audit", 3)  # "someone-elses" read nothing: not listed
    keeper(redis_client, trim_groups=("alga-audit",)).trim()
    assert [e for e, _ in redis_client.xrange(WORKFLOW_STREAM)] == ids[2:]


def test_without_any_honoured_group_a_count_is_kept(redis_client: redis.Redis) -> None:
    ids = fill(redis_client, 30)
    redis_client.xgroup_create(WORKFLOW_STREAM, "workflow-processors", id="0")
    [result] = keeper(redis_client, stream_keep_without_group=12).trim()
    assert (result.floor, result.trimmed) == (None, 18)
    assert [e for e, _ in redis_client.xrange(WORKFLOW_STREAM)] == ids[18:]


def test_the_byte_cap_stops_fetching_and_trims_nothing_unread(redis_client: redis.Redis) -> None:
    for _ in range(50):
        redis_client.xadd(WORKFLOW_STREAM, {"payload_json": "x" * 2000})
    redis_client.xgroup_create(WORKFLOW_STREAM, GROUP, id="0")
    settings = make_settings(stream_max_bytes=20_000, backpressure_check_s=0)
    sink = RedisStreamsSink(redis_client, settings)
    assert not sink.backpressured()  # a lag of 50 is within the default bound
    Housekeeper(redis_client, settings).run()
    assert redis_client.exists(FULL_FLAG)
    assert sink.backpressured()
    assert redis_client.xlen(WORKFLOW_STREAM) == 50
    read(redis_client, GROUP, 50)  # the consumer catches up: trimmed, under the cap
    redis_client.delete(FULL_FLAG)  # (it would expire on its own)
    Housekeeper(redis_client, settings).run()
    assert not redis_client.exists(FULL_FLAG) and not sink.backpressured()
    assert redis_client.xlen(WORKFLOW_STREAM) <= 1


def test_memory_by_kind_counts_dedupe_keys_and_streams(redis_client: redis.Redis) -> None:
    settings = make_settings(publish_pointer_queue=True)
    RedisStreamsSink(redis_client, settings).publish_batch([outbound(i) for i in range(20)], None)
    by_kind = Housekeeper(redis_client, settings).sample_memory()
    assert set(by_kind) == set(footprint.KINDS)
    exact = sum(
        int(redis_client.memory_usage(k) or 0)
        for k in redis_client.scan_iter("sw:*")
        if k.startswith((b"sw:pub:", b"sw:mid:"))
    )
    assert by_kind["dedupe"] == pytest.approx(exact, rel=0.2)
    assert by_kind["stream"] > 20 * 500 and by_kind["pointer_queue"] > 0
    assert footprint.families().bytes.labels("dedupe")._value.get() == by_kind["dedupe"]


def test_evictions_and_restarts_are_counted(redis_client: redis.Redis) -> None:
    house = keeper(redis_client)
    house.watch_server()
    evicted, restarts = footprint.families().evicted, footprint.families().restarts
    before_e, before_r = evicted._value.get(), restarts._value.get()
    house._evicted = (house._evicted or 0) - 3  # as if Redis had evicted 3 keys since
    house.watch_server()
    assert evicted._value.get() == before_e + 3
    house._run_id = "an-older-run"
    house.watch_server()
    assert restarts._value.get() == before_r + 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SHARDWORKER_HOUSEKEEPING_S": "0.5"}, "HOUSEKEEPING_S: must be at least 1"),
        ({"SHARDWORKER_HOUSEKEEPING_S": "nan"}, "HOUSEKEEPING_S"),
        ({"SHARDWORKER_STREAM_MAX_BYTES": str(2 * 1024**4)}, "STREAM_MAX_BYTES: must be at most"),
    ],
)
def test_bounds_are_validated(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_a_long_read_backlog_is_trimmed_in_bounded_steps(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardworker.sink import housekeeping

    monkeypatch.setattr(housekeeping, "TRIM_LIMIT", 200)
    ids = fill(redis_client, 1000)
    redis_client.xgroup_create(WORKFLOW_STREAM, GROUP, id="$")  # everything counts as read
    house = keeper(redis_client)
    first = house.trim()[0].trimmed
    assert 0 < first <= 200
    while house.trim()[0].trimmed:
        pass
    assert [e for e, _ in redis_client.xrange(WORKFLOW_STREAM)] == ids[-1:]


class ScanRecorder(redis.Redis):
    """A client that keeps the key names its SCAN replies carried."""

    scanned: list[bytes]

    def scan(self, *args: Any, **kwargs: Any) -> Any:
        cursor, keys = super().scan(*args, **kwargs)
        self.scanned += keys
        return cursor, keys


def test_dedupe_sample_reads_no_other_key_name(redis_url: str) -> None:
    """A pool's Redis holds a lease per provider: the sample must not carry their names
    (it did: 5,000 key names per housekeeping round, most of the pool's steady traffic),
    and the estimate, scaled by the SCAN cursor, still comes out close."""
    client = ScanRecorder.from_url(redis_url)
    client.scanned = []
    client.flushdb()
    with client.pipeline(transaction=False) as pipe:
        for i in range(30_000):
            pipe.set(f"sw:lease:tenant-{i}:provider-{i}", "member|1")
        for i in range(600):
            pipe.set(f"sw:pub:dedupe-{i}", "x" * 40)
        pipe.execute()
    exact = sum(int(client.memory_usage(f"sw:pub:dedupe-{i}") or 0) for i in range(600))
    estimate = Housekeeper(client, make_settings()).estimate_dedupe_bytes()
    assert client.scanned and all(k.startswith(b"sw:pub:") for k in client.scanned)
    assert estimate == pytest.approx(exact, rel=0.35)
    client.flushdb()
    client.close()


def test_scan_coverage_reads_the_cursor_bits_as_a_binary_fraction() -> None:
    assert scan_coverage(0) == 1.0
    assert scan_coverage(0b1) == 0.5  # half of the buckets
    assert scan_coverage(0b11) == 0.75
    assert scan_coverage(0b10) == 0.25
